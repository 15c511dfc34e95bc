"""Fusion inside hand-written ``forward`` methods (ResNet blocks, RegNet, EfficientNet, ...).

:func:`effops.optimize` traces such a module's *own* forward with ``torch.fx``
(every child is an opaque call), rewrites each conv → BN [→ act] [+ residual]
chain into one :class:`FusedStep`, and installs the rewritten graph as that
instance's ``forward`` (a :class:`TracedForward`). The module keeps its class,
its children and its ``state_dict`` keys; nothing is registered twice.

* eval (``module.training`` False): the traced graph, with fused steps;
* train: the class's own ``forward``, so training is exactly PyTorch and
  anything the trace specialised on (``self.training`` branches, flags) can't leak.

The steps: :class:`FusedStep` (conv → BN [→ act] [+ residual], optionally fed by a
squeeze-excite gate folded into the conv's operand load), :class:`FusedTailStep` (a
converted container whose last conv takes the add that follows it),
:class:`AggregateStep` (``torch.cat`` → 1×1 conv as one N-segment aggregation, no concat),
:class:`ConcatStep` (``torch.cat`` of fused convs: each writes its channel range of one
buffer), :class:`ShuffleStep` (a fused conv that writes its output channel-shuffled),
:class:`SEResidualStep` (``act(se(x) + shortcut)`` in one pass), :class:`PairStep` (an expand 1×1
conv feeding a depthwise conv, banded on the native CPU backend), :class:`GhostGateStep` (an SE
gate folded into a ghost module's primary conv). Each one checks on every
call that it can run fused (eval BN, no hooks watching, no gradient needed where the
kernel has none, ...) and otherwise computes exactly what the original code did.

Flags a forward reads from ``self`` (e.g. ``grad_checkpointing``) are read when
``optimize`` runs, with the module in eval mode; re-run ``optimize`` after changing
them. Forwards with optional or variadic arguments are never traced: torch.fx would
silently fix every branch that tests them (``if shortcut is None``).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .. import dispatch
from . import common
from ..activations import apply_activation
from ..native import module as native_module
from ..ops import reference
from ..ops.conv import conv_bn_act_with_channel_sums, native_fast, output_format
from ..ops.osa import MAX_SEGMENTS, aggregate, check_aggregate_inputs
from .common import ChildrenSnapshot, hook_dicts, hooked, traced_constants
from .conv_bn_act import (DepthwisePointwise, FusedConvBNAct, PointwiseDepthwise, _cast, _compute_dtype, pair_steps, resolve_padding,
                          why_not_fusable)


class FusedStep(nn.Module):
    """One rewritten chain of a traced forward. Equivalent PyTorch::

        x = se(x)             if se is not None   # a squeeze-excite module feeding the conv
        y = bn(conv(x))
        y = act(y)            if residual is None
        y = act(y + r)        if residual == "before_act"
        y = act(y) + r        if residual == "after_act"

    With ``se`` the eval path computes only the SE gate (``se.gate_of(x)``, ``[N, C]``) and the
    conv applies it to its input as it loads it (``fused(x, gate=g)``): ``se(x)`` is never
    written. A hook on the SE module runs it as a module instead (so the hook fires).
    A residual that isn't the output's exact shape and dtype (a broadcasting or
    type-promoting add) runs unfused, as the original code did.
    """

    def __init__(self, fused: FusedConvBNAct, residual: Optional[str] = None, se: Optional[nn.Module] = None):
        super().__init__()
        if residual not in (None, "before_act", "after_act"):
            raise ValueError(f"residual must be None, 'before_act' or 'after_act', got {residual!r}")
        self.fused = fused
        self.residual = residual
        self.se = se
        self._se_hooks = None if se is None else hook_dicts([se])

    def extra_repr(self) -> str:
        return f"residual={self.residual}" + (", gated by se" if self.se is not None else "")

    def forward(self, x: Tensor, r: Optional[Tensor] = None, *, out_shuffle_groups: int = 1) -> Tensor:
        """``out_shuffle_groups`` (used by :class:`ShuffleStep`): channel-shuffle the result, written
        shuffled by the fused conv."""
        f = self.fused
        gate = None
        if self.se is not None:
            if hooked(self._se_hooks) or (r is not None and not self._exact_residual(x, r)):
                x = self.se(x)
            else:
                gate = self.se.gate_of(x)
        kw = {} if gate is None else {"gate": gate}
        if out_shuffle_groups != 1:
            kw["out_shuffle_groups"] = out_shuffle_groups
        if r is None:
            if self.residual is not None:
                # The traced code adds a value that is None now: the trace assumed otherwise.
                # Never drop the add silently (the original code would have raised too).
                raise TypeError("effops FusedStep: the residual traced here is None at run time")
            return f(x, **kw)
        after = self.residual == "after_act"
        if self._exact_residual(x, r):
            return f(x, r, residual_after_act=after, **kw)
        if after:
            y = f(x) + r
        else:
            conv, bn = f.conv, f.bn
            y = conv(x)
            y = apply_activation((y if bn is None else bn(y)) + r, *f.activation)
        return y if out_shuffle_groups == 1 else reference.channel_shuffle(y, out_shuffle_groups)

    def _exact_residual(self, x: Tensor, r: Tensor) -> bool:
        # The common case, answered from the conv's eager plan (not read in a trace: a guard per
        # step); anything else is worked out below.
        plan = None if torch.compiler.is_compiling() else self.fused._native_plan
        if plan is not None and plan.exact_residual(x, r):
            return True
        if not isinstance(r, Tensor) or r.dim() != 4 or x.dim() != 4:
            return False
        if r.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            return False
        c = traced_constants(self.fused) if torch.compiler.is_compiling() else None
        if c is not None:  # the configuration as graph constants (the weight's shape among them)
            k, s, p, d, cout = c[11][2:], c[4], c[5], c[6], c[11][0]
        else:
            conv = self.fused.conv
            k, s, d, p, cout = conv.kernel_size, conv.stride, conv.dilation, resolve_padding(conv), conv.out_channels
        oh = (x.shape[2] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        ow = (x.shape[3] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        return tuple(r.shape) == (x.shape[0], cout, oh, ow)


class FusedTailStep(nn.Module):
    """A container run up to its last step, whose last step (an activation-free conv → BN)
    takes the residual add and activation that follow the container in the traced code::

        for step in prefix: x = step(x)     # e.g. MobileNetV2's expand + depthwise convs
        return fused_step(x, r)             # projection conv → BN (+ r) (→ act)
    """

    def __init__(self, prefix, step: FusedStep):
        super().__init__()
        self.prefix = nn.ModuleList(prefix)
        self.step = step
        # the prefix's expand → depthwise pairs as one step each (a plain list: nothing registered twice)
        self._prefix_steps = pair_steps(list(prefix))

    def forward(self, x: Tensor, r: Optional[Tensor] = None) -> Tensor:
        for m in self._prefix_steps:
            x = m(x)
        return self.step(x, r)


class PairStep(nn.Module):
    """Two plain fused conv steps of a traced forward, an expand 1×1 conv whose only user is a
    depthwise conv (timm's InvertedResidual: ``conv_pw → bn1 → conv_dw → bn2``), run as one
    :class:`~effops.nn.conv_bn_act.PointwiseDepthwise`. Equivalent PyTorch::

        return second(first(x))
    """

    def __init__(self, first: FusedStep, second: FusedStep):
        super().__init__()
        self.first, self.second = first, second
        self._pair = PointwiseDepthwise(first.fused, second.fused)

    def forward(self, x: Tensor) -> Tensor:
        return self._pair(x)


class DwPairStep(nn.Module):
    """A plain fused depthwise conv step (timm's DepthwiseSeparableConv without SE: ``conv_dw → bn1 →
    conv_pw → bn2 [+ shortcut]``) or a bare depthwise conv (SeparableConvNormAct) whose only user is
    a fused 1×1 conv step, run as one :class:`~effops.nn.conv_bn_act.DepthwisePointwise`. Equivalent PyTorch::

        return second(first(x), r)
    """

    def __init__(self, first: nn.Module, second: FusedStep):
        """``first``: a :class:`FusedStep`, or a bare depthwise ``nn.Conv2d``."""
        super().__init__()
        self.first, self.second = first, second
        self._pair = DepthwisePointwise(first.fused if isinstance(first, FusedStep) else first, second.fused)

    def forward(self, x: Tensor, r: Optional[Tensor] = None) -> Tensor:
        if r is None and self.second.residual is None:
            return self._pair(x)
        # the pair adds a residual after the 1×1 conv's activation
        if r is not None and (self.second.residual == "after_act" or self.second.fused.activation[0] == "identity"):
            return self._pair(x, r)
        return self.second(self.first(x), r)


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class AggregateStep(nn.Module):
    """A ``torch.cat(segments, dim=1)`` whose only user is a 1×1 conv → BN [→ act] [+ residual],
    run as one N-segment aggregation (:func:`effops.ops.aggregate`): the conv's K dimension
    walks the segments where they lie, so the concatenated tensor is never built. Equivalent
    PyTorch::

        y = inner(torch.cat(segments, 1))          # residual is None
        y = inner(torch.cat(segments, 1), r)       # the FusedStep's residual add

    ``inner`` is what consumed the concat in the traced graph (a :class:`FusedStep`, or the
    owner's child: a ``FusedConvBNAct``, a module whose eval forward is one fused conv, or a
    ``FusedSequential`` starting with one); ``fused`` is that conv → BN → act, and ``rest``
    the steps ``inner`` runs after it (applied to the aggregation's output). The scale and
    bias come from the live BN on every call. ``inner`` runs instead (with ``torch.cat``)
    whenever the aggregation can't give the same result: a gradient is needed (the kernel is
    inference-only), a hook watches one of the modules, autocast is on, a BN is in training
    mode, a setting changed so the conv is no longer a 1×1 stride-1 dense conv, or the
    segments don't fit (more than ``MAX_SEGMENTS``, other dtypes). A residual added before a non-identity activation is
    added by the kernel's epilogue and the activation applied in a second pass (the
    kernel's epilogue adds its residual after the activation).
    """

    def __init__(self, inner: nn.Module, fused: FusedConvBNAct, residual: Optional[str] = None, rest=()):
        super().__init__()
        if residual not in (None, "before_act", "after_act"):
            raise ValueError(f"residual must be None, 'before_act' or 'after_act', got {residual!r}")
        if residual is not None and rest:
            raise ValueError("a residual belongs to the last step: rest must be empty")
        self.inner = inner
        self.fused = fused
        self.residual = residual
        self.rest = nn.ModuleList(rest)
        mods = [inner, fused] + [m for m in fused._live_modules() if m is not None]
        self._hooks = hook_dicts(mods)
        self._snapshot = ChildrenSnapshot(mods)
        self._checked, self._ok = None, False

    def extra_repr(self) -> str:
        return f"residual={self.residual}"

    def forward(self, segments, r: Optional[Tensor] = None) -> Tensor:
        segs = list(segments)
        if segs and native_fast(segs[0]) and not torch.compiler.is_compiling():
            # CPU: GEMMs over the segments where they lie, with the BN folded into a cached weight
            # (computing scale and bias here per call would defeat that cache).
            if self._can_aggregate(segs, r) and segs[0].dtype == torch.float32:
                f = self.fused
                after = r is None or self.residual == "after_act" or f.activation[0] == "identity"
                y = f.native_segments(segs, r, after)
                for m in self.rest:
                    y = m(y)
                return y
            x = torch.cat(segs, 1)
            return self.inner(x) if r is None else self.inner(x, r)
        if self._can_aggregate(segs, r):
            f = self.fused
            w = f.conv.weight
            scale, bias = f.scale_bias(_compute_dtype(w.dtype))
            act, param = f.activation
            if r is None or self.residual == "after_act" or act == "identity":
                y = self._aggregate(segs, w, scale, bias, r, act, param)
            else:
                y = apply_activation(self._aggregate(segs, w, scale, bias, r, "identity", 0.0), act, param)
            for m in self.rest:
                y = m(y)
            return y
        x = torch.cat(segs, 1)
        return self.inner(x) if r is None else self.inner(x, r)

    def _aggregate(self, segs, w, scale, bias, r, act: str, param: float) -> Tensor:
        if torch.compiler.is_compiling():
            return aggregate(segs, w, scale, bias, act=act, act_param=param, residual=r)  # the registered op
        # Eager inference: the op's implementation without the torch.library layers (they cost
        # more host time than a small aggregation takes on the GPU); _can_aggregate checked it all.
        return dispatch.run("aggregate", segs, w, scale, bias, r, None, None, None, act, float(param))

    def _can_aggregate(self, segs, r: Optional[Tensor]) -> bool:
        if self._snapshot.changed() or hooked(self._hooks) or not 1 <= len(segs) <= MAX_SEGMENTS:
            return False
        f = self.fused
        conv, bn, act = f._live_modules()
        w = conv.weight
        if not all(isinstance(t, Tensor) for t in segs) or not (r is None or isinstance(r, Tensor)):
            return False
        x = segs[0]
        if torch.is_autocast_enabled(x.device.type) or not f._folds(bn) or _needs_grad((*segs, r, w, *f.bn_state()[:3])):
            return False
        # What the rest depends on, compared on every call; checked in full once per signature.
        sig = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode,
               f.activation, w.shape, w.dtype, w.device, [(t.shape, t.dtype, t.device) for t in segs],
               None if r is None else (r.shape, r.dtype, r.device))
        if sig != self._checked:
            self._checked, self._ok = sig, self._compatible(segs, r, conv, bn, act)
        return self._ok

    def _compatible(self, segs, r, conv, bn, act) -> bool:
        """Whether the aggregation computes ``inner(torch.cat(segs, 1)[, r])`` for these arguments."""
        w, x = conv.weight, segs[0]
        if any(t.dim() != 4 or t.dtype != w.dtype or t.device != w.device for t in segs) \
                or sum(t.shape[1] for t in segs) != conv.in_channels \
                or any(t.shape[0] != x.shape[0] or t.shape[2:] != x.shape[2:] for t in segs):
            return False
        if r is not None and not (r.dtype == x.dtype and r.device == x.device
                                  and tuple(r.shape) == (x.shape[0], conv.out_channels, x.shape[2], x.shape[3])):
            return False
        if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or conv.groups != 1 \
                or why_not_fusable(conv, bn, act) is not None or resolve_padding(conv) != (0, 0):
            return False
        scale, bias = self.fused.scale_bias(_compute_dtype(w.dtype))
        check_aggregate_inputs(segs, w, scale, bias, r, None, None, self.fused.activation[0])
        return True


class ConcatStep(nn.Module):
    """``torch.cat([p_0(x_0), ..., p_k(x_k)], dim=1)`` where every ``p_i`` is a fused conv whose
    output feeds only the concat (YOLOv7's MP transition, a ghost module written by hand): one
    buffer is allocated and each conv writes its channel range of it (``out=`` a channel
    view), so the concat is never a copy. Equivalent PyTorch::

        torch.cat([p(x) for p, x in zip(producers, xs)], 1)

    ``convs[i]`` is the ``FusedConvBNAct`` that ``producers[i]`` computes. The convs run in the
    concat's position in the graph (they are pure functions of their inputs). The producers
    themselves and ``torch.cat`` run instead when a gradient is needed, autocast is on, a hook
    watches a producer, or the outputs' batch, size, dtype or device differ (then ``torch.cat``
    raises as it did).
    """

    def __init__(self, producers, convs):
        super().__init__()
        if len(producers) != len(convs):
            raise ValueError("one fused conv per producer")
        self.producers = nn.ModuleList(producers)
        self.convs = list(convs)  # shared with the producers: not registered twice
        self._hooks = hook_dicts(self.producers)

    def forward(self, *xs: Tensor) -> Tensor:
        shapes = self._out_shapes(xs)
        if shapes is None:
            return torch.cat([p(x) for p, x in zip(self.producers, xs)], 1)
        n, h, w = shapes[0][0], shapes[0][2], shapes[0][3]
        x = xs[0]
        buf = torch.empty((n, sum(sh[1] for sh in shapes), h, w), dtype=x.dtype, device=x.device,
                          memory_format=output_format(x))
        c0 = 0
        for f, x, sh in zip(self.convs, xs, shapes):
            f(x, out=buf[:, c0:c0 + sh[1]])
            c0 += sh[1]
        return buf

    def _out_shapes(self, xs):
        """Each conv's output shape when they can all write one buffer, else None."""
        if hooked(self._hooks) or len(xs) != len(self.convs):
            return None
        shapes = []
        for f, x in zip(self.convs, xs):
            conv = f.conv
            if not isinstance(x, Tensor) or x.dim() != 4 or x.dtype != conv.weight.dtype \
                    or x.device != conv.weight.device or x.shape[1] != conv.in_channels:
                return None
            if torch.is_autocast_enabled(x.device.type) or _needs_grad((x, conv.weight, *f.bn_state()[:3])):
                return None
            k, st, d, pad = conv.kernel_size, conv.stride, conv.dilation, resolve_padding(conv)
            if pad is None:
                return None
            shapes.append((x.shape[0], conv.out_channels,
                           (x.shape[2] + 2 * pad[0] - d[0] * (k[0] - 1) - 1) // st[0] + 1,
                           (x.shape[3] + 2 * pad[1] - d[1] * (k[1] - 1) - 1) // st[1] + 1))
        first = shapes[0]
        if any((sh[0], sh[2], sh[3]) != (first[0], first[2], first[3]) or sh[2] <= 0 or sh[3] <= 0 for sh in shapes):
            return None
        if any(x.dtype != xs[0].dtype or x.device != xs[0].device for x in xs):
            return None
        return shapes


class ShuffleStep(nn.Module):
    """A fused conv step whose output only feeds a channel shuffle (ShuffleNet V1's group conv →
    shuffle), run as one conv that stores each output channel at its shuffled position
    (``FusedConvBNAct(..., out_shuffle_groups=g)``): the shuffle costs no pass. Equivalent
    PyTorch::

        y = inner(x) if r is None else inner(x, r)
        y = shuffle(y)                                           # an nn.ChannelShuffle module
        y = y.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)   # otherwise

    ``step`` is the :class:`FusedStep` that computes ``inner``'s result; ``groups`` is the
    traced ``g`` (a module's ``groups`` is read on every call). ``inner`` and the shuffle run
    as they were when a hook watches either, or ``g`` doesn't divide the channels (the
    shuffle then raises as it did).
    """

    def __init__(self, step: FusedStep, groups: int = 1, shuffle: Optional[nn.Module] = None,
                 inner: Optional[nn.Module] = None):
        super().__init__()
        self.step = step
        self.groups = groups
        self.shuffle = shuffle
        self.inner = step if inner is None else inner
        self._hooks = hook_dicts([m for m in (self.inner, shuffle) if m is not None])

    def extra_repr(self) -> str:
        return f"groups={self.shuffle.groups if self.shuffle is not None else self.groups}"

    def forward(self, x: Tensor, r: Optional[Tensor] = None) -> Tensor:
        g = self.shuffle.groups if self.shuffle is not None else self.groups
        args = (x,) if r is None else (x, r)
        if not hooked(self._hooks) and isinstance(g, int) and not isinstance(g, bool) and g >= 1 \
                and self.step.fused.conv.out_channels % g == 0:
            return self.step(*args, out_shuffle_groups=g)
        y = self.inner(*args)
        if self.shuffle is not None:
            return self.shuffle(y)
        n, c, h, w = y.shape
        return y.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


class GhostGateStep(nn.Module):
    """``ghost(se(x))`` of a traced forward (timm's GhostBottleneck: SE → ``ghost2``), with ``ghost`` a
    :class:`~effops.nn.ghost.FusedGhostModule` whose primary conv takes the gate. Equivalent PyTorch::

        return ghost(se(x))

    The eval path computes only the SE gate (``se.gate_of(x)``, ``[N, C]``) and the ghost module's
    primary conv applies it to ``x`` as it loads it (``ghost(x, gate=g)``): ``se(x)`` is never
    written. A hook on the SE or the ghost module (or a module inside either) runs both as modules
    instead, so the hooks fire and see the tensors they saw before; the ghost module's own fallbacks
    (train, autocast, a gradient, ...) compute ``ghost(x * g)``.
    """

    def __init__(self, se: nn.Module, ghost: nn.Module):
        super().__init__()
        self.se = se
        self.ghost = ghost
        self._hooks = hook_dicts([se, ghost])

    def forward(self, x: Tensor) -> Tensor:
        if hooked(self._hooks):
            return self.ghost(self.se(x))
        return self.ghost(x, gate=self.se.gate_of(x))


class SEResidualStep(nn.Module):
    """``act(se(x) + r)`` of a traced forward (timm's ResNet bottleneck with SE, ResNet-RS),
    run as ``se.forward_residual(x, r, act, act_param)``: the gate, the add and the
    activation in one pass over ``x``. Equivalent PyTorch::

        y = se(x)
        for m in passthrough: y = m(y)       # drop-path / stochastic depth: identity in eval
        y = act(y + r)

    The modules themselves run instead when a hook watches the SE or the activation module,
    a ``passthrough`` module is in training mode, or ``r`` isn't exactly ``x``'s shape and
    dtype (a broadcasting or type-promoting add).
    """

    def __init__(self, se: nn.Module, act: str, act_param: float = 0.0, act_module: Optional[nn.Module] = None,
                 passthrough=()):
        super().__init__()
        self.se = se
        self.act, self.act_param = act, float(act_param)
        self.act_module = act_module
        self.passthrough = nn.ModuleList(passthrough)
        self._hooks = hook_dicts([m for m in (se, act_module) if m is not None])

    def extra_repr(self) -> str:
        return f"act={self.act}"

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        if not hooked(self._hooks) and not any(m.training for m in self.passthrough) and isinstance(r, Tensor) \
                and r.shape == x.shape and r.dtype == x.dtype:
            return self.se.forward_residual(x, r, self.act, self.act_param)
        y = self.se(x)
        for m in self.passthrough:
            y = m(y)
        y = y + r
        return self.act_module(y) if self.act_module is not None else apply_activation(y, self.act, self.act_param)


class SEEpilogueStep(nn.Module):
    """A conv step feeding an SE-residual step that is its only user (timm's SE bottleneck:
    conv3 + bn3 → SE → + shortcut → ReLU), run so that the SE squeeze rides the conv's
    epilogue: the conv writes ``y`` and per-(image, pixel block) channel sums of it
    (:func:`effops.ops.conv.conv_bn_act_with_channel_sums`), the excitation reads the sums, and
    one ``se_apply`` pass reads ``y``: no pool pass over ``y``. Equivalent PyTorch::

        y = conv_step(x)             # bn(conv(x)), act(...)
        return se_step(y, r)         # act(se(y) + r)

    Exactly that (the two steps one after the other) wherever the fused path doesn't apply:
    torch.compile, anything needing gradients, autocast, hooks on the conv's, BN's, SE's or
    activation modules, unfusable live settings, a residual of another shape or dtype.
    """

    def __init__(self, conv_step: FusedStep, se_step: SEResidualStep):
        super().__init__()
        if conv_step.se is not None or conv_step.residual is not None:
            raise ValueError("SEEpilogueStep takes a conv step without an SE gate or a residual of its own")
        self.conv_step = conv_step
        self.se_step = se_step

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        se_step = self.se_step
        if hooked(se_step._hooks) or any(m.training for m in se_step.passthrough) or not isinstance(r, Tensor):
            return se_step(self.conv_step(x), r)
        y = self._native(x, r)
        if y is not None:
            return y
        found = self._with_sums(x, r)
        if found is None:
            return se_step(self.conv_step(x), r)
        y, psum, num_hb = found
        if r.shape != y.shape or r.dtype != y.dtype:
            return se_step(y, r)
        return se_step.se.forward_residual_from_sums(y, psum, num_hb, r, se_step.act, se_step.act_param)

    def _native(self, x: Tensor, r: Tensor) -> Optional[Tensor]:
        """Eager float32 CPU inference on the native backend, for a 1×1 stride-1 conv that has planned
        its native calls (its first call did): the conv as the register-blocked GEMM whose stores also
        sum each image's channel means (``native_segments(..., pool=)``, or oneDNN and one pooling pass
        where that is measured faster), the excitation from those means (``se_gate_of_means``), then
        gate, residual and activation applied in place in one pass. None where that doesn't apply."""
        if torch.compiler.is_compiling():
            return None
        f, se = self.conv_step.fused, self.se_step.se
        plan = f._native_plan
        if plan is None or type(x) is not Tensor or x.dtype is not torch.float32 or plan.dtype is not torch.float32 \
                or not x.is_cpu or x.shape != plan.x_shape \
                or tuple(plan.kernel_size) != (1, 1) or tuple(plan.stride) != (1, 1) or plan.pad != (0, 0) \
                or tuple(plan.dilation) != (1, 1) or plan.groups != 1 or plan.shuffle != 1:
            return None
        if type(r) is not Tensor or r.shape != plan.out_shape or r.dtype is not x.dtype or not r.is_cpu \
                or not hasattr(se, "sums_usable") or plan.live_args(x) is None or not se.sums_usable(x, r):
            return None
        sp = se._fused_plan()
        if sp is None:
            return None
        means = torch.empty(x.shape[0], plan.out_shape[1], dtype=torch.float32)
        y = f.native_segments([x], None, True, pool=means)
        gate = native_module().se_gate_of_means(means, *se._weights(), *sp)
        step = self.se_step
        return dispatch.run("se_apply", y, gate, r, y, step.act, step.act_param)

    def _with_sums(self, x: Tensor, r: Tensor):
        """``(y, psum, num_hb)`` from the fused conv, or None where FusedConvBNAct would not run its
        eager fused inference path (or the SE could not use the sums)."""
        f = self.conv_step.fused
        se = self.se_step.se
        if not isinstance(x, Tensor) or not hasattr(se, "sums_usable"):
            return None
        if native_fast(x):  # CPU: the conv's native path caches its folded weight; the SE pools itself
            return None
        if f._snapshot.changed():  # a child was replaced since the last call
            f._watch()
        conv, bn, act_mod = f._live_modules()
        params = [p for m in (conv, bn) if m is not None for p in m.parameters(recurse=False)]
        if hooked(f._hooks) or not se.sums_usable(x, r, *params):
            return None
        if why_not_fusable(conv, bn, act_mod) is not None or not f._folds(bn):
            return None
        dtype = conv.weight.dtype
        scale, bias = f._reused_scale_bias(conv, bn, _compute_dtype(dtype), x)
        act, act_param = f._settings(conv, bn, act_mod)[-1]
        return conv_bn_act_with_channel_sums(
            x, _cast(conv._parameters["weight"], dtype), scale, bias, stride=conv.stride,
            padding=resolve_padding(conv), dilation=conv.dilation, groups=conv.groups, act=act, act_param=act_param)


class TracedForward(common.EpochChecked):
    """The instance-level ``forward`` effops.optimize installs on a module with a
    hand-written forward: the fused ``graph_module`` in eval, the class's own
    forward in train. Not an ``nn.Module``, so nothing in it is registered on
    the owner (``state_dict`` and ``modules()`` are unchanged); it deep-copies and
    pickles with its owner."""

    def __init__(self, owner: nn.Module, graph_module: torch.fx.GraphModule, absorbed=()):
        self.owner = owner
        self.graph_module = graph_module
        # The graph calls the owner's children as they were when it was traced: if one is
        # replaced later, the class's own forward runs instead (exact, unfused).
        self.children_at_trace = dict(owner._modules)
        # The fused steps also hold modules from inside the containers they absorbed (a converted
        # conv3's conv and BN, a child's traced conv): replacing one of those falls back too.
        self.absorbed = ChildrenSnapshot(list(absorbed))
        self.warned = False
        common.watch(owner)
        self._track(common._EPOCH)

    def _differs(self) -> bool:
        """Whether a child of the owner, or of a container a fused step absorbed, was replaced since
        the trace (dict equality: modules compare by identity); ``changed()`` asks only when the
        structure epoch moved (see ``common.EpochChecked``)."""
        return self.owner._modules != self.children_at_trace or self.absorbed.changed()

    def __setstate__(self, state):  # deepcopy / unpickle: compared once, then tracked
        self.__dict__.update(state)
        self._track(-1)

    def __call__(self, *args, **kwargs):
        owner = self.owner
        if owner.training:
            return type(owner).forward(owner, *args, **kwargs)
        if self.changed():
            if not self.warned:
                self.warned = True
                warnings.warn(f"effops: a child of {type(owner).__name__} (or of a container it fused) was replaced "
                              "after optimize(); its forward runs unfused (call effops.optimize again to fuse it)",
                              stacklevel=2)
            return type(owner).forward(owner, *args, **kwargs)
        # The graph module is effops' own (not in the owner's module tree: no hook can be registered
        # on it through the model), so its forward is called directly: under torch.compile its
        # nn.Module call would install four hook-dict guards, evaluated on every call.
        return self.graph_module.forward(*args, **kwargs)

    def __repr__(self) -> str:
        return f"TracedForward({type(self.owner).__name__}, fused steps in eval)"


def traced_forward_of(module: nn.Module) -> Optional[TracedForward]:
    """The :class:`TracedForward` installed on ``module``, if any."""
    fwd = module.__dict__.get("forward")
    return fwd if isinstance(fwd, TracedForward) else None
