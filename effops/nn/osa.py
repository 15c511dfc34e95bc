"""``FusedOSA``: VoVNet's One-Shot-Aggregation block with no materialised concat."""
from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import dispatch
from ..dispatch import native_first
from ..activations import activation_of, make_activation
from ..ops import reference
from ..native import module as native_module
from ..ops.conv import derived_reusable, native_fast
from ..ops.osa import _OP, OSA_NATIVE_OP, check_osa_inputs
from .common import (FORWARD_HOOK_ATTRS, ChildrenSnapshot, DerivedCache, SameObjects, hook_dicts, hooked,
                     looks_like_batch_norm, sequential_children, timm_type, TracedConfigModule, trace_register,
                     traced_constants, traced_tensors)
from .conv_bn_act import (DepthwisePointwise, FusedConvBNAct, _cast, _compute_dtype, _native_bn_args,
                          bn_sources, conv_reads, has_running_stats, live_activation, resolve_padding,
                          why_not_fusable)
from .pool import MaxPool2d, pool_out_size
from .se import SqueezeExcite


class EffectiveSE(SqueezeExcite):
    """VoVNetV2's effective squeeze-excitation (CenterMask): a :class:`~effops.nn.se.SqueezeExcite`
    with one ``C → C`` 1×1 conv ``fc`` (with bias) and a hard-sigmoid ``gate``, the ``state_dict``
    keys of the classic ``eSEModule`` (``fc.weight``, ``fc.bias``).

    Equivalent PyTorch::

        x * F.hardsigmoid(self.fc(x.mean((2, 3), keepdim=True)))   # fc: 1x1 conv C -> C with bias
    """

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__(channels, None, gate="hardsigmoid", device=device, dtype=dtype)


def ese_fc_of(module: nn.Module) -> Optional[nn.Conv2d]:
    """The ``fc`` conv of a module known to compute ``x * hardsigmoid(fc(mean_hw(x)))``, else None.

    Custom-forward modules can only be recognised by type; accepted are effops'
    :class:`EffectiveSE` (and any :class:`~effops.nn.se.SqueezeExcite` whose children compute
    that now), timm's ``EffectiveSEModule`` (without ``add_maxpool``,
    with a hard-sigmoid gate) and the classic CenterMask/VoVNetV2 ``eSEModule``
    (``avg_pool`` + ``fc`` + ``hsigmoid`` children).
    """
    t = type(module)
    fc = getattr(module, "fc", None)
    if not (type(fc) is nn.Conv2d and fc.kernel_size == (1, 1) and fc.in_channels == fc.out_channels
            and fc.groups == 1 and fc.bias is not None):
        return None
    if isinstance(module, SqueezeExcite):  # EffectiveSE, or a wrapped eSE module: as its children are now
        return fc if module._ese_fc() is fc else None
    if t.__name__ == "EffectiveSEModule" and t.__module__.startswith("timm."):
        gate = activation_of(module.gate)
        return fc if not module.add_maxpool and gate is not None and gate[0] == "hardsigmoid" else None
    if t.__name__ == "eSEModule" and set(dict(module.named_children())) == {"avg_pool", "fc", "hsigmoid"}:
        pool = module.avg_pool
        if isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1)):
            return fc
    return None


@dataclass
class _Unit:
    """One conv step of the block: optional depthwise conv, then conv → BN → act."""

    container: nn.Module                 # the original module (called as-is on the unfused path)
    fused: FusedConvBNAct                # conv → BN → act, sharing the original modules
    dw: Optional[nn.Conv2d] = None
    pair: Optional[DepthwisePointwise] = None  # dw → fused as one banded native call

    def __post_init__(self):
        if self.dw is not None:
            self.pair = DepthwisePointwise(self.dw, self.fused)


@dataclass
class _Parts:
    children: List[Tuple[str, nn.Module]] = field(default_factory=list)   # registered, original names
    reduction: Optional[_Unit] = None
    mid: List[_Unit] = field(default_factory=list)
    agg: Optional[_Unit] = None
    ese: Optional[nn.Module] = None
    ese_fc: Optional[nn.Conv2d] = None
    drop_path: Optional[nn.Module] = None
    identity: bool = False


def _unit(container: nn.Module, what: str) -> _Unit:
    """Parse ``[depthwise conv →] conv → BN [→ act]`` from a container whose forward applies its children in order."""
    children = sequential_children(container)
    if children is None:
        raise ValueError(f"{what} is a {type(container).__name__}, not a Sequential-like conv → BN → act container")
    mods = [m for _, m in children if type(m) is not nn.Identity]
    dw = None
    if len(mods) >= 2 and isinstance(mods[0], nn.Conv2d) and isinstance(mods[1], nn.Conv2d):
        dw, mods = mods[0], mods[1:]
        if not (type(dw) is nn.Conv2d and dw.groups == dw.in_channels == dw.out_channels and dw.bias is None
                and dw.stride == (1, 1) and dw.dilation == (1, 1) and dw.padding_mode == "zeros"
                and dw.kernel_size[0] == dw.kernel_size[1] and dw.kernel_size[0] % 2
                and resolve_padding(dw) == (dw.kernel_size[0] // 2,) * 2):
            raise ValueError(f"{what}: the first conv is not a bias-free, size-preserving depthwise conv")
    if not mods or not isinstance(mods[0], nn.Conv2d):
        raise ValueError(f"{what} does not start with a conv")
    conv = mods[0]
    bn = mods[1] if len(mods) > 1 and looks_like_batch_norm(mods[1]) else None
    rest = mods[2:] if bn is not None else mods[1:]
    act = rest[0] if rest else None
    if len(rest) > 1 or bn is None:
        raise ValueError(f"{what} is not conv → BatchNorm2d → activation ({[type(m).__name__ for m in mods]})")
    why = why_not_fusable(conv, bn, act)
    if why is not None:
        raise ValueError(f"{what}: {why}")
    names = ("conv", "bn", "act" if act is not None else None)
    return _Unit(container, FusedConvBNAct.from_modules(conv, bn, act, names=names), dw)


def _classic_parts(m: nn.Module) -> _Parts:
    ch = dict(m.named_children())
    extra = set(ch) - {"conv_reduction", "layers", "concat", "ese"}
    if extra:
        raise ValueError(f"unknown children {sorted(extra)} next to layers/concat")
    if not isinstance(getattr(m, "identity", None), bool):
        raise ValueError("no boolean `identity` attribute")
    p = _Parts(children=list(m.named_children()), identity=m.identity)
    if "conv_reduction" in ch:
        p.reduction = _unit(ch["conv_reduction"], "conv_reduction")
    p.mid = [_unit(layer, f"layers.{i}") for i, layer in enumerate(ch["layers"])]
    p.agg = _unit(ch["concat"], "concat")
    if "ese" in ch:
        p.ese, p.ese_fc = ch["ese"], ese_fc_of(ch["ese"])
        if p.ese_fc is None:
            raise ValueError(f"ese is a {type(ch['ese']).__name__}, not a known effective-SE module")
    return p


def _timm_parts(m: nn.Module) -> _Parts:
    """timm's ``OsaBlock`` (or a holder with its children and ``residual`` flag)."""
    p = _Parts(children=list(m.named_children()), identity=bool(m.residual))
    if m.conv_reduction is not None:
        p.reduction = _unit(m.conv_reduction, "conv_reduction")
    p.mid = [_unit(layer, f"conv_mid.{i}") for i, layer in enumerate(m.conv_mid)]
    p.agg = _unit(m.conv_concat, "conv_concat")
    if m.attn is not None:
        p.ese, p.ese_fc = m.attn, ese_fc_of(m.attn)
        if p.ese_fc is None:
            raise ValueError(f"attn is a {type(m.attn).__name__}, not an effective-SE module")
    if m.drop_path is not None:
        if type(m.drop_path).__name__ not in ("DropPath", "Identity"):
            raise ValueError(f"drop_path is a {type(m.drop_path).__name__}")
        p.drop_path = m.drop_path
    return p


def is_osa_block(m: nn.Module) -> bool:
    """Whether ``m`` has the structure of an OSA block this module converts (it may still be refused)."""
    t = type(m)
    if t.__name__ == "OsaBlock" and t.__module__.startswith("timm."):
        return True
    ch = dict(m.named_children())
    return isinstance(ch.get("layers"), nn.ModuleList) and isinstance(ch.get("concat"), nn.Module) \
        and type(m).forward is not nn.Module.forward


def _parts_of(m: nn.Module) -> _Parts:
    t = type(m)
    if t.__name__ == "OsaBlock" and t.__module__.startswith("timm."):
        return _timm_parts(m)
    if is_osa_block(m):
        return _classic_parts(m)
    raise ValueError(f"{t.__name__} is not an OSA block (a `layers` ModuleList + `concat`, or timm's OsaBlock)")


def _classic_seq(name: str, post, convs, out_ch: int, act: str, eps: float, momentum: float, dd) -> nn.Sequential:
    """Classic-layout container: ``{name}_{post}/conv``, ``/norm``, ``/relu``
    (depthwise: ``/dw_conv3x3``, ``/pw_conv1x1``, ``/pw_norm``, ``/pw_relu``)."""
    pre = f"{name}_{post}/"
    if len(convs) == 1:
        keys = ["conv", "norm", "relu"]
    else:
        keys = ["dw_conv3x3", "pw_conv1x1", "pw_norm", "pw_relu"]
    mods = list(convs) + [nn.BatchNorm2d(out_ch, eps, momentum, **dd), make_activation(act)]
    return nn.Sequential(OrderedDict((pre + k, m) for k, m in zip(keys, mods)))


class FusedOSA(TracedConfigModule):
    """One-Shot Aggregation block (VoVNet V1/V2) whose concat never exists.

    ``FusedOSA(in_ch, stage_ch, concat_ch, layer_per_block=5, identity=False, ese=False, depthwise=False)``
    builds the block in the classic layout (``layers.{i}.{name}_{i}/conv``,
    ``concat.{name}_concat/norm``, ``ese.fc``, ``conv_reduction``...; pass
    ``name="OSA2_1"`` to match a classic checkpoint's keys exactly).
    :meth:`from_module` wraps an existing classic OSA module or timm ``OsaBlock``
    and keeps *its* child names, so ``state_dict``s load both ways.

    Equivalent PyTorch::

        feats = [x]
        y = conv_reduction(x) if depthwise and in_ch != stage_ch else x    # 1x1 conv-BN-ReLU
        for layer in layers:                     # 3x3 conv-BN-ReLU (depthwise: dw3x3 → 1x1 conv-BN-ReLU)
            y = layer(y); feats.append(y)
        y = concat(torch.cat(feats, 1))          # 1x1 conv-BN-ReLU to concat_ch
        y = ese(y) if ese else y                 # y * hardsigmoid(fc(mean_hw(y)))
        return y + x if identity else y

    * Eval (every BN in eval, no gradient needed): ``effops::osa_block`` — each stage
      conv writes its channel range of one NHWC stage buffer; the 1x1 aggregation
      reads ``x`` and that buffer as two segments of K, with folded BN + ReLU, the
      eSE gate and the identity fused. No ``torch.cat``, no copy of ``x``.
    * Training, or when gradients are needed: the original PyTorch modules in the
      order above, so semantics (running statistics, autograd) are exactly PyTorch's.
    """

    def __init__(
        self,
        in_ch: int,
        stage_ch: int,
        concat_ch: int,
        layer_per_block: int = 5,
        identity: bool = False,
        ese: bool = False,
        depthwise: bool = False,
        *,
        name: str = "OSA",
        act: str = "relu",
        eps: float = 1e-5,
        momentum: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for arg, v in (("in_ch", in_ch), ("stage_ch", stage_ch), ("concat_ch", concat_ch),
                       ("layer_per_block", layer_per_block)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"FusedOSA: {arg} must be a positive int, got {v!r}")
        if identity and in_ch != concat_ch:
            raise ValueError(f"FusedOSA: identity=True adds the input to the output, so it needs in_ch == concat_ch; "
                             f"got in_ch={in_ch}, concat_ch={concat_ch}")
        dd = dict(device=device, dtype=dtype)
        children = []
        ch = in_ch
        if depthwise and in_ch != stage_ch:
            conv = nn.Conv2d(in_ch, stage_ch, 1, bias=False, **dd)
            children.append(("conv_reduction", _classic_seq(f"{name}_reduction", 0, [conv], stage_ch, act, eps,
                                                            momentum, dd)))
            ch = stage_ch
        layers = nn.ModuleList()
        for i in range(layer_per_block):
            if depthwise:
                convs = [nn.Conv2d(ch, ch, 3, 1, 1, groups=ch, bias=False, **dd),
                         nn.Conv2d(ch, stage_ch, 1, bias=False, **dd)]
            else:
                convs = [nn.Conv2d(ch, stage_ch, 3, 1, 1, bias=False, **dd)]
            layers.append(_classic_seq(name, i, convs, stage_ch, act, eps, momentum, dd))
            ch = stage_ch
        children.append(("layers", layers))
        agg = nn.Conv2d(in_ch + layer_per_block * stage_ch, concat_ch, 1, bias=False, **dd)
        children.append(("concat", _classic_seq(name, "concat", [agg], concat_ch, act, eps, momentum, dd)))
        if ese:
            children.append(("ese", EffectiveSE(concat_ch, **dd)))
        holder = nn.Module()
        for n, m in children:
            holder.add_module(n, m)
        holder.identity = identity
        self._setup(_classic_parts(holder), "classic")

    @classmethod
    def from_module(cls, module: nn.Module) -> "FusedOSA":
        """Wrap a classic OSA module (``layers`` ModuleList + ``concat`` + ``identity``
        [+ ``ese``, ``conv_reduction``]) or a timm ``OsaBlock``. The modules are shared,
        not copied; a structure that can't be fused raises ``ValueError`` saying why."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        t = type(module)
        self._setup(_parts_of(module), "timm" if t.__name__ == "OsaBlock" and t.__module__.startswith("timm.") else "classic")
        return self

    def _setup(self, p: _Parts, kind: str) -> None:
        units = ([p.reduction] if p.reduction is not None else []) + p.mid + [p.agg]
        acts = {u.fused.activation for u in units}
        if len(acts) != 1:
            raise ValueError(f"FusedOSA needs one activation for all its convs, got {sorted(acts)}")
        if not p.mid:
            raise ValueError("FusedOSA needs at least one stage conv (layer_per_block >= 1)")
        for i, u in enumerate(p.mid):
            c = u.fused.conv
            k = c.kernel_size
            if c.stride != (1, 1) or c.dilation != (1, 1) or c.groups != 1 or k[0] != k[1] or k[0] % 2 == 0 \
                    or tuple(resolve_padding(c)) != (k[0] // 2, k[1] // 2):
                raise ValueError(f"stage conv {i} must be a size-preserving conv (stride 1, odd square kernel, "
                                 f"padding k//2, groups 1), got {c}")
        for what, u in (("aggregation", p.agg), ("reduction", p.reduction)):
            if u is not None:
                c = u.fused.conv
                if c.kernel_size != (1, 1) or c.stride != (1, 1) or c.groups != 1 or tuple(resolve_padding(c)) != (0, 0):
                    raise ValueError(f"the {what} conv must be a plain 1x1 conv, got {c}")
        first = p.reduction.fused.conv if p.reduction is not None else (p.mid[0].dw or p.mid[0].fused.conv)
        in_ch, sc, L = first.in_channels, p.mid[0].fused.conv.out_channels, len(p.mid)
        ch = p.reduction.fused.conv.out_channels if p.reduction is not None else in_ch
        for i, u in enumerate(p.mid):
            src = u.dw or u.fused.conv
            if src.in_channels != ch or u.fused.conv.out_channels != sc or (u.dw and u.dw.out_channels != u.fused.conv.in_channels):
                raise ValueError(f"stage conv {i} reads {src.in_channels} channels and writes "
                                 f"{u.fused.conv.out_channels}; expected {ch} -> {sc}")
            ch = sc
        agg = p.agg.fused.conv
        if agg.in_channels != in_ch + L * sc:
            raise ValueError(f"the aggregation conv reads {agg.in_channels} channels; the concat has "
                             f"in_ch {in_ch} + {L} x stage_ch {sc} = {in_ch + L * sc}")
        if p.identity and agg.out_channels != in_ch:
            raise ValueError(f"identity residual needs concat_ch == in_ch, got {agg.out_channels} and {in_ch}")
        if p.ese_fc is not None and p.ese_fc.in_channels != agg.out_channels:
            raise ValueError(f"the eSE has {p.ese_fc.in_channels} channels but the block outputs {agg.out_channels}")
        for n, m in p.children:
            self.add_module(n, m)
        # Plain attributes (lists / a dataclass): the fused wrappers share the children
        # above and must not appear twice in state_dict() / modules().
        self._parts = p
        self._units = units
        self.in_ch, self.stage_ch, self.concat_ch, self.layer_per_block = in_ch, sc, agg.out_channels, L
        self._kind = kind
        self.identity = p.identity
        self.depthwise = p.mid[0].dw is not None
        self.has_ese = p.ese is not None
        self._act = p.agg.fused.activation
        self._checked = None
        self._steps_cache = None
        # Hooks on any child make forward() call the original modules (forward_unfused).
        self._hooks = hook_dicts(list(self.children()))
        # What forward() compares on every call to notice a child replaced or a conv
        # setting changed after construction (then the block is parsed again).
        self._snapshot = ChildrenSnapshot(list(self.children()))
        self._fingerprint = self._live_settings()
        trace_register(self)

    def _trace_constants(self) -> tuple:
        """``(the conv settings are still those the plan was built for, every BN has running
        statistics)`` as torch.compile's trace takes them: compared once, kept in the graph
        (:func:`~effops.nn.common.traced_constants`; compared in the trace, the settings of every
        conv would be guards evaluated on every call)."""
        stats = all(u.fused.bn is None or has_running_stats(u.fused.bn) for u in self._units)
        return self._live_settings() == self._fingerprint, stats

    def _trace_tensors(self) -> tuple:
        """The tensor arguments of the block's native op (``fused_arguments`` after ``x``, up to
        the eSE bias) for a float32 trace under inductor's freezing, taken while Dynamo traces
        (:func:`~effops.nn.common.traced_tensors`): the BN scales and biases computed here once."""
        with torch.no_grad():
            return self.fused_arguments(torch.empty(0), torch.float32)[1:13]

    def _as_planned(self) -> bool:
        if torch.compiler.is_compiling():
            return traced_constants(self)[0]
        return self._live_settings() == self._fingerprint

    def _live_settings(self) -> tuple:
        return tuple(u.fused._settings(*u.fused._live_modules()) + (u.fused.conv._parameters["weight"].shape,)
                     for u in self._units) + tuple((u.dw.stride, u.dw.padding, u.dw.dilation, u.dw.groups,
                                                    u.dw.padding_mode) for u in self._parts.mid if u.dw is not None)

    def _reparse(self) -> None:
        """Build the plan again from the children as they are now (one was replaced or a
        conv setting changed since the last call); raise if they no longer form a block
        this module can run."""
        holder = nn.Module()
        for n, m in self.named_children():
            holder.add_module(n, m)
        try:
            if self._kind == "timm":
                for n in ("conv_reduction", "attn", "drop_path"):
                    if n not in holder._modules:
                        setattr(holder, n, None)
                holder.residual = self.identity
                parts = _timm_parts(holder)
            else:
                holder.identity = self.identity
                parts = _classic_parts(holder)
            self._setup(parts, self._kind)
        except ValueError as e:
            raise ValueError(f"FusedOSA: its modules changed after construction and no longer form an OSA block "
                             f"it can run: {e}") from e

    @property
    def activation(self) -> Tuple[str, float]:
        """``(name, param)`` of the activation every conv of the block applies."""
        return self._act

    def extra_repr(self) -> str:
        return (f"in_ch={self.in_ch}, stage_ch={self.stage_ch}, concat_ch={self.concat_ch}, "
                f"layer_per_block={self.layer_per_block}, identity={self.identity}, ese={self.has_ese}, "
                f"depthwise={self.depthwise}, act={self._act[0]}")

    # -- helpers -----------------------------------------------------------------
    def _fusable(self) -> bool:
        p = self._parts
        # in a trace the BNs' running statistics are known present from the constants (not read, so
        # not guarded); their train/eval mode is read live
        stats = True if torch.compiler.is_compiling() and traced_constants(self)[1] else None
        if any(not u.fused._folds(u.fused.bn, stats) for u in self._units):
            return False
        return p.drop_path is None or not p.drop_path.training

    def _needs_grad(self, x: Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(t.requires_grad for t in self.parameters())

    def fused_arguments(self, x: Tensor, dtype: torch.dtype, identity: Optional[bool] = None) -> tuple:
        """The ``effops::osa_block`` arguments for input ``x``: each conv's weight (cast to
        ``dtype`` only under autocast) with its BatchNorm as a per-channel scale and bias. The
        scales, biases and eSE weights are derived once per parameter state (as in
        FusedConvBNAct) where :func:`derived_reusable` allows, else on every call."""
        p = self._parts
        cd = _compute_dtype(dtype)
        srcs, eps = [], []
        for u in self._units:
            t, e = bn_sources(u.fused.conv, u.fused.bn)
            srcs += t
            eps.append(e)
        if p.ese_fc is not None:
            srcs += [p.ese_fc._parameters["weight"], p.ese_fc._parameters["bias"]]

        def derive():
            # Every conv of the block has a BN (see _unit): all scales and biases in one batch of ops.
            sb = reference.bn_scale_bias_many([u.fused.bn_state() for u in self._units], cd)
            ese = None if p.ese_fc is None else (_cast(p.ese_fc._parameters["weight"], cd),
                                                 _cast(p.ese_fc._parameters["bias"], cd))
            return sb, ese

        if derived_reusable(x, srcs):
            cache = self.__dict__.get("_derived_args")
            if cache is None:
                cache = self.__dict__["_derived_args"] = DerivedCache()
            sb, ese = cache.get(srcs, derive, (cd, tuple(eps)))
            sb = list(sb)  # popped below; the cached list stays whole
        else:
            sb, ese = derive()
        ws = [_cast(u.fused.conv._parameters["weight"], dtype) for u in self._units]
        red_w = red_s = red_b = None
        if p.reduction is not None:  # _units: [reduction] + mid + [agg]
            red_w, (red_s, red_b) = ws.pop(0), sb.pop(0)
        agg_w, (agg_s, agg_b) = ws.pop(), sb.pop()
        mid_ws, mid_ss, mid_bs = ws, [s for s, _ in sb], [b for _, b in sb]
        dw_ws = [_cast(u.dw._parameters["weight"], dtype) for u in p.mid if u.dw is not None]
        ese_w, ese_b = (None, None) if ese is None else ese
        act, act_param = self._act
        return (x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, agg_s, agg_b, ese_w,
                ese_b, self.identity if identity is None else identity, act, float(act_param))

    # -- forward -------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if type(x) is Tensor and x.dtype is torch.float32 and not torch.compiler.is_compiling() and native_fast(x) \
                and not self._snapshot.changed():
            # CPU float32 inference, steady state: the guards of _native_steps, then one C++ call
            steps = self._native_steps(x, self.identity)
            if steps is not None:
                y = native_module().osa_block_steps(x, *steps)
                if y is not None:
                    return y
                self._steps_cache = None  # a weight's dtype, device or shape changed in place
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] != self.in_ch:
            raise ValueError(f"FusedOSA expected an input with {self.in_ch} channels, got shape {tuple(x.shape)}")
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = f"a {x.dim()}-D tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"FusedOSA expected a 4-D input (N, C, H, W), got {got}")
        if self._snapshot.changed() or not self._as_planned():
            self._reparse()
        if not self._fusable() or self._needs_grad(x) or hooked(self._hooks):
            return self.forward_unfused(x)
        dev = x.device.type
        if torch.compiler.is_compiling() and x.dtype == torch.float32 and native_fast(x) \
                and not torch.is_autocast_enabled(dev):
            t = traced_tensors(self)
            if t is not None and t[7].dtype == torch.float32:
                # inductor freezing: the whole block as one C++ call, its weights, BN scales and
                # biases constants of the graph (no guard per tensor)
                act, act_param = self._act
                return OSA_NATIVE_OP(x, *t, self.identity, act, float(act_param))
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) and x.dtype != torch.float64:
            dtype = torch.get_autocast_dtype(dev)  # (autocast leaves float64 tensors alone)
            if self.identity and x.dtype != dtype:
                # PyTorch adds the autocast-dtype block output to the wider input in the wider
                # dtype (type promotion) and returns that dtype: the identity add runs here.
                block = self._run(x.to(dtype), dtype, identity=False)
                return block.to(torch.promote_types(dtype, x.dtype)) + x
            x = x.to(dtype)
        else:
            dtype = self._parts.agg.fused.conv.weight.dtype
        return self._run(x, dtype, self.identity)

    def _run(self, x: Tensor, dtype: torch.dtype, identity: bool) -> Tensor:
        if not torch.compiler.is_compiling() and native_fast(x):
            return self._run_native(x, identity)
        args = self.fused_arguments(x, dtype, identity)
        if torch.compiler.is_compiling():
            # CPU float32 inference on the native backend: the whole block as one C++ call
            native = native_fast(x) and x.dtype == torch.float32  # (forward sent gradients elsewhere)
            return (OSA_NATIVE_OP if native else _OP)(*args)
        w = args[8]
        sig = (x.shape, x.dtype, x.device, w.dtype, w.device, identity)
        if sig != self._checked:  # validate each new (input, weight) signature once
            check_osa_inputs(*args[:15])
            self._checked = sig
        # Eager inference: the op's implementation without the torch.library layers.
        return dispatch.run("osa_block", *args)

    def _run_native(self, x: Tensor, identity: bool) -> Tensor:
        """CPU inference on the native backend: each conv runs FusedConvBNAct's native path (BN
        folded into a cached prepacked weight, activation fused); the aggregation is GEMMs over
        the block input and the stage outputs where they lie (no concat), whose epilogue adds the
        identity unless an eSE gate comes first (then the native SE kernels pool, excite, and
        apply gate + identity in one more pass). Once each unit has planned its call here, float32
        calls take forward's one-call path instead (:meth:`_native_steps`)."""
        p = self._parts
        y = x if p.reduction is None else p.reduction.fused(x)
        feats = [x]
        nat = native_module()
        for u in p.mid:
            if u.dw is not None:  # depthwise-separable stage: a plain depthwise conv, then the 1x1
                z = u.pair.native(y)  # the two as one banded native call (steady state)
                if z is not None:
                    y = z
                    feats.append(y)
                    continue
                dw = u.dw
                y = nat.conv_bn_act(y, dw._parameters["weight"], dw._parameters.get("bias"), None, None, None, None,
                                    0.0, None, None, dw.stride, resolve_padding(dw), dw.dilation, dw.groups, "identity", 0.0,
                                    True)
            y = u.fused(y)
            feats.append(y)
        res = x if identity else None
        agg = p.agg.fused
        own = not hooked(agg._hooks) and agg._folds(agg.bn)
        means = None
        if own:  # GEMMs over the stage outputs where they lie: the concat is never built
            if p.ese_fc is not None and x.dtype == torch.float32:  # the eSE squeeze rides the GEMM's stores
                means = torch.empty(x.shape[0], agg.conv.out_channels, dtype=torch.float32)
            y = agg.native_segments(feats, None if p.ese_fc is not None else res, pool=means)
        else:
            y = agg(torch.cat(feats, 1), None if p.ese_fc is not None else res)
        if p.ese_fc is None:
            return y
        fc_w, fc_b = p.ese_fc._parameters["weight"], p.ese_fc._parameters["bias"]
        if means is not None:
            gate = nat.se_gate_of_means(means, None, None, fc_w, fc_b, "identity", 0.0, "hardsigmoid", 0.0)
        else:
            gate = dispatch.run("se_gate", y, None, None, fc_w, fc_b, "identity", 0.0, "hardsigmoid", 0.0)
        # Gated in place where y is this call's own fresh tensor (a second fresh one is written
        # from cold cache lines); not where a hook on the aggregation conv may have kept y.
        return dispatch.run("se_apply", y, gate, res, y if own else None, "identity", 0.0)

    def _native_steps(self, x: Tensor, identity: bool) -> Optional[tuple]:
        """The arguments after ``x`` of ``osa_block_steps`` (csrc/conv.cpp): what the per-op path of
        :meth:`_run_native` passes its native calls, gathered under the same guards (each unit's
        plan: input shape, live settings, hooks, train mode, gradients), for a float32 input.
        None where a guard fails or a unit has not planned yet (its first call): that path runs.
        One C++ call instead of six to ten Python-level calls keeps the host time between the
        block's kernels to microseconds (paid from cold caches after every heavy kernel)."""
        # Steady state: the last gather's arguments while everything they were read from is the same
        # objects (SameObjects: a flat list of dict reads instead of the gather's thousands of
        # bytecodes, which run from cold caches after the previous block's kernels; timed once with
        # the caches evicted, 42 against 108 µs for an ese_vovnet19b_dw block). What identity can't
        # see (``param.data = t`` giving a weight another dtype, device or shape) osa_block_steps
        # checks against the weight sizes passed last, answering None.
        c = self._steps_cache
        if c is not None and not torch.is_grad_enabled() and x.shape == c.payload[0] and identity is c.payload[1] \
                and not torch.is_autocast_enabled("cpu") and native_first() and not hooked(self._hooks) \
                and c.current():
            return c.payload[2]
        p = self._parts
        if x.dtype is not torch.float32 or x.dim() != 4 or hooked(self._hooks) \
                or (p.drop_path is not None and p.drop_path.training) \
                or (torch.is_grad_enabled() and self._needs_grad(x)):
            return None
        steps, t, eps, acts, params, geom = [], [], [], [], [], []
        reads, cacheable = [], True

        def conv(fused, shape, step):
            nonlocal cacheable
            pa = fused._native_plan
            if pa is None or pa.x_shape != shape or pa.dtype is not torch.float32 or pa.shuffle != 1:
                return None
            a = pa.live_args(x)
            if a is None:
                return None
            reads.extend(conv_reads(pa.conv, pa.bn))
            cacheable = cacheable and not pa.live_act
            w, cb, bw, bb, rm, rv, e, counter = a
            t.extend((w, cb, bw, bb, rm, rv, counter))
            eps.append(e)
            acts.append(pa.act)
            params.append(pa.act_param)
            geom.extend((*pa.stride, *pa.pad, *pa.dilation, pa.groups))
            steps.append(step)
            return pa.out_shape

        shape = x.shape
        if p.reduction is not None:
            shape = conv(p.reduction.fused, shape, 0)
            if shape is None:
                return None
        for u in p.mid:
            if u.dw is None:
                shape = conv(u.fused, shape, 1)
                if shape is None:
                    return None
                continue
            a = None if u.pair is None else u.pair.native_args(x, shape)
            if a is None:
                return None
            for half in (u.pair.dw, u.pair.pw):
                pa = half._native_plan if isinstance(half, FusedConvBNAct) else None
                reads.extend(conv_reads(half, None) if pa is None else conv_reads(pa.conv, pa.bn))
                cacheable = cacheable and (pa is None or not pa.live_act)
            (w1, cb1, bw1, bb1, rm1, rv1, e1, n1, stride, pad, dil, act1, p1,
             w2, cb2, bw2, bb2, rm2, rv2, e2, n2, act2, p2, _) = a
            t.extend((w1, cb1, bw1, bb1, rm1, rv1, n1, w2, cb2, bw2, bb2, rm2, rv2, n2))
            eps.extend((e1, e2))
            acts.extend((act1, act2))
            params.extend((p1, p2))
            geom.extend((*stride, *pad, *dil, shape[1], 1, 1, 0, 0, 1, 1, 1))
            steps.append(2)
            shape = u.pair.pw._native_plan.out_shape
        agg = p.agg.fused
        if hooked(agg._hooks) or not agg._folds(agg.bn):
            return None
        # The unit plans above hold the settings they were built with (under the settings this block
        # was parsed for); the aggregation has no plan, so its settings are compared here.
        conv_a, bn_a, act_a = agg._live_modules()
        settings = agg._settings(conv_a, bn_a, act_a)
        w = conv_a._parameters["weight"]
        if settings + (w.shape,) != self._fingerprint[len(self._units) - 1]:
            return None
        act, act_param = settings[-1]
        cb, bw, bb, rm, rv, e, counter = _native_bn_args(conv_a, bn_a)
        t.extend((w, cb, bw, bb, rm, rv, counter))
        eps.append(e)
        acts.append(act)
        params.append(act_param)
        geom.extend((1, 1, 0, 0, 1, 1, 1))
        fc = p.ese_fc
        fc_w, fc_b = (None, None) if fc is None else (fc._parameters["weight"], fc._parameters["bias"])
        sizes = [d for i in range(0, len(t), 7) for d in t[i].shape]
        args = (steps, t, eps, acts, params, geom, fc_w, fc_b, identity, sizes)
        if cacheable and not live_activation(bn_a, act_a):
            reads += conv_reads(conv_a, bn_a)
            if fc is not None:
                reads += [(fc._parameters, "weight"), (fc._parameters, "bias")]
            if p.drop_path is not None:
                reads.append((p.drop_path.__dict__, "training"))
            self._steps_cache = SameObjects(reads, (x.shape, identity, args))
        return args

    def forward_unfused(self, x: Tensor) -> Tensor:
        """The block with the original PyTorch modules (the training path; exact semantics)."""
        if self._snapshot.changed() or not self._as_planned():
            self._reparse()
        p = self._parts
        feats = [x]
        y = x if p.reduction is None else p.reduction.container(x)
        for u in p.mid:
            y = u.container(y)
            feats.append(y)
        y = p.agg.container(torch.cat(feats, dim=1))
        if p.ese is not None:
            y = p.ese(y)
        if p.drop_path is not None:
            y = p.drop_path(y)
        return y + x if self.identity else y


# -- VoVNet stages as one native call --------------------------------------------------------------
def _timm_osa_stage(m: nn.Module) -> bool:
    return timm_type(m, "OsaStage") and set(m._modules) <= {"pool", "blocks"} \
        and isinstance(m._modules.get("blocks"), nn.Sequential)


def is_osa_stages(m: nn.Module) -> bool:
    """An ``nn.Sequential`` of timm ``OsaStage``s (timm VoVNet's ``stages``) whose blocks are all
    :class:`FusedOSA` and whose pools are effops :class:`~effops.nn.pool.MaxPool2d` (after conversion)."""
    if type(m) is not nn.Sequential or not m._modules:
        return False
    for stage in m._modules.values():
        if not _timm_osa_stage(stage) or not all(type(b) is FusedOSA for b in stage.blocks._modules.values()):
            return False
        pool = stage._modules.get("pool")
        if pool is not None and type(pool) is not MaxPool2d:
            return False
    return True


def _pooled_hw(args, h: int, w: int, ceil: bool) -> tuple:
    (k0, k1), (s0, s1), (p0, p1) = args
    return pool_out_size(h, k0, s0, p0, ceil), pool_out_size(w, k1, s1, p1, ceil)


class FusedOSAStages(nn.Sequential):
    """timm VoVNet's ``stages`` (an ``nn.Sequential`` of ``OsaStage``: an optional max pool, then
    OSA blocks) whose steady-state CPU float32 inference is one native call. The same children,
    so the same ``state_dict``, indexing, slicing and iteration (timm's ``forward_intermediates``
    calls the stages one by one, each as before).

    Equivalent PyTorch::

        for stage in self:          # nn.Sequential
            x = stage(x)            # x = pool(x) if pool else x; x = blocks(x)

    Once every block has gathered its ``osa_block_steps`` arguments (:meth:`FusedOSA._native_steps`,
    from its second eager call), an inference call with the same input shape runs ``OsaChain``
    (csrc/conv.cpp): every pool and block in order, holding the blocks' arguments, with no Python
    between them. A block with an eSE gate and no identity that feeds a max pool is not gated over
    its whole output: the pool's 4x smaller output is scaled by the gate (``max(g * y) == g * max(y)``
    for ``g >= 0``, bit for bit, since rounding is monotonic). The chain is used while every dict
    slot it was built from (each module's children, each pool's settings, every block's own
    reads) holds the same object and no forward hook, gradient mode, autocast or forced backend is
    in the way; otherwise each stage runs its own forward. Under torch.compile, inference on the
    native backend is one op of the graph, ``effops::osa_stages`` (this eager path: the chain is
    faster than the blocks' compiled ops); everything else is traced stage by stage."""

    def __init__(self, *args):
        super().__init__(*args)
        self._chain = None
        self._handle = _register_stages(self)

    def __setstate__(self, state):  # deepcopy / unpickle: a handle of its own for compiled graphs
        super().__setstate__(state)
        self._handle = _register_stages(self)

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "FusedOSAStages":
        if not is_osa_stages(seq):
            raise ValueError("FusedOSAStages: expected an nn.Sequential of timm OsaStage modules with FusedOSA blocks "
                             "and effops MaxPool2d pools")
        new = cls(OrderedDict(seq._modules))
        new.train(seq.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            if not torch.is_grad_enabled() and isinstance(x, Tensor) and x.dtype == torch.float32 and native_fast(x) \
                    and x.dim() == 4:
                # Inference on the native backend: the eager path (the chain once built) as one opaque
                # op of the graph; it is faster than the blocks' compiled ops, and unlike a graph
                # break it costs no second frame and its guards.
                return STAGES_OP(x, self._handle)
            return super().forward(x)
        return self._eager(x)

    def _eager(self, x: Tensor) -> Tensor:
        c = self._chain
        if c is not None and type(x) is Tensor and not torch.is_grad_enabled() and x.dtype is torch.float32 \
                and x.shape == c.payload[0] and (not c.payload[3] or x.stride(1) == 1) \
                and native_fast(x) and not torch.is_autocast_enabled("cpu") \
                and not hooked(c.payload[2]) and c.current():
            y = c.payload[1].run(x)
            if y is not None:
                return y
            self._chain = None  # a weight's dtype, device or shape changed in place
        y = super().forward(x)
        if type(x) is Tensor and x.dtype is torch.float32 and not torch.is_grad_enabled() \
                and native_fast(x) and (c is None or not c.current()):
            self._chain = self._plan(x)  # None until every block has gathered its arguments
        return y

    def _plan(self, x: Tensor) -> Optional[SameObjects]:
        nat = native_module()
        if nat is None or not hasattr(nat, "OsaChain"):
            return None
        chain = nat.OsaChain()
        reads, shape = [], x.shape
        for m in self.modules():  # every child slot below: a replaced module anywhere rebuilds
            reads += [(m._modules, k) for k in m._modules]
        for stage in self._modules.values():
            if not _timm_osa_stage(stage):
                return None
            reads += [(stage.__dict__, "pool"), (stage.__dict__, "grad_checkpointing")]
            pool = stage._modules.get("pool")
            if pool is not None:
                a = pool.native_args(shape[2], shape[3]) if type(pool) is MaxPool2d and len(shape) == 4 else None
                if a is None:
                    return None
                reads += [(pool.__dict__, k) for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                                       "return_indices", "training")]
                chain.add_pool(*a, bool(pool.ceil_mode))
                shape = (shape[0], shape[1], *_pooled_hw(a, shape[2], shape[3], pool.ceil_mode))
            for blk in stage._modules["blocks"]._modules.values():
                bc = blk.__dict__.get("_steps_cache") if type(blk) is FusedOSA else None
                if bc is None or tuple(bc.payload[0]) != tuple(shape) or bc.payload[1] is not blk.identity \
                        or not bc.current():
                    return None
                reads += list(zip(bc.dicts, bc.keys)) + [(blk.__dict__, "identity")]
                chain.add_block(*bc.payload[2])
                shape = (shape[0], blk.concat_ch, shape[2], shape[3])
        # (a leading pool runs the NHWC kernel: the input must be channel-minor, as MaxPool2d requires)
        first_pool = next(iter(self._modules.values()))._modules.get("pool") is not None
        if first_pool and x.stride(1) != 1:
            return None
        return SameObjects(reads, (x.shape, chain, hook_dicts([self], FORWARD_HOOK_ATTRS), first_pool))


_STAGES: "dict[int, weakref.ref]" = {}
_STAGES_KEYS = itertools.count(1)


def _register_stages(stages: FusedOSAStages) -> int:
    key = next(_STAGES_KEYS)
    _STAGES[key] = weakref.ref(stages, lambda _, key=key: _STAGES.pop(key, None))
    return key


def _stages_of(handle: int) -> FusedOSAStages:
    ref = _STAGES.get(handle)
    stages = None if ref is None else ref()
    if stages is None:
        raise RuntimeError(f"effops::osa_stages: the FusedOSAStages with handle {handle} no longer exists")
    return stages


@torch.library.custom_op("effops::osa_stages", mutates_args=())
def _stages_op(x: Tensor, handle: int) -> Tensor:
    """A compiled graph's call of FusedOSAStages ``handle`` in eager inference (its chain, or the
    stages one by one where the chain gives way)."""
    with torch.no_grad():
        y = _stages_of(handle)._eager(x)
    return y.contiguous(memory_format=torch.channels_last)  # the strides the fake promises (no copy if so)


@_stages_op.register_fake
def _(x, handle):
    y = x
    for stage in _stages_of(handle):
        pool = stage._modules.get("pool")
        if pool is not None:
            y = nn.MaxPool2d.forward(pool, y)  # its output shape, whatever its settings
        for blk in stage._modules["blocks"]:
            y = y.new_empty((y.shape[0], blk.concat_ch, y.shape[2], y.shape[3]))
    return y.new_empty(y.shape).contiguous(memory_format=torch.channels_last)


STAGES_OP = torch.ops.effops.osa_stages.default


def describe_osa_stages(m: FusedOSAStages) -> str:
    blocks = sum(len(s.blocks) for s in m)
    pools = sum(s._modules.get("pool") is not None for s in m)
    return (f"VoVNet stages: {len(m)} stages ({blocks} OSA blocks, {pools} max pools) as one native call; an eSE "
            f"gate without identity before a max pool scales the pooled output")
