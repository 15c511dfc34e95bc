"""``FusedShuffleV2Block``: the ShuffleNet V2 unit with no ``torch.cat`` and no shuffle pass.

torchvision's ``InvertedResidual`` (``torchvision.models.shufflenet_v2_*``) computes::

    if stride == 1:
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, branch2(x2)), dim=1)
    else:
        out = torch.cat((branch1(x), branch2(x)), dim=1)
    out = channel_shuffle(out, 2)       # view → transpose → contiguous → view

With two groups the shuffle interleaves the halves: output channel ``2c`` is channel
``c`` of the left half (``x1`` or ``branch1``), ``2c + 1`` channel ``c`` of ``branch2``.
So in eval the unit allocates its output once and each branch's last conv writes its
channels straight into a channel view with step 2 (``out[:, 0::2]``, ``out[:, 1::2]``);
for stride 1 the identity half is one strided copy into ``out[:, 0::2]``, read through a
channel view of ``x`` (the split is ``x[:, :C/2]`` / ``x[:, C/2:]``, no chunk copy). The
concatenated tensor and the shuffle's extra read and write never exist.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..activations import activation_of
from ..native import module as native_module
from ..ops.conv import NATIVE_BN_OP, _out_hw, native_fast, output_format
from ..ops.shuffle import INTERLEAVE_NATIVE_OP
from .common import BlockRule, ChildrenSnapshot, hook_dicts, hooked, is_plain_sequential, looks_like_batch_norm, \
    register_block_rule
from .conv_bn_act import FusedConvBNAct, resolve_padding, why_not_fusable

_TV_MODULE = "torchvision.models.shufflenetv2"


def is_shufflenet_v2_unit(m: nn.Module) -> bool:
    """Whether ``m`` is torchvision's ShuffleNetV2 ``InvertedResidual`` (by class name and
    module path: effops never imports torchvision) with its ``branch1`` / ``branch2``
    Sequentials and an int ``stride``. Cheap; :meth:`FusedShuffleV2Block.from_module`
    then checks what is inside the branches."""
    t = type(m)
    if t.__name__ != "InvertedResidual" or t.__module__ != _TV_MODULE:
        return False
    ch = m._modules
    return set(ch) == {"branch1", "branch2"} and all(is_plain_sequential(c) for c in ch.values()) \
        and isinstance(getattr(m, "stride", None), int)


def _channel_shuffle(x: Tensor, groups: int) -> Tensor:
    # torchvision.models.shufflenetv2.channel_shuffle, op for op (the train path is PyTorch's own).
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, c, h, w)


def _runs(seq: nn.Sequential, what: str) -> List[FusedConvBNAct]:
    """``seq``'s children as conv [→ BN] [→ act] runs, each a FusedConvBNAct sharing the
    modules; ValueError naming what doesn't fit."""
    items = list(seq._modules.items())
    runs, i = [], 0
    while i < len(items):
        name, conv = items[i]
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{what}.{name} is a {type(conv).__name__} where a conv was expected "
                             f"(a branch must be conv → BN [→ activation] runs)")
        names, bn, act = [name, None, None], None, None
        i += 1
        if i < len(items) and looks_like_batch_norm(items[i][1]):
            names[1], bn = items[i]
            i += 1
        if i < len(items) and not isinstance(items[i][1], nn.Conv2d):
            names[2], act = items[i]
            i += 1
            if activation_of(act) is None:
                raise ValueError(f"{what}.{names[2]}: {type(act).__name__} is not a supported activation")
        why = why_not_fusable(conv, bn, act)
        if why is not None:
            raise ValueError(f"{what}.{name}: {why}")
        runs.append(FusedConvBNAct.from_modules(conv, bn, act, names=tuple(names)))
    return runs


def _run_text(f: FusedConvBNAct) -> str:
    c = f.conv
    k = "x".join(map(str, c.kernel_size))
    s = f"dw{k}" if c.groups == c.in_channels == c.out_channels and c.groups > 1 else f"conv{k}"
    if c.stride != (1, 1):
        s += "/s" + ("x".join(map(str, c.stride)) if c.stride[0] != c.stride[1] else str(c.stride[0]))
    if f.bn is not None:
        s += "+bn"
    act = f.activation[0]
    return s + ("" if act == "identity" else f"+{act}")


@dataclass
class _Plan:
    """What the fused path runs: the branches as conv-BN-act steps (sharing the modules)."""

    stride: int
    in_ch: int
    out_ch: int
    left: List[FusedConvBNAct]       # branch1 (stride > 1); empty for stride 1 (the identity half)
    right: List[FusedConvBNAct]      # branch2


def _chain_channels(runs: List[FusedConvBNAct], c_in: int, what: str) -> int:
    for f in runs:
        c = f.conv
        if c.in_channels != c_in:
            raise ValueError(f"{what}: a conv reads {c.in_channels} channels where {c_in} arrive")
        c_in = c.out_channels
    return c_in


def _plan_of(stride, branch1: nn.Module, branch2: nn.Module) -> _Plan:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    for name, b in (("branch1", branch1), ("branch2", branch2)):
        if not is_plain_sequential(b):
            raise ValueError(f"{name} is a {type(b).__name__}, not an nn.Sequential")
    right = _runs(branch2, "branch2")
    if not right:
        raise ValueError("branch2 is empty")
    half = right[0].conv.in_channels
    if stride == 1:  # the left half is x[:, :C/2] itself; branch1 is not called
        left, in_ch = [], 2 * half
        if _chain_channels(right, half, "branch2") != half:
            raise ValueError(f"stride 1: branch2 must keep its {half} channels (the output interleaves it with the "
                             f"identity half), got {right[-1].conv.out_channels}")
        out_half = half
    else:
        left = _runs(branch1, "branch1")
        if not left:
            raise ValueError(f"stride {stride} needs a branch1, and it is empty")
        in_ch = half
        out_half = _chain_channels(right, in_ch, "branch2")
        out_left = _chain_channels(left, in_ch, "branch1")
        if out_left != out_half:
            raise ValueError(f"branch1 writes {out_left} channels and branch2 {out_half}: the g=2 shuffle "
                             "interleaves two equal halves")
    return _Plan(stride, in_ch, 2 * out_half, left, right)


def _branch_hw(runs: List[FusedConvBNAct], h: int, w: int) -> Optional[Tuple[int, int]]:
    """Output size of a branch for an ``h`` x ``w`` input from the live conv settings (None if
    one can't be expressed: its module then decides)."""
    for f in runs:
        c = f.conv
        pad = resolve_padding(c)
        if pad is None or c.padding_mode != "zeros":
            return None
        h, w = _out_hw(h, w, c.kernel_size, c.stride, pad, c.dilation)
    return h, w


def _new_output(shape: Tuple[int, ...], dtype: torch.dtype, x: Tensor) -> Tensor:
    """The unit's output, allocated once: NHWC when ``x`` is (the layout every effops op returns)."""
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=output_format(x))


class FusedShuffleV2Block(nn.Module):
    """ShuffleNet V2 unit (torchvision ``InvertedResidual``) whose concat and channel shuffle
    are write patterns of its convs.

    ``FusedShuffleV2Block(inp, oup, stride)`` builds torchvision's layout (children
    ``branch1`` / ``branch2``, same ``state_dict`` keys); :meth:`from_module` wraps an
    existing ``InvertedResidual``, sharing its modules.

    Equivalent PyTorch::

        if stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, branch2(x2)), dim=1)   # branch2: 1x1-BN-ReLU → dw3x3-BN → 1x1-BN-ReLU
        else:
            out = torch.cat((branch1(x), branch2(x)), dim=1)   # branch1: dw3x3/s-BN → 1x1-BN-ReLU
        n, c, h, w = out.shape
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)

    * Eval (every BN in eval, no gradient needed, no hook on a child): the output is
      allocated once (NHWC when ``x`` is channels_last, see
      :func:`effops.ops.conv.output_format`); each conv step is a fused conv+BN+act
      (:class:`~effops.FusedConvBNAct`); branch2's last conv writes channels ``1::2`` of the
      output, branch1's last conv (stride > 1) writes ``0::2``, and for stride 1 the identity
      half ``x[:, :C/2]`` is copied once into ``0::2``. ``x[:, C/2:]`` feeds branch2 as a view.
      On the native CPU backend the branches end in dense tensors instead (each last conv runs
      whichever implementation is fastest for it) and one vectorised pass interleaves the two
      halves into the output.
    * Training, gradients, hooks on a child: the forward above with the original modules,
      so running statistics and autograd are exactly PyTorch's.
    * An empty batch returns the empty result of the forward above.
    * A child replaced after construction is noticed on the next call: the branches are
      parsed again, and if they no longer form a unit the fused path can run, the forward
      above runs (with a one-time warning saying why).
    """

    def __init__(self, inp: int, oup: int, stride: int, *, device=None, dtype=None):
        super().__init__()
        for arg, v in (("inp", inp), ("oup", oup), ("stride", stride)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FusedShuffleV2Block: {arg} must be a positive int, got {v!r}")
        bf = oup // 2
        if oup % 2:
            raise ValueError(f"FusedShuffleV2Block: oup must be even (two interleaved halves), got {oup}")
        if stride == 1 and inp != 2 * bf:
            raise ValueError(f"FusedShuffleV2Block: stride 1 needs inp == oup, got inp={inp}, oup={oup}")
        dd = dict(device=device, dtype=dtype)

        def dw(c):
            return nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False, **dd)

        def pw(ci, co):
            return nn.Conv2d(ci, co, 1, 1, 0, bias=False, **dd)

        if stride > 1:
            branch1 = nn.Sequential(dw(inp), nn.BatchNorm2d(inp, **dd), pw(inp, bf), nn.BatchNorm2d(bf, **dd),
                                    nn.ReLU(inplace=True))
        else:
            branch1 = nn.Sequential()
        branch2 = nn.Sequential(pw(inp if stride > 1 else bf, bf), nn.BatchNorm2d(bf, **dd), nn.ReLU(inplace=True),
                                dw(bf), nn.BatchNorm2d(bf, **dd),
                                pw(bf, bf), nn.BatchNorm2d(bf, **dd), nn.ReLU(inplace=True))
        self._setup(stride, branch1, branch2)

    @classmethod
    def from_module(cls, module: nn.Module) -> "FusedShuffleV2Block":
        """Wrap torchvision's ``InvertedResidual`` (its ``branch1`` / ``branch2`` are shared, not
        copied). ValueError, saying why, for anything else or a unit that can't be fused."""
        t = type(module)
        if not is_shufflenet_v2_unit(module):
            raise ValueError(f"{t.__module__}.{t.__name__} is not torchvision's ShuffleNetV2 InvertedResidual "
                             "(branch1 / branch2 Sequentials and an int stride)")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(module.stride, module.branch1, module.branch2)
        return self

    def _setup(self, stride: int, branch1: nn.Module, branch2: nn.Module) -> None:
        plan = _plan_of(stride, branch1, branch2)
        self.add_module("branch1", branch1)
        self.add_module("branch2", branch2)
        self.stride = stride
        self._install(plan)

    def _install(self, plan: Optional[_Plan], why: Optional[str] = None) -> None:
        # A plain attribute: the FusedConvBNAct steps share branch1/branch2's modules and must
        # not appear twice in state_dict() / modules().
        self._plan = plan
        if plan is not None:  # kept from the last unit that parsed
            self.in_ch, self.out_ch = plan.in_ch, plan.out_ch
        self._why_unfused = why
        self._warned = False
        self._hooks = hook_dicts([self.branch1, self.branch2])
        # Noticing a child replaced after construction (block.branch2[2] = nn.SiLU(), ...).
        self._snapshot = ChildrenSnapshot([self])
        self._planned_stride = self.stride

    def _reparse(self) -> None:
        try:
            self._install(_plan_of(self.stride, self.branch1, self.branch2))
        except ValueError as e:
            self._install(None, f"its modules changed after construction and no longer form a unit it can fuse: {e}")

    # -- description -------------------------------------------------------------------
    def describe(self) -> str:
        """One line: what was fused into what (the converter's report line)."""
        p = self._plan
        if p is None:
            return f"ShuffleNetV2 unit s{self.stride} (unfused: {self._why_unfused})"
        right = " → ".join(_run_text(f) for f in p.right)
        head = f"ShuffleNetV2 unit s{p.stride} {p.in_ch}→{p.out_ch}: "
        if p.stride == 1:
            return (head + f"split as a view, branch2 {right} writes shuffled channels 1::2, identity copied into "
                    "0::2 (no cat, no shuffle pass)")
        left = " → ".join(_run_text(f) for f in p.left)
        return head + f"branch1 {left} writes shuffled channels 0::2, branch2 {right} writes 1::2 (no cat, no " \
                      "shuffle pass)"

    def extra_repr(self) -> str:
        return f"stride={self.stride}"

    # -- forward -------------------------------------------------------------------------
    def _fusable(self, x: Tensor) -> bool:
        p = self._plan
        if p is None or hooked(self._hooks):
            return False
        if any(not f._folds(f.bn) for f in p.left) or any(not f._folds(f.bn) for f in p.right):
            return False  # a BN in training mode: batch statistics
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in self.parameters())):
            return False  # writes into views of one buffer have no autograd; PyTorch's forward has
        return True

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = f"a {x.dim()}-D tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"FusedShuffleV2Block expected a 4-D input (N, C, H, W), got {got}")
        if torch.compiler.is_compiling():
            y = self._forward_compiled(x)
            if y is not None:
                return y
        if self._snapshot.changed() or self.stride != self._planned_stride:
            self._reparse()
        p = self._plan
        if p is not None and x.shape[1] != p.in_ch:
            raise ValueError(f"FusedShuffleV2Block expected an input with {p.in_ch} channels, got shape "
                             f"{tuple(x.shape)}")
        if p is None and self._why_unfused is not None and not self._warned:
            warnings.warn(f"effops.FusedShuffleV2Block runs unfused: {self._why_unfused}", stacklevel=2)
            self._warned = True
        if not self._fusable(x):
            return self.forward_unfused(x)
        dtype = x.dtype
        dev = x.device.type
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
            if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return self.forward_unfused(x)  # autocast leaves such inputs alone; so do the modules
            # The convs run in the autocast dtype (FusedConvBNAct casts); torch.cat promotes the
            # identity half with branch2's output, so stride 1 returns the wider of the two.
            dtype = torch.get_autocast_dtype(dev)
            out_dtype = torch.promote_types(x.dtype, dtype) if p.stride == 1 else dtype
        else:
            out_dtype = dtype
        n, _, h, w = x.shape
        hw = _branch_hw(p.right, h, w)
        if hw is None or (p.stride == 1 and hw != (h, w)) or (p.stride > 1 and _branch_hw(p.left, h, w) != hw):
            return self.forward_unfused(x)  # shapes that don't interleave: PyTorch's own forward (and error)
        if n == 0:  # nothing to compute; PyTorch's forward gives the empty result (and its dtype checks)
            return self.forward_unfused(x)
        half = p.in_ch // 2
        if torch.compiler.is_compiling() and out_dtype == dtype:
            # Under torch.compile: the branches as functional ops and the interleave as one op (the
            # native kernel on CPU) or one expression, which inductor lowers to a single copy kernel
            # (writes into channel views of a fresh buffer would be functionalised into extra copies).
            b = self._branch_compiled(p.right, x[:, half:] if p.stride == 1 else x)
            a = x[:, :half] if p.stride == 1 else self._branch_compiled(p.left, x)
            if native_fast(x) and x.stride(1) == 1 and a.dtype == b.dtype:
                return INTERLEAVE_NATIVE_OP(a, b)  # the eager path's interleave kernel, as one op
            return torch.stack((a, b), dim=2).flatten(1, 2).contiguous(memory_format=output_format(x))
        out = _new_output((n, p.out_ch) + hw, out_dtype, x)
        if out_dtype == dtype and native_fast(x) and x.stride(1) == 1:
            # CPU, native backend: each branch ends in a dense tensor (the conv implementation that
            # is fastest for it, not one that can write every other channel), and one vectorised
            # pass interleaves the two halves into the output (strided channel copies run far
            # slower than this on a CPU).
            b = self._branch_value(p.right, x[:, half:] if p.stride == 1 else x)
            a = x[:, :half] if p.stride == 1 else self._branch_value(p.left, x)
            native_module().interleave_channels(a, b, out)  # both halves in out's dtype here
            return out
        even, odd = out[:, 0::2], out[:, 1::2]
        self._branch(p.right, x[:, half:] if p.stride == 1 else x, odd, out_dtype == dtype)
        if p.stride == 1:
            even.copy_(x[:, :half])
        else:
            self._branch(p.left, x, even, True)
        return out

    def _forward_compiled(self, x: Tensor) -> Optional[Tensor]:
        """Under torch.compile on CPU, inference: each branch as functional native ops (their
        configuration from graph constants: :meth:`FusedConvBNAct._compiled_native_args`) and the
        interleave as one op. None where the full path of :meth:`forward` decides (a child replaced,
        a hook, gradients, autocast, other backends, shapes that don't interleave)."""
        p = self._plan
        if p is None or self._snapshot.changed() or self.stride != self._planned_stride or hooked(self._hooks) \
                or type(x) is not Tensor or x.dim() != 4 or x.shape[1] != p.in_ch or x.shape[0] == 0 \
                or not native_fast(x) or x.stride(1) != 1 or torch.is_autocast_enabled("cpu"):
            return None
        half = p.in_ch // 2
        b = self._branch_native(p.right, x[:, half:] if p.stride == 1 else x)
        if b is None:
            return None
        if p.stride == 1:
            a = x[:, :half]
            if b.shape[2:] != x.shape[2:]:
                return None
        else:
            a = self._branch_native(p.left, x)
            if a is None or a.shape != b.shape:
                return None
        return INTERLEAVE_NATIVE_OP(a, b)

    @staticmethod
    def _branch_native(runs: List[FusedConvBNAct], y: Tensor) -> Optional[Tensor]:
        for f in runs:
            a = f._compiled_native_args(y, None, True, None)
            if a is None:
                return None
            w, st, stride, padding, dilation, groups, act, act_param = a
            y = NATIVE_BN_OP(y, w, *st[:6], None, stride, padding, dilation, groups, act, act_param, True, None, 1,
                             st[6])
        return y

    @staticmethod
    def _branch_compiled(runs: List[FusedConvBNAct], y: Tensor) -> Tensor:
        # Each step as the functional native op where it applies (CPU): the unit's own snapshot and
        # hook registries cover the steps' modules, so the trace needs no second copy of the
        # steps' checks (each one a guard evaluated on every call of the compiled model).
        for f in runs:
            z = f._compiled_native(y)
            y = f(y) if z is None else z
        return y

    @staticmethod
    def _branch_value(runs: List[FusedConvBNAct], y: Tensor) -> Tensor:
        for f in runs:
            y = f(y)
        return y

    @staticmethod
    def _branch(runs: List[FusedConvBNAct], y: Tensor, dst: Tensor, direct: bool) -> None:
        y = FusedShuffleV2Block._branch_value(runs[:-1], y)
        if direct:  # dst: a channel view of the unit's fresh output, disjoint from y
            runs[-1]._into_trusted(y, dst)
        else:  # autocast, stride 1: branch2 computed in the autocast dtype, stored promoted
            dst.copy_(runs[-1](y))

    def forward_unfused(self, x: Tensor) -> Tensor:
        """torchvision's ``InvertedResidual.forward`` with the original modules (the training path)."""
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _channel_shuffle(out, 2)


register_block_rule(BlockRule(
    name="ShuffleNetV2 unit",
    matches=is_shufflenet_v2_unit,
    build=FusedShuffleV2Block.from_module,
    describe=lambda fused: fused.describe(),
    fused_type=FusedShuffleV2Block,
))
