"""``FusedGhostModule``: GhostNet's ghost module writing one output buffer (no concat, no slice).

A ghost module (Han et al. 2020) computes ``init`` "intrinsic" channels with a primary
conv-BN-act and derives the "ghost" channels from them with a cheap depthwise conv-BN-act::

    x1 = primary_conv(x)                       # conv k x k, in -> init, BN, act
    x2 = cheap_operation(x1)                   # depthwise dw x dw, init -> init * (ratio - 1), BN, act
    out = torch.cat([x1, x2], dim=1)[:, :out_chs]

In eval the primary conv writes channels ``[0, init)`` of one output buffer and the cheap
conv reads that channel range in place and writes ``[init, out_chs)``: only the ghost
channels that survive the slice are computed (the cheap conv's weight, BN scale and bias
are sliced to them per call), so neither the concatenation nor the sliced-off channels
ever exist.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dispatch
from ..activations import activation_of, make_activation
from ..ops.conv import _OP, GHOST_NATIVE_OP, NATIVE_BN_OP, check_gate, check_inputs, derived_reusable, native_fast, output_format
from .common import (BlockRule, ChildrenSnapshot, DerivedCache, hook_dicts, slot_tensors, tensor_slots, hooked, looks_like_batch_norm, register_block_rule,
                     sequential_children, TracedConfigModule, trace_register, traced_constants)
from .conv_bn_act import FusedConvBNAct, _cast, _compute_dtype, _gated, resolve_padding
from .repvgg import MergedBranches, conv_bn_branch

_TIMM_KINDS = {"GhostModule": "v1", "GhostModuleV2": "v2", "GhostModuleV3": "v3"}


def ghost_kind(m: nn.Module) -> Optional[str]:
    """``"v1"`` / ``"v2"`` / ``"v3"`` for timm's ``GhostModule`` / ``GhostModuleV2`` /
    ``GhostModuleV3`` (recognised by type: their forwards are known), ``"v1"`` for the
    reference implementation's ``GhostModule`` (huawei-noah ghostnet_pytorch: the same
    forward, with the kept channel count in ``oup``), else None."""
    t = type(m)
    if t.__module__.startswith("timm.") and t.__name__ in _TIMM_KINDS:
        return _TIMM_KINDS[t.__name__]
    if t.__name__ == "GhostModule" and isinstance(getattr(m, "oup", None), int) \
            and set(m._modules) == {"primary_conv", "cheap_operation"}:
        return "v1"
    return None


def _is_empty_sequential(m: nn.Module) -> bool:
    # The reference GhostModule writes "no activation" as nn.Sequential(): an identity.
    return type(m) is nn.Sequential and len(m) == 0


def _chain(container: nn.Module, what: str) -> List[FusedConvBNAct]:
    """``container`` (a Sequential-like container) as consecutive conv [→ BN] [→ act] steps, each a
    :class:`FusedConvBNAct` sharing the modules; ValueError saying why when it isn't one."""
    children = sequential_children(container)
    if children is None:
        raise ValueError(f"{what} is a {type(container).__name__}, not a Sequential-like conv → BN → act container")
    children = [(n, c) for n, c in children if not _is_empty_sequential(c)]
    units, i = [], 0
    while i < len(children):
        name, conv = children[i]
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{what}.{name} is a {type(conv).__name__} where a conv was expected")
        names, bn, act, j = [name, None, None], None, None, i + 1
        if j < len(children) and looks_like_batch_norm(children[j][1]):
            (names[1], bn), j = children[j], j + 1
        if j < len(children) and not isinstance(children[j][1], nn.Conv2d) \
                and not looks_like_batch_norm(children[j][1]):
            (names[2], act), j = children[j], j + 1
        try:
            units.append(FusedConvBNAct.from_modules(conv, bn, act, names=names))
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        i = j
    if not units:
        raise ValueError(f"{what} holds no conv")
    return units


def _one_unit(container: nn.Module, what: str) -> FusedConvBNAct:
    units = _chain(container, what)
    if len(units) != 1:
        raise ValueError(f"{what} holds {len(units)} convs; expected one conv [→ BN] [→ act]")
    return units[0]


class _Step:
    """One conv step of a ghost module: a conv → BN → act container (``unit``, a FusedConvBNAct
    sharing its modules), or GhostNetV3's re-parameterisable branches merged per call
    (``merged``) followed by the activation module ``act``."""

    def __init__(self, unit: Optional[FusedConvBNAct] = None, merged: Optional[MergedBranches] = None,
                 act: Optional[nn.Module] = None):
        self.unit, self.merged, self.act = unit, merged, act

    @property
    def conv(self) -> nn.Conv2d:
        return self.unit.conv if self.unit is not None else self.merged.conv

    @property
    def activation(self) -> Tuple[str, float]:
        return self.unit.activation if self.unit is not None else activation_of(self.act)

    def folds(self) -> bool:
        return self.unit._folds(self.unit.bn) if self.unit is not None else self.merged.folds()

    def settings(self) -> tuple:
        if self.merged is not None:
            return self.merged.settings() + (activation_of(self.act),)
        u = self.unit
        return u._settings(*u._live_modules()) + (u.conv._parameters["weight"].shape,)

    def weight_scale_bias(self, dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """``(weight in dtype, scale, bias)`` from the live modules: the conv's weight with its BN as
        a per-channel scale and bias, or the merged branches' weight and bias (no scale)."""
        if self.merged is not None:
            w, b = self.merged.weight_bias(dtype)
            return w, None, b
        return (_cast(self.unit.conv._parameters["weight"], dtype),) + self.unit.scale_bias(_compute_dtype(dtype))

    def describe(self) -> str:
        c = self.conv
        k = "x".join(map(str, c.kernel_size))
        kind = "dw" if c.groups == c.in_channels and c.groups > 1 else "conv"
        s = f" s{c.stride[0]}" if c.stride != (1, 1) else ""
        if self.merged is not None:
            return f"{kind}{k}{s} ({self.merged.describe()} merged in fp64) + {self.activation[0]}"
        return f"{kind}{k}{s}" + (" + bn" if self.unit.bn is not None else "") + f" + {self.activation[0]}"


@dataclass
class _Plan:
    """What the fused path runs, parsed from the children (rebuilt when one is replaced)."""

    primary: _Step
    cheap: _Step
    init_chs: int                     # channels the primary conv writes
    out_keep: int                     # channels of the result (the slice), init_chs <= out_keep
    short: Optional[List[FusedConvBNAct]] = None   # V2 / V3 "shortcut" gate branch (short_conv)

    def steps(self) -> List[_Step]:
        return [self.primary, self.cheap]


def _kept_channels(m: nn.Module, kind: str, init: int, new: int) -> int:
    if kind == "v3" and getattr(m, "mode", None) != "shortcut":
        return init + new  # GhostModuleV3 returns the whole concatenation unless it is gated
    keep = getattr(m, "out_chs", getattr(m, "oup", None))
    if not isinstance(keep, int) or isinstance(keep, bool):
        raise ValueError("no integer out_chs attribute (the number of channels kept)")
    return min(keep, init + new)  # slicing past the end keeps everything, as torch does


def _merged_step(m: nn.Module, convs: str, extra: Tuple[str, ...], identity: Optional[str], act: str) -> _Step:
    """GhostNetV3's training form of one step, as its forward computes it:
    ``act(sum(branch(x) for branch in convs + extra) + identity(x))``."""
    branches = [conv_bn_branch(b, f"{convs}.{i}") for i, b in enumerate(m._modules[convs])]
    branches += [conv_bn_branch(m._modules[n], n) for n in extra]
    a = m._modules.get(act)
    if a is None or activation_of(a) is None:
        raise ValueError(f"{act} is a {type(a).__name__}, not an activation effops fuses")
    return _Step(merged=MergedBranches(branches, None if identity is None else m._modules[identity]), act=a)


def _parse(m: nn.Module, kind: str) -> _Plan:
    if kind == "v3" and not getattr(m, "infer_mode", False):
        # Training form: its forward sums primary_rpr_conv (primary_rpr_scale / _skip are unused),
        # then cheap_rpr_scale + cheap_rpr_skip + cheap_rpr_conv, each step followed by its activation.
        try:
            primary = _merged_step(m, "primary_rpr_conv", (), None, "primary_activation")
            cheap = _merged_step(m, "cheap_rpr_conv", ("cheap_rpr_scale",), "cheap_rpr_skip", "cheap_activation")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"GhostModuleV3 training-form branches can't be merged: {e}") from None
    else:
        primary = _Step(_one_unit(m.primary_conv, "primary_conv"))
        cheap = _Step(_one_unit(m.cheap_operation, "cheap_operation"))
    pc, cc = primary.conv, cheap.conv
    init, new = pc.out_channels, cc.out_channels
    if cc.in_channels != init:
        raise ValueError(f"the cheap conv reads {cc.in_channels} channels but the primary conv writes {init}")
    k, d = cc.kernel_size, cc.dilation
    pad = resolve_padding(cc)
    if cc.stride != (1, 1) or any(ki % 2 == 0 for ki in k) or pad != (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2):
        raise ValueError(f"the cheap conv must keep the spatial size (stride 1, odd kernel, padding "
                         f"dilation * (k - 1) / 2), got {cc}")
    keep = _kept_channels(m, kind, init, new)
    if keep < init:
        raise ValueError(f"out_chs={keep} keeps fewer channels than the primary conv's {init}")
    short = None
    if kind == "v2" or (kind == "v3" and m.mode == "shortcut"):
        short = _chain(m.short_conv, "short_conv")
        if not isinstance(getattr(m, "gate_fn", None), nn.Module):
            raise ValueError("no gate_fn module next to short_conv")
        if short[-1].conv.out_channels != keep:
            raise ValueError(f"short_conv writes {short[-1].conv.out_channels} channels; the gate multiplies {keep}")
    return _Plan(primary, cheap, init, keep, short)


class FusedGhostModule(TracedConfigModule):
    """GhostNet's ghost module (timm ``GhostModule``, ``GhostModuleV2``, ``GhostModuleV3`` in its
    training or re-parameterised form, or the reference ``GhostModule``), eval-mode fused into
    one output buffer.

    ``FusedGhostModule(in_chs, out_chs, kernel_size=1, ratio=2, dw_size=3, stride=1, act="relu")``
    builds timm's ``GhostModule`` layout (``primary_conv.0.weight``, ``cheap_operation.1.running_mean``, ...);
    :meth:`from_module` wraps an existing module and keeps its children and their names, so
    ``state_dict``s load both ways.

    Equivalent PyTorch (``GhostModule``)::

        x1 = primary_conv(x)                      # conv → BN → act, init = ceil(out_chs / ratio) channels
        x2 = cheap_operation(x1)                  # depthwise conv (groups=init) → BN → act
        return torch.cat([x1, x2], 1)[:, :out_chs]

    ``GhostModuleV2`` then multiplies by the gate
    ``F.interpolate(gate_fn(short_conv(F.avg_pool2d(x, 2, 2))), size=out.shape[-2:], mode="nearest")``;
    ``GhostModuleV3`` returns the whole concatenation (mode ``"original"``) or the gated slice
    (mode ``"shortcut"``), and in its training form each step is a sum of branches::

        x1 = primary_activation(sum(b(x) for b in primary_rpr_conv))          # conv → BN branches
        x2 = cheap_activation(cheap_rpr_scale(x1) + cheap_rpr_skip(x1) + sum(b(x1) for b in cheap_rpr_conv))

    * Eval (BNs in eval, no gradient needed, no hooks): one output buffer of ``out_chs``
      channels in :func:`effops.ops.conv.output_format` of ``x``; the primary conv-BN-act
      (:class:`FusedConvBNAct` with ``out=``) writes channels ``[0, init)``, and the cheap
      conv-BN-act reads them in place and writes ``[init, out_chs)``, computing only those
      channels: its weight and its BN scale and bias (computed per call from the live modules)
      are sliced to them (on the native CPU backend, when every cheap channel is kept, the cheap
      conv runs as its own FusedConvBNAct into the buffer: nothing to slice). For ratio 2,
      ghost channel ``c`` reads intrinsic channel ``c``.
      GhostModuleV3's training-form branches are merged into one conv per step on every call
      (:class:`~effops.nn.repvgg.MergedBranches`, in float64 from the live modules). The
      V2/V3 gate branch runs its conv-BN pairs fused and multiplies the buffer in place.
    * Train, or when a gradient is needed, or a hook watches a child: the original forward
      with the original modules (exact PyTorch: batch statistics, autograd, hooks).

    ``forward(x, gate=g)`` (``g``: ``[N, in_chs]``, float32 or ``x``'s dtype, e.g. a squeeze-excite
    gate ``se.gate_of(x)``) computes ``self(x * g[:, :, None, None])``; on the fused path the primary
    conv applies ``g`` as it loads ``x`` (the gated input is never written; the cheap conv reads the
    primary output, so it is unaffected). Where that isn't possible (the unfused path, autocast, a
    gradient through ``g``, a V2/V3 gate branch that also reads ``x``, a grouped primary conv) the
    gated input is computed first, in ``x``'s dtype, and the module runs on it.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, ratio: int = 2, dw_size: int = 3,
                 stride: int = 1, act: str = "relu", device=None, dtype=None):
        super().__init__()
        for arg, v in (("in_chs", in_chs), ("out_chs", out_chs), ("ratio", ratio)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"FusedGhostModule: {arg} must be a positive int, got {v!r}")
        if ratio < 2:
            raise ValueError(f"FusedGhostModule: ratio must be >= 2 (ratio 1 has no ghost channels), got {ratio}")
        dd = dict(device=device, dtype=dtype)
        init = -(-out_chs // ratio)
        new = init * (ratio - 1)
        holder = nn.Module()
        holder.out_chs = out_chs
        holder.primary_conv = nn.Sequential(
            nn.Conv2d(in_chs, init, kernel_size, stride, kernel_size // 2, bias=False, **dd),
            nn.BatchNorm2d(init, **dd), make_activation(act))
        holder.cheap_operation = nn.Sequential(
            nn.Conv2d(init, new, dw_size, 1, dw_size // 2, groups=init, bias=False, **dd),
            nn.BatchNorm2d(new, **dd), make_activation(act))
        self._setup(holder, "v1")

    @classmethod
    def from_module(cls, module: nn.Module) -> "FusedGhostModule":
        """Wrap a ghost module (see :func:`ghost_kind`), sharing its children (weights stay where
        they are); ValueError saying why when its structure can't be fused."""
        kind = ghost_kind(module)
        if kind is None:
            raise ValueError(f"{type(module).__name__} is not a ghost module (timm GhostModule / GhostModuleV2 / "
                             "GhostModuleV3, or the reference GhostModule)")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(module, kind)
        self.training = module.training  # its children keep their own modes
        return self

    # Plain attributes of the original module that its forward reads (GhostModuleV3 also keeps
    # primary_rpr_scale / primary_rpr_skip as None attributes).
    _ATTRS = ("out_chs", "oup", "mode", "infer_mode", "primary_rpr_scale", "primary_rpr_skip")

    def _setup(self, m: nn.Module, kind: str) -> None:
        plan = _parse(m, kind)
        for n, c in m.named_children():
            self.add_module(n, c)
        for a in self._ATTRS:
            if a in m.__dict__:
                setattr(self, a, m.__dict__[a])
        self.kind = kind
        self._finish(plan)

    def _finish(self, plan: Optional[_Plan]) -> None:
        # The plan's FusedConvBNAct wrappers share the children above; kept out of _modules so
        # they don't appear twice in state_dict() / modules().
        self.__dict__["_plan"] = plan
        if plan is not None:
            self.in_chs, self.init_chs = plan.primary.conv.in_channels, plan.init_chs
        self._hooks = hook_dicts(list(self.children()))
        self._snapshot = ChildrenSnapshot(list(self.children()))
        self._fingerprint = self._live_settings()
        self._checked = None
        self.__dict__["_native_plan"] = None
        trace_register(self)

    def _trace_constants(self) -> Optional[tuple]:
        """``(out_keep, init_chs, cheap conv outputs, primary conv groups)`` when
        :meth:`_forward_compiled` applies (two FusedConvBNAct units, no gate branch, settings as
        planned, no hook), else None; read once while torch.compile traces (:func:`~effops.nn.common.traced_constants`)."""
        p = self._plan
        if p is None or p.short is not None or p.primary.unit is None or p.cheap.unit is None \
                or self._live_settings() != self._fingerprint or hooked(self._hooks):
            return None
        return (p.out_keep, p.init_chs, p.cheap.conv.out_channels, p.primary.conv.groups)

    def _forward_compiled(self, x: Tensor, gate: Optional[Tensor]) -> Optional[Tensor]:
        """Under torch.compile on CPU, inference: both convs as the functional native op with their
        BNs' own tensors (the extension's folded, packed weights stay cached), concatenated by the
        graph (no writes into views of an empty buffer for functionalization to copy); the
        configuration comes from graph constants. None where :meth:`forward`'s full path decides."""
        if type(x) is not Tensor or x.dim() != 4 or x.shape[1] != self.in_chs or x.shape[0] == 0 \
                or self._snapshot.changed() or not native_fast(x) or torch.is_autocast_enabled("cpu") \
                or (gate is not None and (type(gate) is not Tensor or gate.requires_grad)):
            return None
        c = traced_constants(self)
        if c is None:
            return None
        out_keep, init, cheap_out, groups = c
        if gate is not None and groups != 1:
            return None  # a grouped primary conv takes no gate: the full path applies it first
        return _units_compiled(self._plan, x, gate, out_keep - init, cheap_out)

    def _live_settings(self) -> tuple:
        p = self._plan
        if p is None:
            return ()
        return tuple(s.settings() for s in p.steps()) + tuple(
            u._settings(*u._live_modules()) + (u.conv._parameters["weight"].shape,) for u in p.short or ())

    def _refresh(self) -> None:
        """Parse the children again after one was replaced or a conv setting changed; when they no
        longer form a ghost module this class fuses, the original forward runs (warning once)."""
        self.__dict__["_slots"] = None
        holder = nn.Module()
        for n, c in self.named_children():
            holder.add_module(n, c)
        for a in self._ATTRS:
            if a in self.__dict__:
                setattr(holder, a, self.__dict__[a])
        try:
            plan = _parse(holder, self.kind)
        except ValueError as e:
            warnings.warn(f"effops.FusedGhostModule runs unfused: its modules changed and {e}", stacklevel=3)
            plan = None
        self._finish(plan)

    def extra_repr(self) -> str:
        p = self._plan
        if p is None:
            return f"kind={self.kind}, unfused"
        return (f"kind={self.kind}, in_chs={self.in_chs}, init_chs={p.init_chs}, out_chs={p.out_keep}, "
                f"act={p.primary.activation[0]}/{p.cheap.activation[0]}" + (", gated" if p.short else ""))

    # -- forward -------------------------------------------------------------------
    def _fusable(self, x: Tensor) -> bool:
        p = self._plan
        if p is None or hooked(self._hooks) or not all(s.folds() for s in p.steps()):
            return False
        if p.short is not None and not all(u._folds(u.bn) for u in p.short):
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in self.parameters())))

    def forward(self, x: Tensor, *, gate: Optional[Tensor] = None) -> Tensor:
        fast = None if torch.compiler.is_compiling() else self.__dict__.get("_native_plan")
        if fast is not None:  # CPU inference, steady state: see _GhostPlan
            y = fast.run(x, gate)
            if y is not None:
                return y
        if torch.compiler.is_compiling():
            y = self._forward_compiled(x, gate)
            if y is not None:
                return y
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = f"a {x.dim()}-D tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"FusedGhostModule expected a 4-D input (N, C, H, W), got {got}")
        if x.shape[1] != self.in_chs:
            raise ValueError(f"FusedGhostModule expected an input with {self.in_chs} channels, "
                             f"got shape {tuple(x.shape)}")
        if self._snapshot.changed() or self._live_settings() != self._fingerprint:
            self._refresh()
        dev = x.device.type
        autocast = dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) and x.dtype != torch.float64
        if gate is not None:
            check_gate(gate, x, self.in_chs)
            if not self.takes_gate() or autocast or gate.requires_grad or not self._fusable(x):
                x, gate = _gated(x, gate), None  # exactly self(x * gate[:, :, None, None])
        if not self._fusable(x):
            return self.forward_unfused(x)
        if autocast:
            dtype = torch.get_autocast_dtype(dev)  # (autocast leaves float64 tensors alone)
            x = x.to(dtype)
        else:
            dtype = self._plan.primary.conv.weight.dtype
        return self._run(x, dtype, gate)

    def takes_gate(self) -> bool:
        """Whether the fused path folds an input gate into the primary conv's operand load: a dense
        primary conv (GhostNetV3's merged branches all read ``x``: one gated conv) and no V2/V3 gate
        branch (which reads ``x`` too)."""
        p = self._plan
        return p is not None and p.short is None and p.primary.conv.groups == 1

    def _run(self, x: Tensor, dtype: torch.dtype, gate: Optional[Tensor] = None) -> Tensor:
        p = self._plan
        pc, cc = p.primary.conv, p.cheap.conv
        compiling = torch.compiler.is_compiling()
        sig = (x.shape, x.dtype, x.device, pc.weight.dtype, pc.weight.device, dtype)
        if compiling or sig != self._checked:  # eager: validate each new signature once
            w = _cast(pc.weight, dtype)
            out_hw = check_inputs(x, w, None, None, None, pc.stride, resolve_padding(pc), pc.dilation,
                                        pc.groups, p.primary.activation[0])
            if cc.weight.device != x.device:
                raise ValueError(f"cheap_operation's weight is on {cc.weight.device} but the input is on "
                                 f"{x.device}; expected the same device")
            if not compiling:  # (an attribute written while compiling is a side effect replayed every call)
                self._checked, self._out_hw = sig, out_hw
        else:
            out_hw = self._out_hw
        oh, ow = out_hw
        if compiling and x.shape[0] != 0 and p.short is None and p.primary.unit is not None \
                and p.cheap.unit is not None and native_fast(x) and dtype == x.dtype \
                and pc.weight.dtype == dtype and cc.weight.dtype == dtype and not torch.is_autocast_enabled("cpu"):
            # torch.compile on CPU, inference (settings refreshed on this call): the units' native ops
            y = _units_compiled(p, x, gate, p.out_keep - p.init_chs, cc.out_channels)
            if y is not None:
                return y
        buf = torch.empty((x.shape[0], p.out_keep, oh, ow), dtype=dtype, device=x.device,
                          memory_format=output_format(x))
        if x.shape[0] == 0:
            return buf
        self._intrinsics_into(x, buf[:, :p.init_chs], dtype, compiling, gate)
        whole = self._ghosts_into(buf, dtype, compiling)
        if whole and p.short is None and p.primary.unit is not None and type(x) is Tensor and dtype == x.dtype \
                and not torch.is_autocast_enabled("cpu"):
            # Both convs ran through their FusedConvBNAct's native path: later calls with this
            # input signature may go straight to their plans.
            self.__dict__["_native_plan"] = _GhostPlan(self, x, buf)
        if p.short is not None:
            gate = self._gate(x, (oh, ow))
            # In place unless the gate is wider (autocast can leave it float32): then PyTorch's
            # type promotion makes the product the wider dtype, as in the original forward.
            return buf.mul_(gate) if gate.dtype == buf.dtype else buf * gate
        return buf

    def _intrinsics_into(self, x: Tensor, dst: Tensor, dtype: torch.dtype, compiling: bool,
                         gate: Optional[Tensor] = None) -> None:
        """The primary conv-BN-act (or GhostNetV3's merged primary branches + act) into ``dst``;
        ``gate`` scales the conv's input channels as it loads them."""
        step = self._plan.primary
        if step.unit is not None:
            step.unit._into_trusted(x, dst, gate)  # dst: a channel range of _run's fresh buffer
            return
        conv = step.conv
        derived = self._reused_derived(x, compiling, dtype)
        if derived is not None:
            w, _, b = derived[0]
        else:
            w, _, b = step.weight_scale_bias(dtype)
        _conv_into(x, w, None, b, dst, conv, conv.groups, step.activation, compiling, gate)

    def _ghosts_into(self, buf: Tensor, dtype: torch.dtype, compiling: bool) -> bool:
        """The cheap conv-BN-act for output channels ``[init, out_keep)`` only, reading the intrinsic
        channels of ``buf`` in place. Cheap output channel ``j`` is in group ``j // C_out_g`` and reads
        intrinsic channels ``[g * C_in_g, (g + 1) * C_in_g)`` (ratio 2: channel ``j``), so the kept
        channels are the whole groups ``[0, gf)`` (one grouped conv on the first ``gf * C_in_g``
        channels) and, if the slice cuts a group, the first ``r`` outputs of group ``gf`` (one more conv).
        Returns whether the whole cheap conv ran as its FusedConvBNAct (native CPU inference)."""
        p = self._plan
        keep = p.out_keep - p.init_chs
        if keep == 0:
            return False
        conv = p.cheap.conv
        native = not compiling and native_fast(buf)
        if native and p.cheap.unit is not None and keep == conv.out_channels:
            # Every cheap output is kept: the unit's own native path (BN folded into its cached
            # weight), reading and writing disjoint channel ranges of buf.
            p.cheap.unit._into_trusted(buf[:, :p.init_chs], buf[:, p.init_chs:p.out_keep])
            return True
        derived = self._reused_derived(buf, compiling, dtype)
        if derived is not None:
            for (i0, i1, o0, o1, groups), (w, scale, bias) in derived[1]:
                _conv_into(buf[:, i0:i1], w, scale, bias, buf[:, p.init_chs + o0:p.init_chs + o1], conv, groups,
                           p.cheap.activation, compiling)
            return False
        w_full, scale, bias = p.cheap.weight_scale_bias(dtype)
        for o0, o1, i0, i1, groups in self._cheap_parts():
            _conv_into(buf[:, i0:i1], w_full[o0:o1], None if scale is None else scale[o0:o1],
                       None if bias is None else bias[o0:o1], buf[:, p.init_chs + o0:p.init_chs + o1], conv, groups,
                       p.cheap.activation, compiling)
        return False

    def _cheap_parts(self) -> list:
        """``(o0, o1, i0, i1, groups)`` of the (at most two) convs computing the kept cheap outputs."""
        p = self._plan
        conv = p.cheap.conv
        G = conv.groups
        cin_g, cout_g = conv.in_channels // G, conv.out_channels // G
        gf, r = divmod(p.out_keep - p.init_chs, cout_g)
        parts = []
        if gf:
            parts.append((0, gf * cout_g, 0, gf * cin_g, gf))
        if r:
            parts.append((gf * cout_g, p.out_keep - p.init_chs, gf * cin_g, (gf + 1) * cin_g, 1))
        return parts

    def _sources(self) -> list:
        """Every tensor the fused convs' weights are derived from (the module's parameters and
        buffers, read through slots collected once per plan)."""
        slots = self.__dict__.get("_slots")
        if slots is None:
            slots = self.__dict__["_slots"] = tensor_slots(self)
        return slot_tensors(slots)

    def _reused_derived(self, x: Tensor, compiling: bool, dtype: torch.dtype):
        """:meth:`_derived` from :meth:`_derived_cache` where this call may reuse it: on the native
        CPU backend (stable tensors: its packing cache hits) and wherever else
        :func:`derived_reusable` allows (on a GPU the derivation is a dozen small launches);
        None otherwise."""
        if compiling:
            return None
        srcs = self._sources()
        if not (native_fast(x) or derived_reusable(x, srcs)):
            return None
        return self._derived_cache().get(srcs, lambda: self._derived(dtype), dtype)

    def _derived_cache(self) -> DerivedCache:
        c = self.__dict__.get("_derived_tensors")
        if c is None:
            c = self.__dict__["_derived_tensors"] = DerivedCache()
        return c

    def _derived(self, dtype: torch.dtype):
        """The primary conv's ``(weight, scale, bias)`` and the cheap convs'
        ``((i0, i1, o0, o1, groups), (weight, scale, bias))`` slices, derived once per parameter state."""
        p = self._plan
        primary = p.primary.weight_scale_bias(dtype)
        w_full, scale, bias = p.cheap.weight_scale_bias(dtype)
        cheap = [((i0, i1, o0, o1, groups),
                  (w_full[o0:o1], None if scale is None else scale[o0:o1], None if bias is None else bias[o0:o1]))
                 for o0, o1, i0, i1, groups in self._cheap_parts()]
        return primary, cheap

    def _gate(self, x: Tensor, size: Tuple[int, int]) -> Tensor:
        """GhostModuleV2's attention gate, ``interpolate(gate_fn(short_conv(avg_pool2d(x, 2, 2))))``,
        with short_conv's conv-BN pairs fused."""
        r = F.avg_pool2d(x, kernel_size=2, stride=2)
        for u in self._plan.short:
            r = u(r)
        return F.interpolate(self.gate_fn(r), size=size, mode="nearest")

    def forward_unfused(self, x: Tensor) -> Tensor:
        """The original module's forward with the original modules (the training path; exact semantics)."""
        if self.kind == "v2":
            res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
            x1 = self.primary_conv(x)
            x2 = self.cheap_operation(x1)
            out = torch.cat([x1, x2], dim=1)
            return out[:, :self.out_chs, :, :] * F.interpolate(
                self.gate_fn(res), size=(out.shape[-2], out.shape[-1]), mode="nearest")
        if self.kind == "v3" and not self.infer_mode:  # GhostModuleV3's training form, as timm writes it
            x1 = 0
            for primary_rpr_conv in self.primary_rpr_conv:
                x1 += primary_rpr_conv(x)
            x1 = self.primary_activation(x1)
            x2 = self.cheap_rpr_scale(x1) + self.cheap_rpr_skip(x1)
            for cheap_rpr_conv in self.cheap_rpr_conv:
                x2 += cheap_rpr_conv(x1)
            x2 = self.cheap_activation(x2)
        else:
            x1 = self.primary_conv(x)
            x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        if self.kind == "v3":
            if self.mode != "shortcut":
                return out
            res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
            return out[:, :self.out_chs, :, :] * F.interpolate(
                self.gate_fn(res), size=(out.shape[-2], out.shape[-1]), mode="nearest")
        return out[:, :getattr(self, "out_chs", getattr(self, "oup", None)), :, :]


def _no_plan():
    return None


class _GhostPlan:
    """The steady state of a ghost module whose two convs both run as their FusedConvBNAct's native
    CPU path (no gate branch): the input signature it was built for, and then the two units'
    own plans (:class:`~effops.nn.conv_bn_act._NativePlan`), which check everything about their
    convs, BNs, activations, grad mode, autocast, compiling and the forced backend. Guards here:
    the input's signature, the module's children snapshot and hooks (on the containers too).
    When a guard fails, ``run`` returns None and the full forward runs: it re-parses the children
    if they changed, warns, falls back, and rebuilds the plan."""

    __slots__ = ("owner", "snapshot", "hooks", "primary", "cheap", "x_shape", "dtype", "shape", "init", "keep",
                 "takes_gate")

    def __init__(self, owner: "FusedGhostModule", x: Tensor, buf: Tensor):
        p = owner._plan
        self.owner, self.snapshot, self.hooks = owner, owner._snapshot, owner._hooks
        self.primary, self.cheap = p.primary.unit, p.cheap.unit
        self.x_shape, self.dtype, self.shape = x.shape, x.dtype, tuple(buf.shape)
        self.init, self.keep = p.init_chs, p.out_keep
        self.takes_gate = owner.takes_gate()

    def __reduce__(self):  # copies and pickles of the module rebuild it on their first call
        return (_no_plan, ())

    def run(self, x: Tensor, gate: Optional[Tensor]) -> Optional[Tensor]:
        if type(x) is not Tensor or x.dtype is not self.dtype or x.shape != self.x_shape \
                or (gate is not None and not self.takes_gate) or self.snapshot.changed() or hooked(self.hooks):
            return None
        pp, cp = self.primary._native_plan, self.cheap._native_plan
        if pp is None or cp is None:
            return None
        buf = torch.empty(self.shape, dtype=self.dtype, device="cpu", memory_format=output_format(x))
        if pp.run(x, None, True, gate, 1, buf.narrow(1, 0, self.init)) is None:
            return None
        if cp.run(buf.narrow(1, 0, self.init), None, True, None, 1,
                  buf.narrow(1, self.init, self.keep - self.init)) is None:
            return None
        return buf


def _conv_into(x: Tensor, w: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], dst: Tensor, conv: nn.Conv2d,
               groups: int, activation: Tuple[str, float], compiling: bool, gate: Optional[Tensor] = None) -> None:
    """``dst = act(conv2d(x * gate[:, :, None, None], w) * scale + bias)`` (no gate: ``x``) with ``conv``'s
    stride, padding and dilation: the callers derive ``x``, ``w`` and ``dst`` from one buffer's disjoint
    channel ranges and validate ``gate``, so the checks of the public ``conv_bn_act(out=...)`` are
    settled by construction."""
    act, act_param = activation
    pad = resolve_padding(conv)
    extras = () if gate is None else (gate, 1)
    if compiling:  # the functional op: no in-place write into a view for the compiler to functionalise
        dst.copy_(_OP(x, w, scale, bias, None, conv.stride, pad, conv.dilation, groups, act, act_param, False,
                      *extras))
    else:  # eager inference: the op's implementation without the torch.library layers
        dispatch.run("conv_bn_act", x, w, scale, bias, None, dst, conv.stride, pad, conv.dilation, groups, act,
                     act_param, False, *extras)


def _describe(fused: FusedGhostModule) -> str:
    p = fused._plan
    text = (f"ghost module {fused.in_chs}→{p.out_keep}: {p.primary.describe()} → channels [0, {p.init_chs}), "
            f"{p.cheap.describe()} → [{p.init_chs}, {p.out_keep}) of one buffer (no cat, no slice)")
    if p.short is not None:
        text += f"; gate: avgpool → {len(p.short)} fused conv-bn → {type(fused.gate_fn).__name__} → ×"
    return text


GHOST_RULE = register_block_rule(BlockRule(
    name="ghost module",
    matches=lambda m: ghost_kind(m) is not None,
    build=FusedGhostModule.from_module,
    describe=_describe,
    fused_type=FusedGhostModule,
))


def _units_compiled(p: "_Plan", x: Tensor, gate: Optional[Tensor], keep: int, cheap_out: int) -> Optional[Tensor]:
    """Under torch.compile: plan ``p``'s primary and cheap units as functional native ops (one ghost
    op where every cheap output is kept), or None where the primary unit's native op doesn't apply.
    (A function, not a method: a method looked up on each module is one more guard per module.)"""
    primary, cheap = p.primary.unit, p.cheap.unit
    a1 = primary._compiled_native_args(x, gate, True, None)
    if a1 is None:
        return None
    w1, st1, s1, pad1, dil1, g1, act1, ap1 = a1
    a2 = cheap._compiled_native_args(x, None, False, None) if keep == cheap_out else None
    if a2 is not None:  # every cheap output is kept: one node writing one buffer
        w2, st2, _, pad2, dil2, g2, act2, ap2 = a2
        return GHOST_NATIVE_OP(x, gate, w1, *st1[:6], st1[6], s1, pad1, dil1, g1, act1, ap1,
                               w2, *st2[:6], st2[6], pad2, dil2, g2, act2, ap2)
    # (the primary's arguments as computed above: a second lookup would add guards)
    x1 = NATIVE_BN_OP(x, w1, *st1[:6], None, s1, pad1, dil1, g1, act1, ap1, True, gate, 1, st1[6])
    x2 = cheap._compiled_native(x1)
    if x2 is None:
        x2 = cheap(x1)
    if x2.shape[1] != keep:
        x2 = x2[:, :keep]
    return torch.cat([x1, x2], 1)
