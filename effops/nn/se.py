"""``SqueezeExcite``: drop-in squeeze-and-excitation on effops' SE ops, for timm's, torchvision's
and CenterMask's SE modules. Importing this module registers the converter's
``"squeeze-excite"`` block rule."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import dispatch
from ..activations import activation_of, apply_activation, check_activation, make_activation
from ..ops.se import (APPLY_NATIVE_OP, APPLY_OP, GATE_NATIVE_OP, GATE_OP, check_se_apply_inputs, check_se_gate_inputs,
                      se_gate_from_sums)
from ..native import module as native_module
from ..ops.conv import native_fast, native_first
from .common import (BlockRule, ChildrenSnapshot, TracedConfigModule, hook_dicts, hooked, register_block_rule,
                     trace_register, traced_constants, traced_tensors)
from .conv_bn_act import _STATIC_ACTS


@dataclass(frozen=True)
class _Layout:
    """Which child plays which part of ``x * gate(expand(act(norm(reduce(pool(x))))))``, by name."""

    pool: Optional[str]          # an AdaptiveAvgPool2d(1) child; None: x.mean((2, 3), keepdim=True)
    reduce: Optional[str]        # 1x1 conv C -> R; None: effective SE (expand is C -> C)
    norm: Optional[str]          # timm SEModule's ``bn`` (must be nn.Identity to fuse)
    act: Optional[str]
    expand: str                  # 1x1 conv R -> C (C -> C for effective SE)
    gate: str
    gate_first: bool             # the forward computes ``gate * x`` (torchvision) rather than ``x * gate``

    def names(self) -> frozenset:
        return frozenset(n for n in (self.pool, self.reduce, self.norm, self.act, self.expand, self.gate) if n)


_OWN_SE = _Layout(None, "fc1", None, "act", "fc2", "gate", False)
_OWN_ESE = _Layout(None, None, None, None, "fc", "gate", False)
# (class name, children) -> layout, for classes from timm / torchvision, checked against their
# source (timm 1.0, torchvision 0.29): each forward computes exactly the layout's expression.
_KNOWN = {
    ("timm", "SEModule", frozenset({"fc1", "bn", "act", "fc2", "gate"})):            # timm.layers.squeeze_excite
        _Layout(None, "fc1", "bn", "act", "fc2", "gate", False),
    ("timm", "SEModule", frozenset({"fc1", "relu", "fc2", "sigmoid"})):              # timm.models.senet (legacy)
        _Layout(None, "fc1", None, "relu", "fc2", "sigmoid", False),
    ("timm", "SqueezeExcite", frozenset({"conv_reduce", "act1", "conv_expand", "gate"})):  # efficientnet blocks
        _Layout(None, "conv_reduce", None, "act1", "conv_expand", "gate", False),
    ("timm", "EffectiveSEModule", frozenset({"fc", "gate"})): _OWN_ESE,
    ("torchvision", "SqueezeExcitation", frozenset({"avgpool", "fc1", "fc2", "activation", "scale_activation"})):
        _Layout("avgpool", "fc1", None, "activation", "fc2", "scale_activation", True),
}
# CenterMask / VoVNetV2's classic eSEModule: recognised by class name and children wherever it is
# defined (hand-written VoVNets), like effops.nn.osa.ese_fc_of; ``hsigmoid`` is a hard sigmoid.
_CENTERMASK = _Layout("avg_pool", None, None, None, "fc", "hsigmoid", False)
_CENTERMASK_CHILDREN = _CENTERMASK.names()


def _layout_of(m: nn.Module) -> Optional[_Layout]:
    """The layout of a squeeze-excitation module effops recognises (type and children: cheap), else None."""
    t = type(m)
    name, lib = t.__name__, t.__module__.split(".", 1)[0]
    if name == "eSEModule":
        return _CENTERMASK if frozenset(m._modules) == _CENTERMASK_CHILDREN else None
    if lib not in ("timm", "torchvision") or name not in ("SEModule", "SqueezeExcite", "EffectiveSEModule",
                                                           "SqueezeExcitation"):
        return None
    return _KNOWN.get((lib, name, frozenset(m._modules)))


class SqueezeExcite(TracedConfigModule):
    """Squeeze-and-excitation with the gate computed by effops' fused ops in eval.

    ``SqueezeExcite(channels, rd_channels=None, act="relu", gate="sigmoid", bias=True)`` builds
    the children ``fc1`` (1×1 conv C → R), ``act``, ``fc2`` (R → C), ``gate``, the layout and
    ``state_dict`` keys of timm's ``SEModule``; ``rd_channels=None`` builds effective SE
    (CenterMask): ``fc`` (C → C) and ``gate``. :meth:`from_module` wraps timm's ``SEModule``,
    ``SqueezeExcite`` (EfficientNet / MobileNetV3 / GhostNet) and ``EffectiveSEModule``,
    torchvision's ``SqueezeExcitation``, the classic ``eSEModule`` or another ``SqueezeExcite``,
    keeping *its* children under their names (shared, not copied): ``state_dict`` keys unchanged.

    Equivalent PyTorch::

        s = x.mean((2, 3), keepdim=True)            # or the module's avgpool child
        s = gate(fc2(act(fc1(s))))                  # effective SE: gate(fc(s))
        return x * s

    * ``train()``: exactly the original forward (the children called in its order).
    * ``eval()``: :meth:`gate_of` (``effops::se_gate``: pool + excitation, two launches) then
      ``effops::se_apply`` (``x * gate``, one pass), with autograd when gradients are needed.
      Under autocast the result has PyTorch's dtype (the input's promoted with the autocast
      dtype). While a hook watches a child, or when a child is replaced by something the ops
      can't express (a BatchNorm, an unsupported activation; warning once), the children run
      as in training.
    * :meth:`gate_of` and :meth:`forward_residual` are for callers that fuse around the SE: the
      gate alone (to fold into the next conv's operand load), or ``act(se(x) + residual)`` in
      one pass (SE bottlenecks).

    The gate is a method named ``gate_of``, not ``gate``: timm's SE modules have a child named
    ``gate``, and a method of that name would shadow it (``se.gate``, ``get_submodule``, and
    torch.fx's copies of the module would all get the method).
    """

    def __init__(
        self,
        channels: int,
        rd_channels: Optional[int] = None,
        act: Union[str, nn.Module] = "relu",
        gate: Union[str, nn.Module] = "sigmoid",
        bias: bool = True,
        *,
        act_param: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for arg, v in (("channels", channels), ("rd_channels", channels if rd_channels is None else rd_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SqueezeExcite: {arg} must be a positive int, got {v!r}")
        dd = dict(device=device, dtype=dtype)
        gate_mod = gate if isinstance(gate, nn.Module) else make_activation(gate)
        if rd_channels is None:
            children = [("fc", nn.Conv2d(channels, channels, 1, bias=bias, **dd)), ("gate", gate_mod)]
            layout = _OWN_ESE
        else:
            act_mod = act if isinstance(act, nn.Module) else make_activation(act, act_param)
            children = [("fc1", nn.Conv2d(channels, rd_channels, 1, bias=bias, **dd)), ("act", act_mod),
                        ("fc2", nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)), ("gate", gate_mod)]
            layout = _OWN_SE
        self._setup(children, layout, {})

    @classmethod
    def from_module(cls, module: nn.Module) -> "SqueezeExcite":
        """Wrap an existing SE module (see the class docstring); its children are shared, keep their
        names, and nothing is re-initialised. ``ValueError`` says why a module can't be wrapped
        (timm's ``add_maxpool``, a real BatchNorm between the fcs, grouped or padded fcs, an
        activation effops has no kernel for)."""
        if isinstance(module, SqueezeExcite):
            layout, known = module._layout, dict(module._known)
        else:
            layout = _layout_of(module)
            if layout is None:
                raise ValueError(
                    f"{type(module).__module__}.{type(module).__name__} is not a squeeze-excitation module effops "
                    "recognises (timm SEModule / SqueezeExcite / EffectiveSEModule, torchvision SqueezeExcitation, "
                    "the classic eSEModule, with their usual children)")
            if getattr(module, "add_maxpool", False):
                raise ValueError("add_maxpool=True (average + max pooling) is not fused")
            known = {}
            if layout is _CENTERMASK and activation_of(module._modules["hsigmoid"]) is None:
                # The classic Hsigmoid class computes relu6(x + 3) / 6 (the type is known from eSEModule).
                known[type(module._modules["hsigmoid"])] = ("hardsigmoid", 0.0)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(list(module.named_children()), layout, known)
        self.training = module.training  # the mode it replaces (children keep theirs)
        return self

    def _setup(self, children, layout: _Layout, known: Dict[type, Tuple[str, float]]) -> None:
        for name, m in children:
            self.add_module(name, m)
        self._layout = layout
        self._known = known  # activation modules effops can't read by type alone -> (name, param)
        plan = self._plan()
        if isinstance(plan, str):
            raise ValueError(plan)
        self._warned = None
        self._watch()

    def _watch(self) -> None:
        """(Re)collect the children's hook registries and a snapshot of which module is in each slot."""
        self._hooks = hook_dicts(list(self.children()))
        self._snapshot = ChildrenSnapshot([self])
        self._checked = self._checked_apply = None
        self.__dict__["_native_gate"] = None
        trace_register(self)

    def _trace_constants(self):
        """:meth:`_plan` as torch.compile's trace takes it: read once, kept in the graph
        (:func:`~effops.nn.common.traced_constants`)."""
        return self._plan()

    # -- the live structure ----------------------------------------------------------
    def _child(self, name: Optional[str]) -> Optional[nn.Module]:
        return None if name is None else self._modules.get(name)

    def _act_of(self, m: Optional[nn.Module]) -> Optional[Tuple[str, float]]:
        return activation_of(m) or self._known.get(type(m))

    def _plan(self) -> Union[str, Tuple[str, float, str, float]]:
        """``(act, act_param, gate, gate_param)`` of the children as they are now, or why the
        fused ops can't compute them."""
        L = self._layout
        mods = self._modules
        for name in L.names():
            if not isinstance(mods.get(name), nn.Module):
                return f"its child {name!r} is missing"
        if L.pool is not None:
            pool = mods[L.pool]
            if type(pool) is not nn.AdaptiveAvgPool2d or pool.output_size not in (1, (1, 1)):
                return f"{L.pool} is {pool!r}, not AdaptiveAvgPool2d(1)"
        if L.norm is not None and type(mods[L.norm]) is not nn.Identity:
            return f"{L.norm} is a {type(mods[L.norm]).__name__}: a normalisation between the two fcs is not fused"
        expand, reduce = mods[L.expand], self._child(L.reduce)
        for name, conv in ((L.reduce, reduce), (L.expand, expand)):
            if conv is None:
                continue
            if type(conv) is not nn.Conv2d:
                return f"{name} is a {type(conv).__name__}, not a plain nn.Conv2d"
            if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.padding not in ((0, 0), "valid"):
                return (f"{name} is not a plain 1x1 conv (kernel {conv.kernel_size}, groups {conv.groups}, "
                        f"padding {conv.padding})")
        c = expand.out_channels
        if reduce is not None and (reduce.in_channels != c or reduce.out_channels != expand.in_channels):
            return (f"{L.reduce} maps {reduce.in_channels} -> {reduce.out_channels} channels and {L.expand} "
                    f"{expand.in_channels} -> {c}; expected C -> R -> C")
        if reduce is None and expand.in_channels != c:
            return f"{L.expand} maps {expand.in_channels} -> {c} channels; effective SE needs C -> C"
        act = ("identity", 0.0)
        if L.act is not None:
            act = self._act_of(mods[L.act])
            if act is None:
                return f"activation {type(mods[L.act]).__name__} is not supported"
        gate = self._act_of(mods[L.gate])
        if gate is None:
            return f"gate {type(mods[L.gate]).__name__} is not supported"
        return act + gate

    @property
    def channels(self) -> int:
        return self._modules[self._layout.expand].out_channels

    @property
    def rd_channels(self) -> Optional[int]:
        """The reduced width R, or None for effective SE (one C -> C fc)."""
        reduce = self._child(self._layout.reduce)
        return None if reduce is None else reduce.out_channels

    @property
    def activations(self) -> Tuple[str, str]:
        """``(act, gate)`` names as the children say now (``"unsupported"`` when they can't be fused)."""
        plan = self._plan()
        return ("unsupported", "unsupported") if isinstance(plan, str) else (plan[0], plan[2])

    def extra_repr(self) -> str:
        act, gate = self.activations
        return f"channels={self.channels}, rd_channels={self.rd_channels}, act={act}, gate={gate}"

    def _weights(self):
        if torch.compiler.is_compiling():
            t = traced_tensors(self)  # inductor freezing: graph constants, no guard per tensor
            if t is not None and t[2].is_cpu:  # (the native CPU path's; CUDA traces read them live)
                return t
        return self._trace_tensors()

    def _trace_tensors(self):
        """``(reduce weight, reduce bias, expand weight, expand bias)`` as held now."""
        L, mods = self._layout, self._modules
        reduce, expand = self._child(L.reduce), mods[L.expand]
        rp, ep = (reduce._parameters if reduce is not None else {}), expand._parameters
        return rp.get("weight"), rp.get("bias"), ep["weight"], ep.get("bias")

    def _ese_fc(self) -> Optional[nn.Conv2d]:
        """The ``fc`` conv when this computes ``x * hardsigmoid(fc(mean_hw(x)))`` now, else None
        (what :func:`effops.nn.osa.ese_fc_of` asks)."""
        plan = self._plan()
        if isinstance(plan, str) or self._layout.reduce is not None or plan[2] != "hardsigmoid":
            return None
        return self._modules[self._layout.expand]

    # -- the original math -------------------------------------------------------------
    def _squeeze_modules(self, x: Tensor) -> Tensor:
        """The gate ``[N, C, 1, 1]`` computed by the children, in the original forward's order."""
        L, mods = self._layout, self._modules
        s = mods[L.pool](x) if L.pool is not None else x.mean((2, 3), keepdim=True)
        if L.reduce is not None:
            s = mods[L.reduce](s)
        if L.norm is not None:
            s = mods[L.norm](s)
        if L.act is not None:
            s = mods[L.act](s)
        return mods[L.gate](mods[L.expand](s))

    def forward_unfused(self, x: Tensor) -> Tensor:
        """The original forward: the children called in its order (the training path)."""
        s = self._squeeze_modules(x)
        return s * x if self._layout.gate_first else x * s

    # -- fused paths ------------------------------------------------------------------------
    def _fused_plan(self):
        """The plan when the fused ops may run now, else None (training, hooks, unfusable children)."""
        if self._snapshot.changed():  # a child was replaced since the last call
            self._watch()
        if self.training or hooked(self._hooks):
            return None
        plan = traced_constants(self) if torch.compiler.is_compiling() else self._plan()
        if isinstance(plan, str):
            if self._warned != plan:
                warnings.warn(f"effops.SqueezeExcite runs unfused: {plan}", stacklevel=3)
                self._warned = plan
            return None
        return plan

    def _out_dtype(self, x: Tensor, w: Tensor) -> torch.dtype:
        """The dtype PyTorch's SE would return for ``x``: under autocast its gate is in the autocast
        dtype and ``x * gate`` promotes; otherwise the fcs need ``x``'s dtype, as nn.Conv2d does."""
        dev = x.device.type
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) and x.dtype != torch.float64:
            return torch.promote_types(x.dtype, torch.get_autocast_dtype(dev))
        if w.dtype != x.dtype:
            raise TypeError(f"SqueezeExcite: the input is {x.dtype} but the fc weights are {w.dtype}; expected the "
                            "same dtype (as nn.Conv2d)")
        return x.dtype

    def _fused_gate(self, x: Tensor, plan) -> Tensor:
        rw, rb, ew, eb = self._weights()
        act, act_param, gate, gate_param = plan
        args = (x, rw, rb, ew, eb, act, act_param, gate, gate_param)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5])
        if torch.compiler.is_compiling() or needs_grad:
            if not torch.compiler.is_compiling():
                check_se_gate_inputs(*args[:5], act, gate)
            elif not needs_grad and native_fast(x):
                return GATE_NATIVE_OP(*args)  # compiled CPU inference: straight into C++
            return GATE_OP(*args)  # the registered op: traceable, differentiable
        sig = (x.shape, x.dtype, x.device, ew.shape, ew.dtype, None if rw is None else (rw.shape, rw.dtype),
               rb is None, eb is None, act, gate)
        if sig != self._checked:  # eager: validate each new signature once
            check_se_gate_inputs(*args[:5], act, gate)
            self._checked = sig
        if native_fast(x) and type(x) is Tensor and not torch.is_autocast_enabled("cpu"):
            self.__dict__["_native_gate"] = _GatePlan(self, plan, x)
        # Eager inference: the op's implementation without the torch.library layers.
        return dispatch.run("se_gate", *args)

    def _fused_apply(self, x: Tensor, g: Tensor, residual: Optional[Tensor], act: str, act_param: float) -> Tensor:
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, g, residual))
        if torch.compiler.is_compiling() or needs_grad:
            if not torch.compiler.is_compiling():
                check_se_apply_inputs(x, g, residual, act)
            elif not needs_grad and native_fast(x) and g.dtype == torch.float32:
                return APPLY_NATIVE_OP(x, g, residual, act, float(act_param))  # compiled CPU inference
            return APPLY_OP(x, g, residual, act, float(act_param))
        sig = (x.shape, x.dtype, x.device, None if residual is None else (residual.shape, residual.dtype,
                                                                           residual.device), act)
        if sig != self._checked_apply:  # eager: validate each new signature once (g comes from se_gate)
            check_se_apply_inputs(x, g, residual, act)
            self._checked_apply = sig
        return dispatch.run("se_apply", x, g, residual, None, act, float(act_param))

    def _check_input(self, x) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = f"a {x.dim()}-D tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"SqueezeExcite expected a 4-D input (N, C, H, W), got {got}")

    def gate_of(self, x: Tensor) -> Tensor:
        """The gate ``[N, C]`` this module multiplies ``x`` by: float32 (float64 for float64 ``x``).

        Equivalent PyTorch: ``gate(fc2(act(fc1(x.mean((2, 3), keepdim=True))))).flatten(1).float()``.
        Eval: ``effops::se_gate`` (the pool and the excitation of every sample: two launches),
        differentiable. Training (or hooks, or children the ops can't express): the children's own
        math, differentiable, cast to float32. For callers that apply the gate themselves, e.g.
        folded into the next conv's operand load (``FusedConvBNAct(..., gate=se.gate_of(x))``).
        """
        fast = self.__dict__.get("_native_gate")
        if fast is not None and not torch.compiler.is_compiling():  # CPU inference, steady state: see _GatePlan
            g = fast.run(x)
            if g is not None:
                return g
        self._check_input(x)
        plan = self._fused_plan()
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        if plan is None:
            return self._squeeze_modules(x).flatten(1).to(cd)
        self._out_dtype(x, self._weights()[2])
        return self._fused_gate(x, plan)

    def forward(self, x: Tensor) -> Tensor:
        plan = self._fused_plan()
        if plan is None:
            return self.forward_unfused(x)
        self._check_input(x)
        dtype = self._out_dtype(x, self._weights()[2])
        g = self._fused_gate(x, plan)
        return self._fused_apply(x if dtype == x.dtype else x.to(dtype), g, None, "identity", 0.0)

    def forward_residual(self, x: Tensor, residual: Tensor, act: Union[str, nn.Module, None] = "identity",
                         act_param: float = 0.0) -> Tensor:
        """``act(self(x) + residual)``: the SE bottleneck's epilogue (SE-ResNet, ResNet-RS, RegNetY:
        SE, shortcut add, ReLU), in eval one ``effops::se_apply`` pass after the gate.

        Equivalent PyTorch: ``act(se(x) + residual)``. ``act``: an activation name (``act_param``:
        LeakyReLU's slope), an activation module, or None. Where the fused pass can't take the
        arguments (training, hooks, a residual of another shape or dtype, autocast promotion) it
        computes exactly that expression, with PyTorch's broadcasting and type promotion.
        """
        if act is None or isinstance(act, nn.Module):
            spec = activation_of(act)
            if spec is None:
                raise ValueError(f"forward_residual: activation {type(act).__name__} is not supported")
            act, act_param = spec
        check_activation(act)
        plan = self._fused_plan()
        if plan is not None:
            self._check_input(x)
            dtype = self._out_dtype(x, self._weights()[2])
            if dtype == x.dtype and isinstance(residual, Tensor) and residual.shape == x.shape \
                    and residual.dtype == x.dtype and residual.device == x.device:
                return self._fused_apply(x, self._fused_gate(x, plan), residual, act, act_param)
        return apply_activation(self(x) + residual, act, act_param)

    def sums_usable(self, *tensors: Optional[Tensor]) -> bool:
        """Whether :meth:`forward_residual_from_sums` would use given channel sums now: eager
        inference (no torch.compile, nothing needing gradients), fused plan (eval, no hooks),
        no autocast. Callers check it before computing sums nobody would read."""
        if torch.compiler.is_compiling() or self.training or hooked(self._hooks):
            return False
        rw, rb, ew, eb = self._weights()
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rw, rb, ew, eb, *tensors)):
            return False
        return not any(torch.is_autocast_enabled(d) for d in ("cuda", "cpu"))

    def forward_residual_from_sums(self, x: Tensor, psum: Tensor, num_hb: int, residual: Tensor,
                                   act: Union[str, nn.Module, None] = "identity", act_param: float = 0.0) -> Tensor:
        """:meth:`forward_residual` with the squeeze already done: ``psum`` ``[N * num_hb, C]``
        holds per-(image, pixel block) channel sums of ``x`` (from the producing conv's epilogue,
        :func:`effops.ops.conv.conv_bn_act_with_channel_sums`), so the gate is one excitation
        launch (:func:`effops.ops.se.se_gate_from_sums`) and ``x`` is read once, by the apply pass.

        Equivalent PyTorch: ``act(se(x) + residual)``. Where :meth:`sums_usable` is false, or the
        fused pass can't take the arguments, it is :meth:`forward_residual` (``psum`` unused).
        """
        if act is None or isinstance(act, nn.Module):
            spec = activation_of(act)
            if spec is None:
                raise ValueError(f"forward_residual: activation {type(act).__name__} is not supported")
            act, act_param = spec
        check_activation(act)
        if self.sums_usable(x, residual):
            plan = self._fused_plan()
            if plan is not None:
                self._check_input(x)
                rw, rb, ew, eb = self._weights()
                if self._out_dtype(x, ew) == x.dtype and isinstance(residual, Tensor) and residual.shape == x.shape \
                        and residual.dtype == x.dtype and residual.device == x.device:
                    a, a_param, g, g_param = plan
                    gate = se_gate_from_sums(x, psum, num_hb, rw, rb, ew, eb, act=a, act_param=a_param, gate=g,
                                             gate_param=g_param)
                    return self._fused_apply(x, gate, residual, act, act_param)
        return self.forward_residual(x, residual, act, act_param)


def _no_plan():
    return None


class _GatePlan:
    """What :meth:`SqueezeExcite.gate_of` derives from the children on the native CPU path (the
    activations, the layout checks of ``_plan()``, the validated signature), kept after a full call
    checked it: later calls with the same input signature check the guards below, read the fc
    tensors live and make one native call. A failed guard (a child replaced or reconfigured, a hook,
    train mode, another input, autocast, gradients, compiling, a forced backend) returns None: the
    full path runs and rebuilds the plan."""

    __slots__ = ("owner", "snapshot", "hooks", "plan", "live_act", "key", "rp", "ep", "x_shape", "dtype", "sig")

    def __init__(self, owner: "SqueezeExcite", plan, x: Tensor):
        L, mods = owner._layout, owner._modules
        self.owner, self.snapshot, self.hooks, self.plan = owner, owner._snapshot, owner._hooks, plan
        acts = [mods[L.gate]] + ([mods[L.act]] if L.act is not None else [])
        self.live_act = any(type(a) not in _STATIC_ACTS for a in acts)
        self.key = self._key()
        reduce = owner._child(L.reduce)
        self.rp, self.ep = (None if reduce is None else reduce._parameters), mods[L.expand]._parameters
        self.x_shape, self.dtype = x.shape, x.dtype
        self.sig = self._tensor_sig()

    def __reduce__(self):  # copies and pickles of the module rebuild it on their first call
        return (_no_plan, ())

    def _key(self) -> tuple:
        """Every child setting ``_plan()`` reads that a children snapshot doesn't see."""
        owner = self.owner
        L, mods = owner._layout, owner._modules
        key = [] if L.pool is None else [mods[L.pool].output_size]
        for conv in (owner._child(L.reduce), mods[L.expand]):
            if conv is not None:
                key += [conv.kernel_size, conv.groups, conv.padding, conv.in_channels, conv.out_channels]
        return tuple(key)

    def _tensor_sig(self) -> tuple:
        rw, rb, ew, eb = self.owner._weights()
        return (None if rw is None else (rw.shape, rw.dtype)), rb is None, ew.shape, ew.dtype, eb is None

    def run(self, x: Tensor) -> Optional[Tensor]:
        owner = self.owner
        if type(x) is not Tensor or x.dtype is not self.dtype or not x.is_cpu or x.shape != self.x_shape \
                or owner.training or self.snapshot.changed() or hooked(self.hooks) or self._key() != self.key:
            return None
        if self.live_act and owner._plan() != self.plan:
            return None
        if torch.is_autocast_enabled("cpu") or not native_first():
            return None
        rp, ep = self.rp, self.ep
        rw, rb = (None, None) if rp is None else (rp.get("weight"), rp.get("bias"))
        ew, eb = ep["weight"], ep.get("bias")
        if ((None if rw is None else (rw.shape, rw.dtype)), rb is None, ew.shape, ew.dtype, eb is None) != self.sig:
            return None
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, rw, rb, ew, eb)):
            return None
        mod = native_module()
        if mod is None:
            return None
        act, act_param, gate, gate_param = self.plan
        return mod.se_gate(x, rw, rb, ew, eb, act, float(act_param), gate, float(gate_param))


# -- the converter's block rule ------------------------------------------------------------
def _matches(module: nn.Module) -> bool:
    return not isinstance(module, SqueezeExcite) and _layout_of(module) is not None


def _describe(se: SqueezeExcite) -> str:
    act, gate = se.activations
    c, r = se.channels, se.rd_channels
    if r is None:
        return (f"effective squeeze-excite {c}→{c} ({gate} gate): mean pool + fc + {gate} in 2 launches "
                f"(pool, excitation), x·gate in 1")
    return (f"squeeze-excite {c}→{r}→{c} ({act}, {gate} gate): mean pool + fc + {act} + fc + {gate} in 2 launches "
            f"(pool, excitation), x·gate in 1")


register_block_rule(BlockRule("squeeze-excite", _matches, SqueezeExcite.from_module, _describe, SqueezeExcite))
