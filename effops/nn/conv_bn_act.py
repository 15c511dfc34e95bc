"""``FusedConvBNAct``: drop-in for Conv2d → BatchNorm2d → activation."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import dispatch
from ..activations import activation_of, apply_activation, make_activation
from ..ops import reference
from ..native import module as native_module
from ..ops.conv import (DW_PAIR_NATIVE_OP, NATIVE_BN_OP, PAIR_NATIVE_OP, _OP, _out_hw, check_gate, check_inputs, check_shuffle_groups,
                        checked_out, derived_reusable, native_fast, native_first)
from ..views import ChannelView
from .common import (ChildrenSnapshot, DerivedCache, SameObjects, frozen_bn, hook_dicts, hooked, is_batch_norm,
                     timm_bn_act, TracedConfigModule, trace_register, traced_constants, traced_tensors)


def resolve_padding(conv: nn.Conv2d) -> Optional[Tuple[int, int]]:
    """Explicit symmetric padding of ``conv``, or None when the kernel can't express it."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in totals):
            return None  # 'same' with an even receptive field pads asymmetrically
        return (totals[0] // 2, totals[1] // 2)
    return tuple(conv.padding)


def why_not_fusable(conv: nn.Module, bn: Optional[nn.Module], act: Optional[nn.Module]) -> Optional[str]:
    """Why ``(conv, bn, act)`` can't become a FusedConvBNAct, or None if it can."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d (custom forward)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding is fused)"
    if resolve_padding(conv) is None:
        return "padding='same' with an even receptive field pads asymmetrically"
    if bn is not None:
        if not is_batch_norm(bn):
            return f"{type(bn).__name__} is not nn.BatchNorm2d"
        features = bn.running_mean.shape[0] if frozen_bn(bn) else bn.num_features
        if features != conv.out_channels:
            return f"{type(bn).__name__} has {features} features but the conv has {conv.out_channels} outputs"
        if timm_bn_act(bn) and type(bn.drop) is not nn.Identity:
            return "BatchNormAct2d with dropout"
    if act is not None and activation_of(act) is None:
        return f"activation {type(act).__name__} is not supported"
    if bn is not None and timm_bn_act(bn) and activation_of(bn.act) is None:
        return f"activation {type(bn.act).__name__} inside BatchNormAct2d is not supported"
    if _fused_activation(bn, act) is None:
        return f"{type(bn).__name__} applies {type(bn.act).__name__} and {type(act).__name__} follows it: two activations"
    return None


class FusedConvBNAct(TracedConfigModule):
    """Conv2d → BatchNorm2d → activation (→ optional residual), fused in eval mode.

    Equivalent PyTorch::

        nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias),
            nn.BatchNorm2d(out_channels, eps, momentum),      # when norm=True
            act,                                              # nn.ReLU(), nn.SiLU(), ...
        )

    Its ``state_dict`` has the same keys as the modules it replaces
    (``conv.weight``, ``bn.running_mean``, ... by default; ``from_modules``
    keeps any other child names, e.g. ``0``/``1``/``2`` of a Sequential).

    * While the BatchNorm is in training mode: conv → BN (batch statistics,
      running-stat updates) → activation, exactly as PyTorch does.
    * Otherwise (eval, or a frozen BN) the BatchNorm becomes a per-channel scale and
      bias, computed on every call from the live BN parameters and buffers (float32,
      float64 for float64 models) and applied in the kernel's epilogue; the conv weight
      is used as it is. Nothing derived from the parameters is cached, so any change to
      them (in place, through ``.data``, numpy or DLPack, a new tensor) is seen by the
      next call, and a CUDA graph that captured the call replays it with the current
      values. The fused op supports autograd, so gradients reach the conv and BN
      parameters (frozen-BN fine-tuning).
    * Settings are read live too: replacing a child (``fused.act = nn.SiLU()``) or
      changing a conv setting (``fused.conv.padding = (2, 2)``) takes effect on the next
      call; a combination the kernels can't express then runs the modules one after the
      other (exact PyTorch, with a one-time warning saying why). Under torch.compile the
      configuration (conv settings, activation, BN eps) is read once, when Dynamo traces,
      and kept in the graph as a constant (fewer guards per call): a setting changed after
      compiling takes effect after a recompile (``torch._dynamo.reset()``); a replaced
      child or a train/eval switch retraces by itself.

    * While a hook is registered on the conv, the BN or the activation (or a
      global module hook exists), those modules are called one after the other,
      so the hooks fire as they did before fusion.

    ``forward(x, residual=None, residual_after_act=True, *, out=None, gate=None,
    out_shuffle_groups=1)`` optionally adds a residual tensor of the output's shape, after
    (or before) the activation; ``gate`` ([N, C_in], float32 or ``x``'s dtype) scales the
    input per (image, channel) first, as a squeeze-excitation gate does (fused: applied as
    the kernel loads ``x``); ``out_shuffle_groups`` channel-shuffles the result (fused: the
    kernel writes each channel at its shuffled position); ``out`` (a tensor or
    :class:`~effops.ChannelView` of the output's shape, e.g. ``buf[:, 1::2]``) receives
    the result, which is then returned::

        y = modules(x * gate[:, :, None, None], residual)           # gate given
        y = effops.ops.reference.channel_shuffle(y, out_shuffle_groups)
        out.copy_(y); return out                                    # out given

    In eval without gradients the fused kernel writes ``out`` directly; wherever the
    result is computed otherwise (train-mode BN, hooks, unfusable settings, autograd)
    it is copied into ``out`` (a differentiable copy: gradients reach the computation
    through ``out``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, int]],
        stride: Union[int, Tuple[int, int]] = 1,
        padding: Union[int, Tuple[int, int], str, None] = None,
        dilation: Union[int, Tuple[int, int]] = 1,
        groups: int = 1,
        bias: bool = False,
        norm: bool = True,
        act: Union[str, nn.Module, None] = "relu",
        act_param: float = 0.0,
        eps: float = 1e-5,
        momentum: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if padding is None:  # "same"-style padding for odd kernels, as timm does
            k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
            d = (dilation, dilation) if isinstance(dilation, int) else dilation
            padding = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
        kw = dict(device=device, dtype=dtype)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, **kw)
        bn = nn.BatchNorm2d(out_channels, eps, momentum, **kw) if norm else None
        act_mod = act if isinstance(act, nn.Module) else make_activation(act or "identity", act_param)
        self._setup(conv, bn, act_mod, ("conv", "bn", "act"))

    @classmethod
    def from_modules(
        cls,
        conv: nn.Conv2d,
        bn: Optional[nn.BatchNorm2d] = None,
        act: Optional[nn.Module] = None,
        *,
        names: Sequence[Optional[str]] = ("conv", "bn", "act"),
    ) -> "FusedConvBNAct":
        """Wrap existing modules (shared, not copied: weights stay where they are).

        ``names`` are the child names to register them under, so the
        ``state_dict`` keeps the keys of the container being replaced. A timm
        ``BatchNormAct2d`` carries its own activation: pass ``act=None``.
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(conv, bn, act, tuple(names))
        return self

    def _setup(self, conv, bn, act, names):
        if bn is not None and timm_bn_act(bn) and act is not None and type(bn.act) is not nn.Identity:
            # BatchNormAct2d applies its own activation; an extra one is only meaningful
            # (and accepted) when the BN's is Identity, e.g. act(bn(conv(x)) + residual).
            raise ValueError(f"{type(bn).__name__} already applies {type(bn.act).__name__}; "
                             f"can't add {type(act).__name__} after it")
        why = why_not_fusable(conv, bn, act)
        if why is not None:
            raise ValueError(f"cannot fuse {type(conv).__name__} → {type(bn).__name__} → {type(act).__name__}: {why}")
        if len(names) != 3:
            raise ValueError(f"names must be (conv, bn, act) child names, got {names}")
        self.add_module(names[0], conv)
        if bn is not None:
            self.add_module(names[1], bn)
        if act is not None and names[2] is not None:
            self.add_module(names[2], act)
        # Set after add_module: until then the conv/bn properties must not resolve
        # (add_module refuses names that hasattr() already finds).
        self._names = names
        # A traced forward's activation is the owner's child: kept out of _modules
        # (names[2] is None) and read from here.
        self.__dict__["_act_module"] = act
        self._watch()

    def _watch(self) -> None:
        """(Re)collect what forward() watches: the hook registries of the children and a
        snapshot of which module sits in each child slot."""
        mods = [m for m in self._live_modules() if m is not None]
        self._hooks = hook_dicts(mods)
        self._snapshot = ChildrenSnapshot([self] + mods)
        self._checked = None
        self._why_unfused = None
        self._native_plan = None
        trace_register(self)

    def _live_modules(self):
        """``(conv, bn, act)`` as registered now (``act`` may be None: identity)."""
        mods, (nc, nb, na) = self._modules, self._names
        act = mods.get(na) if na is not None else self.__dict__["_act_module"]
        return mods[nc], (mods.get(nb) if nb is not None else None), act

    # Children are looked up by their (possibly original) names.
    @property
    def conv(self) -> nn.Conv2d:
        return self._modules[self._names[0]]

    @property
    def bn(self) -> Optional[nn.BatchNorm2d]:
        return self._modules.get(self._names[1]) if self._names[1] else None

    @property
    def activation(self) -> Tuple[str, float]:
        """``(name, param)`` of the activation applied after the BN, as the modules say now."""
        _, bn, act = self._live_modules()
        return _fused_activation(bn, act) or ("unsupported", 0.0)

    def extra_repr(self) -> str:
        return f"act={self.activation[0]}"

    def _folds(self, bn, stats: Optional[bool] = None) -> bool:
        """Whether ``bn`` folds into the conv now. ``stats``: whether it has running statistics,
        where the caller knows (a trace constant: then they are not read, so not guarded)."""
        if bn is None:
            return True
        if bn.training:
            return frozen_bn(bn)  # a frozen BN uses its running statistics in train() too
        return has_running_stats(bn) if stats is None else stats

    def scale_bias(self, compute_dtype: torch.dtype = torch.float32) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The per-channel ``(scale, bias)`` the eval path applies after the conv, from the
        live BN state (``(None, conv.bias)`` without a BN). Computed on every call (a few
        small ops); differentiable."""
        conv, bn, _ = self._live_modules()
        return _scale_bias(conv, bn, compute_dtype)

    def _reused_scale_bias(self, conv, bn, compute_dtype: torch.dtype, x: Tensor):
        """:meth:`scale_bias` for a forward: derived once per BN state and reused (a GPU runs ~10
        small kernels for it, each a launch of host time that exceeds the conv itself at small
        sizes), where :func:`derived_reusable` allows; computed afresh otherwise."""
        srcs, eps = bn_sources(conv, bn)
        if not derived_reusable(x, srcs):
            return _scale_bias(conv, bn, compute_dtype)
        cache = self.__dict__.get("_scale_bias_cache")
        if cache is None:
            cache = self.__dict__["_scale_bias_cache"] = DerivedCache()
        return cache.get(srcs, lambda: _scale_bias(conv, bn, compute_dtype), (compute_dtype, eps))

    def bn_state(self) -> tuple:
        """``(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)`` as held now, the
        arguments of :func:`effops.ops.reference.bn_scale_bias`; ``(conv_bias,)`` without a BN."""
        conv, bn, _ = self._live_modules()
        return _bn_state(conv, bn)

    def folded_parameters(self, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """The conv with its eval-mode BN folded in: ``(weight * scale, bias)``, weight in
        ``dtype`` (default: the conv's), bias in float32 (float64 for float64 weights).
        For export and inspection; the fused path itself applies the scale in the kernel."""
        w = self.conv.weight
        dtype = dtype or w.dtype
        scale, bias = self.scale_bias(_compute_dtype(w.dtype))
        if scale is not None:
            w = w.to(scale.dtype) * scale.view(-1, 1, 1, 1)
        return w.to(dtype), bias

    def _settings(self, conv, bn, act):
        """The live settings the kernels run with, compared on every call (a few hundred ns)."""
        return (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode, _fused_activation(bn, act))

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, residual_after_act: bool = True, *,
                out: Union[ChannelView, Tensor, None] = None, gate: Optional[Tensor] = None,
                out_shuffle_groups: int = 1) -> Tensor:
        if not torch.compiler.is_compiling():
            plan = self._native_plan
            if plan is not None and out is None:
                # CPU inference, steady state: a few guards and the native call
                y = plan.run(x, residual, residual_after_act, gate, out_shuffle_groups, None)
                if y is not None:
                    return y
        elif out is None:
            # torch.compile on CPU, inference: the native op, configured by graph constants. (Neither
            # the plan nor a default argument is read in the trace: each would be a guard per module.)
            a = self._compiled_native_args(x, gate, True, residual)
            if a is not None:
                w, st, stride, padding, dilation, groups, act, act_param = a
                if out_shuffle_groups != 1:
                    check_shuffle_groups(out_shuffle_groups, w.shape[0])
                return NATIVE_BN_OP(x, w, *st[:6], residual, stride, padding, dilation, groups, act, act_param,
                                    residual_after_act, gate, out_shuffle_groups, st[6])
        return self._forward(x, residual, residual_after_act, out, gate, out_shuffle_groups)

    def _into_trusted(self, x: Tensor, dst: Tensor, gate: Optional[Tensor] = None) -> Tensor:
        """``self(x, out=dst, gate=gate)`` for callers that build ``dst`` themselves as a channel range
        of a fresh buffer disjoint from ``x`` and ``gate`` (FusedGhostModule): the steady-state native
        call skips ``out``'s shape and overlap checks, which hold by construction."""
        plan = self._native_plan
        if plan is not None and not torch.compiler.is_compiling():
            y = plan.run(x, None, True, gate, 1, dst)
            if y is not None:
                return y
        return self(x, out=dst, gate=gate)

    def _compiled_native(self, x: Tensor, gate: Optional[Tensor] = None) -> Optional[Tensor]:
        """Under torch.compile, CPU inference: ``self(x, gate=gate)`` as the functional native op, for
        an owner that watches this unit's children and hooks itself (FusedGhostModule: its snapshot
        and hook registries cover them), so the trace carries no second copy of those checks (each
        is a guard evaluated on every call). None where another path of ``forward`` applies."""
        a = self._compiled_native_args(x, gate, True, None)
        if a is None:
            return None
        w, st, stride, padding, dilation, groups, act, act_param = a
        return NATIVE_BN_OP(x, w, *st[:6], None, stride, padding, dilation, groups, act, act_param, True, gate, 1,
                            st[6])

    def _compiled_native_args(self, x: Tensor, gate: Optional[Tensor] = None, check: bool = True,
                              residual: Optional[Tensor] = None) -> Optional[tuple]:
        """``(weight, bn args, stride, padding, dilation, groups, act, act_param)`` of
        :meth:`_compiled_native`, or None where another path of ``forward`` applies (a child replaced,
        a hook, unfusable settings, a train-mode BN, gradients, autocast, not the native backend);
        ``check=False``: ``x``'s shape was settled by the owner (FusedGhostModule's cheap conv, reading
        the primary conv's output). The configuration comes from :meth:`_trace_constants`, a constant
        of the trace; the tensors and the BN's mode are read live."""
        if not native_fast(x) or torch.is_autocast_enabled("cpu"):
            return None
        c = traced_constants(self)  # None also where a child was replaced
        if c is None:
            return None
        conv_name, bn_name, affine_in_buffers, frozen, stride, padding, dilation, groups, act, act_param, eps, _ = c
        mods = self._modules
        bn = None if bn_name is None else mods[bn_name]
        if bn is not None and bn.training and not frozen:
            return None  # batch statistics: nothing to fold
        t = traced_tensors(self)
        if t is not None:  # inductor freezing: the tensors are constants of the graph, unguarded
            w, st = t
        else:  # read live: dynamo guards each tensor and the module chain that reaches it
            conv = mods[conv_name]
            cp = conv._parameters
            w, cb = cp["weight"], cp["bias"]
            if bn is None:
                st = (cb, None, None, None, None, 0.0, None)
            else:
                bb = bn._buffers
                affine = bb if affine_in_buffers else bn._parameters
                st = (cb, affine["weight"], affine["bias"], bb["running_mean"], bb["running_var"], eps,
                      bb.get("num_batches_tracked"))
            if torch.is_grad_enabled() and _any_requires_grad(x, w, residual, gate, conv, bn):
                return None
        if w.dtype != x.dtype:
            return None
        if check:
            check_inputs(x, w, None, None, residual, stride, padding, dilation, groups, act)
        if gate is not None:
            check_gate(gate, x, w.shape[1] * groups)
        return (w, st, stride, padding, dilation, groups, act, act_param)

    def _trace_constants(self) -> Optional[tuple]:
        """This unit's configuration as a traced native call takes it: ``(conv name, BN name,
        BN affine tensors are buffers, frozen BN, stride, padding, dilation, groups, act, act_param,
        eps, weight shape)`` as lists and numbers, or None where the fused op can't run it (a child replaced,
        unfusable settings, a BN without running statistics, a hook watching). Under torch.compile it
        is read once, while Dynamo traces (:func:`~effops.nn.common.traced_constants`)."""
        if self._snapshot.changed():  # (in a trace: checked here once, retraced on a replacement)
            return None
        conv, bn, act_mod = self._live_modules()
        if why_not_fusable(conv, bn, act_mod) is not None or hooked(self._hooks):
            return None
        if "bias" not in conv._parameters:
            return None
        frozen, in_buffers, eps = False, False, 0.0
        if bn is not None:
            if not has_running_stats(bn):
                return None
            bb = bn._buffers
            frozen = frozen_bn(bn)
            in_buffers = "weight" not in bn._parameters
            affine = bb if in_buffers else bn._parameters
            if "weight" not in affine or "bias" not in affine:
                return None
            eps = float(bn.eps)
        act, act_param = _fused_activation(bn, act_mod)
        return (self._names[0], None if bn is None else self._names[1], in_buffers, frozen, list(conv.stride),
                list(resolve_padding(conv)), list(conv.dilation), int(conv.groups), act, float(act_param), eps,
                tuple(conv._parameters["weight"].shape))

    def _trace_tensors(self) -> tuple:
        """``(weight, native BN args)`` as :meth:`_compiled_native_args` passes them, for a trace
        under inductor's freezing (:func:`~effops.nn.common.traced_tensors` hands the trace aliases)."""
        conv, bn, _ = self._live_modules()
        return conv._parameters["weight"], _native_bn_args(conv, bn)

    def _forward(self, x, residual, residual_after_act, out, gate, out_shuffle_groups):
        if self._snapshot.changed():  # a child was replaced since the last call
            self._watch()
        conv, bn, act_mod = self._live_modules()
        if hooked(self._hooks) and self._modules_compute_it(bn, residual, residual_after_act):
            return _into(self._forward_modules(_gated(x, gate), residual, residual_after_act), out,
                         out_shuffle_groups)
        dev = x.device.type if isinstance(x, Tensor) else "cpu"
        if isinstance(x, Tensor) and dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) \
                and x.dtype != torch.float64:  # autocast leaves float64 tensors alone
            dtype = torch.get_autocast_dtype(dev)
            if residual is not None and residual.dtype != dtype and self._modules_compute_it(bn, residual,
                                                                                              residual_after_act):
                # PyTorch adds an autocast-dtype conv output to a wider residual in the wider
                # dtype (type promotion), and so returns that dtype: run the modules to match.
                return _into(self._forward_modules(_gated(x, gate), residual, residual_after_act), out,
                             out_shuffle_groups)
            x = x.to(dtype)
            residual = None if residual is None else residual.to(dtype)
        else:
            dtype = conv.weight.dtype
        settings = self._settings(conv, bn, act_mod)
        w = conv._parameters["weight"]
        compiling = torch.compiler.is_compiling()
        sig = None if compiling or not isinstance(x, Tensor) else (
            settings, x.shape, x.dtype, x.device, w.shape, w.device, w.dtype,
            None if residual is None else (residual.shape, residual.dtype, residual.device),
            None if gate is None else (gate.shape, gate.dtype, gate.device), out_shuffle_groups)
        if sig is None or sig != self._checked:  # eager: validate each new signature once
            why = why_not_fusable(conv, bn, act_mod)
            if not compiling:  # (an attribute written while compiling is a side effect replayed every call)
                self._why_unfused = why
            if why is not None:
                warnings.warn(f"effops.FusedConvBNAct runs unfused: {why}", stacklevel=2)
            else:
                check_inputs(x, _cast(w, dtype), None, None, residual, conv.stride, resolve_padding(conv),
                             conv.dilation, conv.groups, settings[-1][0])
            if gate is not None:
                check_gate(gate, x, w.shape[1] * conv.groups)
            if out_shuffle_groups != 1:
                check_shuffle_groups(out_shuffle_groups, w.shape[0])
            if sig is not None:
                self._checked = sig
        else:
            why = self._why_unfused
        if why is not None:
            if not self._modules_compute_it(bn, residual, residual_after_act):
                raise ValueError(f"effops.FusedConvBNAct can't add a residual before the activation here: {why}")
            return _into(self._forward_modules(_gated(x, gate), residual, residual_after_act), out, out_shuffle_groups)
        if not self._folds(bn):
            return _into(self._forward_unfused(_gated(x, gate), _cast(w, dtype), residual, residual_after_act), out,
                         out_shuffle_groups)
        if compiling and out is None and native_fast(x) and not (torch.is_grad_enabled() and _any_requires_grad(
                x, w, residual, gate, conv, bn)):
            # torch.compile on CPU, inference: the native op with the BN's own tensors (a scale and
            # bias computed in the graph would be new tensors every call: repacked every call).
            st = _native_bn_args(conv, bn)
            act, act_param = settings[-1]
            return NATIVE_BN_OP(x, w, *st[:6], residual, list(conv.stride), list(resolve_padding(conv)),
                                list(conv.dilation), conv.groups, act, float(act_param), residual_after_act, gate,
                                out_shuffle_groups, st[6])
        if not compiling and native_fast(x) and not (torch.is_grad_enabled() and _any_requires_grad(
                x, w, residual, gate, conv, bn)):
            # CPU inference: the native backend folds the BN into a prepacked weight itself and
            # caches it (keyed by the live tensors' identities and versions), so nothing is
            # computed here per call.
            dst = None if out is None else checked_out(out, x, w, None, None, residual, conv.stride,
                                                       resolve_padding(conv), conv.dilation, gate)
            st = _native_bn_args(conv, bn)
            act, act_param = settings[-1]
            if sig is not None and dtype == x.dtype and type(x) is Tensor and not torch.is_autocast_enabled("cpu"):
                # Everything checked above holds for further calls with this signature while the
                # plan's guards do: they take the short path.
                self._native_plan = _NativePlan(self, conv, bn, act_mod, settings, x, w, residual, gate,
                                                out_shuffle_groups)
            return native_module().conv_bn_act(x, w, *st[:6], residual, dst, conv.stride, resolve_padding(conv),
                                               conv.dilation, conv.groups, act, act_param, residual_after_act,
                                               gate, out_shuffle_groups, st[6])
        scale, bias = self._reused_scale_bias(conv, bn, _compute_dtype(dtype), x)
        act, act_param = settings[-1]
        args = (x, _cast(w, dtype), scale, bias, residual, conv.stride, resolve_padding(conv), conv.dilation,
                conv.groups, act, act_param, residual_after_act)
        extras = gate is not None or out_shuffle_groups != 1
        if compiling or (torch.is_grad_enabled() and (any(t is not None and t.requires_grad for t in args[:5])
                                                      or (gate is not None and gate.requires_grad))):
            # The registered op: traceable, differentiable (a given ``out`` receives a recorded copy).
            y = _OP(*args, gate, out_shuffle_groups) if extras else _OP(*args)
            return y if out is None else _into(y, out)
        # Eager inference: run the op's implementation without the torch.library
        # layers (they cost more host time than a small conv takes on the GPU).
        if out is not None or extras:
            dst = None if out is None else checked_out(out, x, args[1], scale, bias, residual, *args[5:8], gate)
            return dispatch.run("conv_bn_act", x, args[1], scale, bias, residual, dst, *args[5:], gate,
                                out_shuffle_groups)
        return dispatch.run("conv_bn_act", x, args[1], scale, bias, residual, None, *args[5:])

    def native_segments(self, segments, residual: Optional[Tensor] = None, residual_after_act: bool = True,
                        pool: Optional[Tensor] = None) -> Tensor:
        """``self(torch.cat(segments, 1), residual, residual_after_act)`` on the native CPU backend,
        for a 1×1 stride-1 conv in eval: GEMMs over the segments where they lie (no concat), the
        BN folded into a cached weight. ``pool`` (float32 ``[N, C_out]``): filled with the result's
        per-image channel means (``y.mean((2, 3))``), summed as the GEMM stores its tiles. Callers
        check the conditions (FusedOSA, AggregateStep)."""
        conv, bn, act_mod = self._live_modules()
        st = _native_bn_args(conv, bn)
        act, act_param = self._settings(conv, bn, act_mod)[-1]
        return native_module().conv_bn_act_segments(list(segments), conv._parameters["weight"], *st[:6], residual,
                                                    None, act, act_param, residual_after_act, st[6], pool)

    def _modules_compute_it(self, bn, residual, residual_after_act) -> bool:
        # A timm BatchNormAct2d applies its own activation, so calling it can't put a
        # residual before that activation (a combination only direct callers can ask for).
        return residual is None or residual_after_act or bn is None or not timm_bn_act(bn) \
            or type(bn.act) is nn.Identity

    def _forward_modules(self, x, residual, residual_after_act):
        """The original modules, called one after the other: the path taken while a hook
        watches one of them (so it sees exactly what it saw before ``optimize()``) or when
        the live settings can't be fused. Same math as the other paths, without fusion."""
        conv, bn, act = self._live_modules()
        y = conv(x)
        if bn is not None:
            if y.shape[0] == 0:
                return y  # as _forward_unfused: an empty batch leaves the running stats alone
            y = bn(y)  # a timm BatchNormAct2d applies its own activation here
        return reference.add_residual_around(y, act, residual, residual_after_act)

    def _forward_unfused(self, x, w, residual, residual_after_act):
        # BatchNorm in training mode: batch statistics, so nothing can be folded.
        # Exactly PyTorch's own modules (nn.BatchNorm2d.forward also for timm's
        # BatchNormAct2d, whose activation is applied below like any other).
        conv, bn, act = self._live_modules()
        b = conv.bias if conv.bias is None or conv.bias.dtype == w.dtype else conv.bias.to(w.dtype)
        y = torch.nn.functional.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        if y.shape[0] == 0:
            return y  # batch statistics of an empty batch are undefined; leave running stats alone
        y = nn.BatchNorm2d.forward(bn, y)
        name, param = _fused_activation(bn, act)
        return reference.add_residual_around(y, lambda t: apply_activation(t, name, param), residual, residual_after_act)


# Activation modules whose (name, param) follows from their type alone: a plan built with one needs
# no per-call look at it (replacing the module is seen by the children snapshot).
_STATIC_ACTS = (type(None), nn.Identity, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid)


def live_activation(bn: Optional[nn.Module], act_mod: Optional[nn.Module]) -> bool:
    """Whether the activation fused after ``bn`` has settings a call must read live (e.g. a
    LeakyReLU's slope), rather than being fixed by the module types (ReLU, Hardswish...)."""
    inner = bn._modules.get("act") if bn is not None and timm_bn_act(bn) else None
    return type(act_mod) not in _STATIC_ACTS or type(inner) not in _STATIC_ACTS


# What a conv's native call depends on besides its tensors (read from the instance dict).
_CONV_ATTRS = ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size", "in_channels",
               "out_channels", "transposed", "output_padding")


def conv_reads(conv: nn.Module, bn: Optional[nn.Module]) -> list:
    """The ``(dict, key)`` reads behind a conv's (and its BN's) native arguments: settings, train
    mode and eps in the instance dicts, every parameter and buffer."""
    reads = [(conv.__dict__, a) for a in _CONV_ATTRS if a in conv.__dict__]
    reads += [(conv._parameters, k) for k in conv._parameters]
    if bn is not None:
        reads += [(bn.__dict__, "training"), (bn.__dict__, "eps")]
        reads += [(bn._parameters, k) for k in bn._parameters] + [(bn._buffers, k) for k in bn._buffers]
    return reads


def _no_plan():
    return None


class _NativePlan:
    """What an eager CPU inference call of a :class:`FusedConvBNAct` derives from its configuration
    (resolved padding, activation, the validated input signature, where its tensors live), kept
    after a full call has checked it all, so the next calls with the same signature are: the guards
    below, the live tensors read from their dicts, one native call. Any guard that fails (a child
    replaced, a hook, a changed conv setting or activation parameter, train mode, another input
    shape or dtype, autocast, gradients, a forced backend, compiling) returns None and the full
    path runs (and rebuilds the plan). The tensors are read on every call, never held, so
    parameter replacement and in-place updates are seen as before (the native weight cache keys
    on identities and versions)."""

    __slots__ = ("snapshot", "hooks", "conv", "bn", "act_mod", "live_act", "frozen", "cp", "bp", "bb", "settings",
                 "stride", "pad", "dilation", "groups", "act", "act_param", "dtype", "x_shape", "w_shape",
                 "out_shape", "gate_shape", "shuffle", "kernel_size", "fast")

    def __init__(self, owner, conv, bn, act_mod, settings, x, w, residual, gate, out_shuffle_groups):
        self.snapshot, self.hooks = owner._snapshot, owner._hooks
        self.conv, self.bn, self.act_mod = conv, bn, act_mod
        self.live_act = live_activation(bn, act_mod)
        self.frozen = frozen_bn(bn)
        self.cp = conv._parameters
        self.bp, self.bb = (None, None) if bn is None else (bn._parameters, bn._buffers)
        self.settings = settings[:5]
        self.stride, self.pad, self.dilation, self.groups = conv.stride, resolve_padding(conv), conv.dilation, \
            conv.groups
        self.act, self.act_param = settings[-1]
        self.dtype, self.x_shape, self.w_shape = x.dtype, x.shape, w.shape
        oh, ow = _out_hw(x.shape[2], x.shape[3], w.shape[2:], self.stride, self.pad, self.dilation)
        self.out_shape = (x.shape[0], w.shape[0], oh, ow)
        self.gate_shape = (x.shape[0], w.shape[1] * conv.groups)
        self.shuffle = out_shuffle_groups
        self.kernel_size = conv.kernel_size
        self.fast = None  # SameObjects of live_args' last full answer (its reads and its tensors)

    def exact_residual(self, x, r) -> bool:
        """True when ``r`` is, for certain, a residual of exactly this conv's output shape and ``x``'s
        dtype (False: not known here; the caller works it out)."""
        conv = self.conv
        return type(r) is Tensor and type(x) is Tensor and r.dtype is x.dtype and x.shape == self.x_shape \
            and r.shape == self.out_shape and not self.snapshot.changed() and conv.kernel_size == self.kernel_size \
            and (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode) == self.settings

    def __reduce__(self):  # copies and pickles of the module rebuild it on their first call
        return (_no_plan, ())

    def run(self, x, residual, residual_after_act, gate, out_shuffle_groups, out):
        """The native call's result, or None where the full path must run. Callers check first that
        torch.compile isn't tracing (it must not trace this)."""
        if type(x) is not Tensor or x.dtype is not self.dtype or not x.is_cpu or x.shape != self.x_shape:
            return None
        a = self.live_args(x, residual, gate, out_shuffle_groups)
        if a is None:
            return None
        w, cb, bw, bb_, rm, rv, eps, counter = a
        return native_module().conv_bn_act(x, w, cb, bw, bb_, rm, rv, eps, residual, out, self.stride, self.pad,
                                           self.dilation, self.groups, self.act, self.act_param, residual_after_act,
                                           gate, out_shuffle_groups, counter)

    def live_args(self, x, residual=None, gate=None, out_shuffle_groups=1):
        """``(weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, num_batches_tracked)``
        as held now, for a native call on an input of the planned shape and dtype (the caller checked
        that, or built the input itself: :class:`PointwiseDepthwise`); None where a guard fails.
        ``x`` is read only for whether it requires grad.

        Steady state (no gradient mode): the last full answer, while every dict slot it was read
        from (the conv's settings and tensors, the BN's train flag, eps and tensors) holds the same
        object (:class:`~effops.nn.common.SameObjects`) and the weight still has its dtype, device
        and shape (``param.data = t`` keeps the object): a flat list of dict reads instead of the
        checks below, which run from cold caches after the previous kernel (MobileNetV2 forward:
        3.69 against 3.90 ms, timed once in one process, alternating)."""
        if self.snapshot.changed() or hooked(self.hooks):
            return None
        f = self.fast
        if f is not None and not torch.is_grad_enabled() and out_shuffle_groups == self.shuffle \
                and type(out_shuffle_groups) is int and f.current():
            a = f.payload
            w = a[0]
            if w.dtype is self.dtype and w.is_cpu and w.shape == self.w_shape \
                    and (residual is None or (type(residual) is Tensor and residual.dtype is self.dtype
                                              and residual.is_cpu and residual.shape == self.out_shape)) \
                    and (gate is None or (type(gate) is Tensor and gate.is_cpu and gate.shape == self.gate_shape
                                          and (gate.dtype is torch.float32 or gate.dtype is self.dtype))) \
                    and not torch.is_autocast_enabled("cpu") and native_first():
                return a
        conv = self.conv
        if (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode) != self.settings:
            return None
        if out_shuffle_groups != self.shuffle or type(out_shuffle_groups) is not int:
            return None
        if residual is not None and (type(residual) is not Tensor or residual.dtype is not self.dtype
                                     or not residual.is_cpu or residual.shape != self.out_shape):
            return None
        if gate is not None and (type(gate) is not Tensor or not gate.is_cpu or gate.shape != self.gate_shape
                                 or (gate.dtype is not torch.float32 and gate.dtype is not self.dtype)):
            return None
        w = self.cp["weight"]
        if w is None or w.dtype is not self.dtype or not w.is_cpu or w.shape != self.w_shape:
            return None
        bn = self.bn
        if self.live_act and _fused_activation(bn, self.act_mod) != (self.act, self.act_param):
            return None
        if torch.is_autocast_enabled("cpu") or not native_first():
            return None
        if bn is None:
            cb, bw, bb_, rm, rv, eps, counter = self.cp.get("bias"), None, None, None, None, 0.0, None
        else:
            buffers, params = self.bb, self.bp
            rm, rv = buffers.get("running_mean"), buffers.get("running_var")
            if rm is None or rv is None or (bn.training and not self.frozen):
                return None
            cb = self.cp.get("bias")
            bw, bb_ = params.get("weight", buffers.get("weight")), params.get("bias", buffers.get("bias"))
            eps, counter = bn.eps, buffers.get("num_batches_tracked")
        if torch.is_grad_enabled() and _any_requires_grad(x, w, residual, gate, conv, bn):
            return None
        if native_module() is None:
            return None
        a = w, cb, bw, bb_, rm, rv, eps, counter
        if not self.live_act:
            self.fast = SameObjects(conv_reads(conv, bn), a)
        return a


class PointwiseDepthwise:
    """An expand 1×1 conv unit followed by a depthwise conv unit (the first two convs of an inverted
    residual block: MobileNetV2 / V3, EfficientNet), both :class:`FusedConvBNAct`. Equivalent PyTorch::

        dw(pw(x))

    On the native CPU backend in eval, once each unit has run once and planned its calls, the pair is
    one native call (``pointwise_depthwise_bn_act``) that computes the expanded tensor a band of rows
    at a time per thread into a buffer that stays in the core's cache (for expand convs of up to 128
    input channels; the backend's pair policy, docs/architecture.md): the expanded tensor, the
    block's largest, is never written out. Everything
    else (the first calls, a hook on either unit or a module inside it, train mode, gradients,
    another input signature, torch.compile, other backends) calls ``dw(pw(x))``.

    A plain object, not a module: its units stay registered where they were."""

    __slots__ = ("pw", "dw", "hooks")

    def __init__(self, pw: "FusedConvBNAct", dw: "FusedConvBNAct"):
        self.pw, self.dw = pw, dw
        # the units' own hooks (calling them as modules would run these) and their children's
        self.hooks = hook_dicts([pw, dw])

    @staticmethod
    def applies(pw, dw) -> bool:
        """Whether ``dw(pw(x))`` has the shape of an expand → depthwise pair (read once, when a plan
        is built; the units' plans check the live settings on every call)."""
        if not (isinstance(pw, FusedConvBNAct) and isinstance(dw, FusedConvBNAct)):
            return False
        a, b = pw.conv, dw.conv
        return tuple(a.kernel_size) == (1, 1) and tuple(a.stride) == (1, 1) and a.groups == 1 \
            and resolve_padding(a) == (0, 0) and b.groups == b.in_channels == b.out_channels == a.out_channels \
            and b.kernel_size[0] <= 5 and b.kernel_size[1] <= 5

    def __call__(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return self._compiled(x)
        pa, pb = self.pw._native_plan, self.dw._native_plan
        if pa is not None and pb is not None and type(x) is Tensor and x.dtype is torch.float32 \
                and x.dtype is pa.dtype and pb.dtype is pa.dtype and x.is_cpu and x.shape == pa.x_shape \
                and pb.x_shape == pa.out_shape and not hooked(self.hooks):
            a = pa.live_args(x)
            b = None if a is None else pb.live_args(x)
            if b is not None:
                return native_module().pointwise_depthwise_bn_act(
                    x, a[0], *a[1:8], pa.act, pa.act_param, b[0], *b[1:8], pb.stride, pb.pad, pb.dilation, pb.act,
                    pb.act_param)
        return self.dw(self.pw(x))

    def _compiled(self, x: Tensor) -> Tensor:
        """Under torch.compile on CPU, inference: one functional pair op (the expanded tensor stays
        banded in the compiled model too); ``dw(pw(x))`` wherever the units would not run their
        native ops (their own ``_compiled_native_args`` decide) or the live settings are no longer a
        pair."""
        pw, dw = self.pw, self.dw
        if type(x) is Tensor and x.dtype is torch.float32 and not hooked(self.hooks):
            a = pw._compiled_native_args(x, None, True, None)
            b = None if a is None else dw._compiled_native_args(x, None, False, None)
            if b is not None and tuple(a[0].shape[2:]) == (1, 1) and a[2:6] == ([1, 1], [0, 0], [1, 1], 1) \
                    and a[0].shape[1] == x.shape[1] and b[0].shape[0] == b[5] == a[0].shape[0] and b[0].shape[1] == 1:
                (w1, st1, *_, act1, p1), (w2, st2, stride, padding, dilation, _, act2, p2) = a, b
                return PAIR_NATIVE_OP(x, w1, *st1[:6], st1[6], act1, p1, w2, *st2[:6], st2[6], stride, padding,
                                      dilation, act2, p2)
        return dw(pw(x))


def _plain_depthwise(m) -> bool:
    """A bare depthwise ``nn.Conv2d`` (no BN or activation after it to fuse: timm's
    SeparableConvNormAct, VoVNet-dw's stem), which a :class:`DepthwisePointwise` can run."""
    return type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels and m.padding_mode == "zeros" \
        and resolve_padding(m) is not None and m.kernel_size[0] <= 5 and m.kernel_size[1] <= 5 \
        and m.stride[0] <= 2 and m.stride[1] <= 2


class DepthwisePointwise:
    """A depthwise conv (a :class:`FusedConvBNAct`, or a bare depthwise ``nn.Conv2d``) followed by a
    1×1 conv unit (a :class:`FusedConvBNAct`): a depthwise-separable conv (VoVNet-dw's stem and
    stages, MobileNet's first block). Equivalent PyTorch::

        pw(dw(x))            # pw(dw(x), residual) where a residual is given

    On the native CPU backend in eval, once the 1×1 unit has run once and planned its calls, the pair
    is one native call (``depthwise_pointwise_bn_act``) that computes the depthwise output a band of
    rows at a time per thread into a buffer the GEMM reads from the core's cache (where that is
    measured faster for the problem than the two convs one after the other): the depthwise output
    is never written out. Everything else (the first call, a hook on either unit or a module inside
    it, train mode, gradients, another input signature, other dtypes and backends) calls the two
    units; under torch.compile the pair is one functional op (``effops::depthwise_pointwise_native``).

    A plain object, not a module: its units stay registered where they were."""

    __slots__ = ("dw", "pw", "hooks", "__weakref__")

    def __init__(self, dw: nn.Module, pw: "FusedConvBNAct"):
        self.dw, self.pw = dw, pw
        self.hooks = hook_dicts([dw, pw])
        trace_register(self)

    def __getstate__(self):
        return {"dw": self.dw, "pw": self.pw, "hooks": self.hooks}

    def __setstate__(self, state):  # deepcopy / unpickle: a pair of its own for traces
        self.dw, self.pw, self.hooks = state["dw"], state["pw"], state["hooks"]
        trace_register(self)

    def _trace_constants(self) -> Optional[tuple]:
        """A bare depthwise conv's ``(stride, padding, dilation, channels)`` as lists and numbers, or
        None where it is not one a pair can run. Under torch.compile read once, while Dynamo traces
        (:func:`~effops.nn.common.traced_constants`): each setting read in the trace would be a guard
        evaluated on every call; as with the fused units, a setting changed after compiling is seen
        after a recompile."""
        dw = self.dw
        if not _plain_depthwise(dw):
            return None
        return list(dw.stride), list(resolve_padding(dw)), list(dw.dilation), int(dw.in_channels)

    @staticmethod
    def applies(dw, pw) -> bool:
        """Whether ``pw(dw(x))`` has the shape of a depthwise → 1×1 pair (read once, when a plan is
        built; every call checks the live settings again)."""
        if not isinstance(pw, FusedConvBNAct):
            return False
        if isinstance(dw, FusedConvBNAct):
            dconv = dw.conv
        elif _plain_depthwise(dw):
            dconv = dw
        else:
            return False
        b = pw.conv
        return dconv.groups == dconv.in_channels == dconv.out_channels == b.in_channels \
            and dconv.kernel_size[0] <= 5 and dconv.kernel_size[1] <= 5 and _pointwise(b)

    def __call__(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if torch.compiler.is_compiling():
            return self._compiled(x, residual)
        y = self.native(x, residual)
        return y if y is not None else self._units(x, residual)

    def _units(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        y = self.dw(x)
        return self.pw(y) if residual is None else self.pw(y, residual)

    def _dw_args(self, x: Tensor, shape=None) -> Optional[tuple]:
        """The depthwise conv's ``(weight, bn args..., stride, padding, dilation, act, act_param)`` as
        held now, for an eager native call on an input of ``shape`` (default ``x.shape``; ``x`` is
        read for whether it requires grad); None where a guard fails."""
        shape = x.shape if shape is None else shape
        dw = self.dw
        if isinstance(dw, FusedConvBNAct):
            pa = dw._native_plan
            if pa is None or shape != pa.x_shape:
                return None
            a = pa.live_args(x)
            if a is None:
                return None
            return a + (pa.stride, pa.pad, pa.dilation, pa.act, pa.act_param)
        return self._bare_dw_args(x, self._trace_constants(), shape[1])

    def _bare_dw_args(self, x: Tensor, cfg: Optional[tuple], channels_in: int) -> Optional[tuple]:
        """``_dw_args`` for a bare depthwise conv with settings ``cfg`` (:meth:`_trace_constants`:
        read now in eager calls, a graph constant under torch.compile); its tensors are read live."""
        if cfg is None:
            return None
        stride, padding, dilation, channels = cfg
        w = self.dw._parameters["weight"]
        if not isinstance(w, Tensor) or w.dtype is not torch.float32 or not w.is_cpu or channels != channels_in:
            return None
        b = self.dw._parameters.get("bias")
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
            return None
        return (w, b, None, None, None, None, 0.0, None, stride, padding, dilation, "identity", 0.0)

    def native_args(self, x: Tensor, shape, residual: Optional[Tensor] = None) -> Optional[tuple]:
        """``depthwise_pointwise_bn_act``'s arguments after its input, for a float32 CPU input of
        ``shape`` (``x``: read for whether it requires grad), as held now; None where a guard fails
        (the units must run)."""
        pb = self.pw._native_plan
        if pb is None or pb.dtype is not torch.float32 or len(shape) != 4 or hooked(self.hooks):
            return None
        a = self._dw_args(x, shape)
        if a is None:
            return None
        stride, pad, dilation = a[8], a[9], a[10]
        oh, ow = _out_hw(shape[2], shape[3], a[0].shape[2:], stride, pad, dilation)
        if pb.x_shape != (shape[0], shape[1], oh, ow) or tuple(pb.kernel_size) != (1, 1) or pb.groups != 1 \
                or tuple(pb.stride) != (1, 1) or pb.pad != (0, 0) or tuple(pb.dilation) != (1, 1) or pb.shuffle != 1:
            return None
        b = pb.live_args(x, residual)
        if b is None:
            return None
        return (*a[:8], stride, pad, dilation, a[11], a[12], *b, pb.act, pb.act_param, residual)

    def native(self, x: Tensor, residual: Optional[Tensor] = None) -> Optional[Tensor]:
        """The pair as one eager native call, or None where it does not apply (the caller runs the
        units)."""
        if type(x) is not Tensor or x.dtype is not torch.float32 or not x.is_cpu:
            return None
        a = self.native_args(x, x.shape, residual)
        return None if a is None else native_module().depthwise_pointwise_bn_act(x, *a)

    def _compiled(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        """Under torch.compile on CPU, inference: one functional pair op; the two units wherever they
        would not run their native ops (their own checks decide)."""
        dw, pw = self.dw, self.pw
        if type(x) is Tensor and x.dtype is torch.float32 and x.dim() == 4 and not hooked(self.hooks) \
                and (residual is None or (type(residual) is Tensor and residual.dtype is torch.float32)):
            if isinstance(dw, FusedConvBNAct):
                a = dw._compiled_native_args(x, None, True, None)
                if a is not None and a[5] == x.shape[1] == a[0].shape[0] and a[0].shape[1] == 1:
                    w1, st1, stride, padding, dilation, _, act1, p1 = a
                    a = (w1, *st1, stride, padding, dilation, act1, p1)
                else:
                    a = None
            else:
                a = self._bare_dw_args(x, traced_constants(self), x.shape[1]) \
                    if native_fast(x) and not torch.is_autocast_enabled("cpu") else None
            if a is not None:
                oh, ow = _out_hw(x.shape[2], x.shape[3], a[0].shape[2:], a[8], a[9], a[10])
                b = pw._compiled_native_args(x, None, False, None)
                if b is not None and b[0].shape[1] == x.shape[1] and tuple(b[0].shape[2:]) == (1, 1) \
                        and b[2:6] == ([1, 1], [0, 0], [1, 1], 1) \
                        and (residual is None or tuple(residual.shape) == (x.shape[0], b[0].shape[0], oh, ow)):
                    w2, st2, *_, act2, p2 = b
                    return DW_PAIR_NATIVE_OP(x, *a, w2, *st2[:6], st2[6], act2, p2, residual)
        return self._units(x, residual)


def _pointwise(conv) -> bool:
    return tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1) and conv.groups == 1 \
        and resolve_padding(conv) == (0, 0) and tuple(conv.dilation) == (1, 1)


def pair_steps(steps: list) -> list:
    """``steps`` (callables applied one after another) with each expand → depthwise pair of fused
    units replaced by one :class:`PointwiseDepthwise`, and each depthwise → 1×1 pair by one
    :class:`DepthwisePointwise`."""
    out, i = [], 0
    while i < len(steps):
        if i + 1 < len(steps) and PointwiseDepthwise.applies(steps[i], steps[i + 1]):
            out.append(PointwiseDepthwise(steps[i], steps[i + 1]))
            i += 2
        elif i + 1 < len(steps) and DepthwisePointwise.applies(steps[i], steps[i + 1]):
            out.append(DepthwisePointwise(steps[i], steps[i + 1]))
            i += 2
        else:
            out.append(steps[i])
            i += 1
    return out


def _any_requires_grad(x, w, residual, gate, conv, bn) -> bool:
    if x.requires_grad or w.requires_grad or (residual is not None and residual.requires_grad) \
            or (gate is not None and gate.requires_grad):
        return True
    cb = conv._parameters.get("bias")
    if cb is not None and cb.requires_grad:
        return True
    return bn is not None and any(p.requires_grad for p in bn._parameters.values() if p is not None)


def has_running_stats(bn: nn.Module) -> bool:
    buffers = bn._buffers
    return buffers.get("running_mean") is not None and buffers.get("running_var") is not None


def _bn_state(conv: nn.Conv2d, bn: Optional[nn.Module]) -> tuple:
    cb = conv._parameters.get("bias")
    if bn is None:
        return (cb,)
    # Affine weights are parameters in BatchNorm2d, buffers in FrozenBatchNorm2d.
    bp, bb = bn._parameters, bn._buffers
    return (cb, bp.get("weight", bb.get("weight")), bp.get("bias", bb.get("bias")), bb["running_mean"],
            bb["running_var"], bn.eps)


def _native_bn_args(conv: nn.Conv2d, bn: Optional[nn.Module]) -> tuple:
    """``(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, num_batches_tracked)`` for
    the native backend's BN entry points (``None``s and eps 0 without a BN). The counter is part of
    its cache key: a train-mode BN forward updates the running statistics in place without moving
    their version counters, but it increments the counter."""
    st = _bn_state(conv, bn)
    if len(st) == 1:
        return (st[0], None, None, None, None, 0.0, None)
    return st + (bn._buffers.get("num_batches_tracked"),)


def bn_sources(conv: nn.Conv2d, bn: Optional[nn.Module]) -> Tuple[list, float]:
    """The tensors a conv's BN scale and bias derive from (``num_batches_tracked`` among them, see
    :func:`_native_bn_args`) and the BN's eps: what a :class:`DerivedCache` of them is keyed on."""
    a = _native_bn_args(conv, bn)
    return [t for t in a[:5] + a[6:] if t is not None], a[5]


def _scale_bias(conv: nn.Conv2d, bn: Optional[nn.Module], compute_dtype: torch.dtype):
    state = _bn_state(conv, bn)
    if len(state) == 1:
        return None, (None if state[0] is None else state[0].to(compute_dtype))
    return reference.bn_scale_bias(*state, compute_dtype)


def _fused_activation(bn, act) -> Optional[Tuple[str, float]]:
    """The one activation applied after the BN (a timm BatchNormAct2d's own, or the
    ``act`` module's); None when there are two or one effops can't fuse."""
    outer = activation_of(act)
    if bn is None or not timm_bn_act(bn):
        return outer
    inner = activation_of(bn._modules.get("act"))
    if outer is None or inner is None:
        return None
    if inner[0] == "identity":
        return outer
    return inner if outer[0] == "identity" else None


def _gated(x: Tensor, gate: Optional[Tensor]) -> Tensor:
    """``x * gate[:, :, None, None]`` in ``x``'s dtype (an SE gate as eager PyTorch applies it)."""
    if gate is None:
        return x
    check_gate(gate, x, x.shape[1])
    return x * (gate if gate.dtype == x.dtype else gate.to(x.dtype))[:, :, None, None]


def _into(y: Tensor, out: Union[ChannelView, Tensor, None], out_shuffle_groups: int = 1) -> Tensor:
    """``channel_shuffle(y, out_shuffle_groups)``, copied into ``out`` (and ``out``'s tensor
    returned) when given. The copy is recorded by autograd, so gradients reach ``y``'s inputs
    through ``out``."""
    if out_shuffle_groups != 1:
        check_shuffle_groups(out_shuffle_groups, y.shape[1])
        y = reference.channel_shuffle(y, out_shuffle_groups)
    if out is None:
        return y
    dst = out.as_tensor() if isinstance(out, ChannelView) else out
    if tuple(dst.shape) != tuple(y.shape):
        raise ValueError(f"expected out of shape {tuple(y.shape)}, got {tuple(dst.shape)}")
    if dst.dtype != y.dtype or dst.device != y.device:
        raise TypeError(f"out is {dst.dtype} on {dst.device}; expected {y.dtype} on {y.device}")
    return dst.copy_(y)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(w: Tensor, dtype: torch.dtype) -> Tensor:
    # Only autocast runs a weight in another dtype: one cast per call, as eager autocast does.
    return w if w.dtype == dtype else w.to(dtype)
