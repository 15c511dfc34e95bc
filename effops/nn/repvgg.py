"""``FusedRepVGGBlock``: a RepVGG block whose three branches run as one conv in eval.

RepVGG (Ding et al. 2021) trains ``act(bn(conv_kxk(x)) + bn(conv_1x1(x)) + bn(x))`` and
infers with the *structural re-parameterisation* of those three linear branches: one
k x k conv with bias. effops computes that merged conv on every eval call from the live
modules (in float64, cast once to the run dtype) and runs it as one ``conv_bn_act`` with
the activation in its epilogue, so training checkpoints, ``.data`` writes and BN statistics
updated in train mode are always what eval uses; nothing merged is cached. The per-call
merge is the inference op ``effops::reparam_merge`` (:mod:`effops.ops.reparam`: one Triton
pass on a GPU); :func:`merge_branches` is its differentiable definition.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import dispatch
from ..activations import activation_of, make_activation
from ..ops import reference
from ..ops.reparam import merge_unchecked
from ..native import module as native_module
from ..ops.conv import _OP, check_inputs, derived_reusable, native_fast
from .common import (BlockRule, ChildrenSnapshot, DerivedCache, slot_tensors, tensor_slots, frozen_bn, hook_dicts, hooked, is_batch_norm, looks_like_batch_norm,
                     register_block_rule, sequential_children, timm_bn_act)
from .conv_bn_act import FusedConvBNAct, _cast, _compute_dtype, _fused_activation, resolve_padding


def merge_branches(
    branches: Sequence[Tuple[Tensor, tuple]],
    identity_bn: Optional[tuple] = None,
    groups: int = 1,
    dtype: Optional[torch.dtype] = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tuple[Tensor, Tensor]:
    """Structural re-parameterisation (RepVGG, GhostNetV3, ...): the one conv and bias equal to
    the sum of several eval-mode conv → BN branches over the same input, plus an optional
    identity BN, computed in float64; the weight is cast once to ``dtype`` (default: the first
    branch's) and laid out in ``memory_format``, the bias is float32 (float64 for a float64 ``dtype``).

    ``branches`` are ``(conv weight, BN state)`` pairs, the first with the largest kernel; a BN state
    is ``(conv_bias, weight, bias, running_mean, running_var, eps)`` (``FusedConvBNAct.bn_state()``;
    ``identity_bn`` has ``conv_bias`` None). For RepVGG (``conv_kxk``, ``conv_1x1``, ``identity``),
    equivalent PyTorch::

        s, t = bn.weight / sqrt(bn.running_var + bn.eps), bn.bias - bn.running_mean * s   # per branch
        W = w_kxk * s_kxk[:, None, None, None]
        W[:, :, kh // 2, kw // 2] += w_1x1[:, :, 0, 0] * s_1x1[:, None]    # smaller kernels: centred
        for c in range(C_out):                     # identity: 1 at the centre of its own channel
            W[c, c % (C_in // groups), kh // 2, kw // 2] += s_id[c]
        b = t_kxk + t_1x1 + t_id

    so that ``sum(bn(conv(x)) for each branch) + bn_id(x) == F.conv2d(x, W, b, stride, padding, dilation,
    groups)`` when every conv pads by ``dilation * (k - 1) / 2`` (centred taps) with the same stride and
    groups. Differentiable; under ``torch.no_grad()`` the BatchNorm math of all branches is batched
    (``reference.bn_scale_bias_many``). The defining reference of the inference op
    :func:`effops.ops.reparam.reparam_merge`, which computes the same result in fewer passes.
    """
    cd = torch.float64
    states = [st for _, st in branches] + ([identity_bn] if identity_bn is not None else [])
    sb = reference.bn_scale_bias_many(states, cd)
    w0 = branches[0][0]
    s, bias = sb[0]
    # One pass: type promotion makes the product float64 without casting w0 first. It is a new
    # tensor, so the other branches are added into it in place.
    w = torch.mul(w0, s.view(-1, 1, 1, 1))
    kh, kw = w.shape[2], w.shape[3]
    for (wi, _), (si, bi) in zip(branches[1:], sb[1:]):
        ph, pw = (kh - wi.shape[2]) // 2, (kw - wi.shape[3]) // 2
        w[:, :, ph:ph + wi.shape[2], pw:pw + wi.shape[3]].add_(torch.mul(wi, si.view(-1, 1, 1, 1)))
        bias = bias + bi
    if identity_bn is not None:
        si, bi = sb[-1]
        c_out, c_in_g = w.shape[0], w.shape[1]
        if c_out % groups or c_out // groups != c_in_g:
            raise ValueError(f"an identity branch needs C_in == C_out; the weight is {tuple(w.shape)} with "
                             f"groups={groups}")
        # Output channel g * C_g + j reads input j of its group: the diagonal of each group's centre taps.
        w[:, :, kh // 2, kw // 2].view(groups, c_in_g, c_in_g).diagonal(0, 1, 2).add_(si.view(groups, c_in_g))
        bias = bias + bi
    dtype = dtype or w0.dtype
    return w.to(dtype, memory_format=memory_format), bias.to(_compute_dtype(dtype))


def _needs_grad(branches: Sequence[Tuple[Tensor, tuple]], identity_bn: Optional[tuple]) -> bool:
    states = [st for _, st in branches] + ([identity_bn] if identity_bn is not None else [])
    return any(w.requires_grad for w, _ in branches) or any(
        t is not None and t.requires_grad for st in states for t in st[:5])


def conv_bn_branch(container: nn.Module, what: str) -> FusedConvBNAct:
    """``container`` as conv → BN with no activation, as a FusedConvBNAct sharing its modules:
    timm ``ConvNormAct`` (``apply_act=False``), timm's EfficientNet-block ``ConvBnAct`` without
    skip (GhostNetV3's branches), or a Sequential. ValueError saying why not."""
    t = type(container)
    if t.__name__ == "ConvBnAct" and t.__module__.startswith("timm.") and "bn1" in container._modules:
        if container.has_skip:
            raise ValueError(f"{what} adds its input (has_skip): not a plain conv → BN branch")
        children = [(n, container._modules[n]) for n in ("conv", "bn1", "aa", "drop_path")
                    if container._modules.get(n) is not None]
        if set(n for n, _ in children) != set(container._modules):
            children = None
    else:
        children = sequential_children(container)
    if children is None:
        raise ValueError(f"{what} is a {t.__name__}, not a conv → BN container")
    children = [(n, c) for n, c in children if type(c) is not nn.Identity]
    if len(children) != 2 or not isinstance(children[0][1], nn.Conv2d) or not looks_like_batch_norm(children[1][1]):
        raise ValueError(f"{what} is not conv → BatchNorm ({[type(c).__name__ for _, c in children]})")
    (nc, conv), (nb, bn) = children
    try:
        unit = FusedConvBNAct.from_modules(conv, bn, None, names=(nc, nb, None))
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    if unit.activation[0] != "identity":
        raise ValueError(f"{what} applies {unit.activation[0]} inside its BN: the branch is not linear")
    return unit


def _identity_bn(bn: nn.Module, channels: int) -> nn.Module:
    if not is_batch_norm(bn):
        raise ValueError(f"the identity branch is a {type(bn).__name__}, not a BatchNorm2d")
    if timm_bn_act(bn) and (type(bn.drop) is not nn.Identity or _fused_activation(bn, None) != ("identity", 0.0)):
        raise ValueError(f"the identity branch's {type(bn).__name__} applies dropout or an activation")
    features = bn.running_mean.shape[0] if frozen_bn(bn) else bn.num_features
    if features != channels:
        raise ValueError(f"the identity BN has {features} features; the branches have {channels} channels")
    return bn


def bn_folds(bn: nn.Module) -> bool:
    """Whether an eval-mode BatchNorm normalises with running statistics (so it can be folded)."""
    if frozen_bn(bn):
        return True
    return not bn.training and bn._buffers.get("running_mean") is not None \
        and bn._buffers.get("running_var") is not None


def _identity_state(bn: nn.Module) -> tuple:
    bp, bb = bn._parameters, bn._buffers
    return (None, bp.get("weight", bb.get("weight")), bp.get("bias", bb.get("bias")), bb["running_mean"],
            bb["running_var"], bn.eps)


class MergedBranches:
    """Linear conv → BN branches over one input (+ an identity BN), summed: validated once,
    merged into one conv per call (:func:`merge_branches`) from the live modules. A plain object
    (not an ``nn.Module``): the modules stay children of the block that owns them."""

    def __init__(self, branches: Sequence[FusedConvBNAct], identity: Optional[nn.Module] = None):
        if not branches:
            raise ValueError("no conv branch to merge")
        branches = sorted(branches, key=lambda u: -u.conv.kernel_size[0] * u.conv.kernel_size[1])
        conv = branches[0].conv
        k, d = conv.kernel_size, conv.dilation
        c_in, c_out = conv.in_channels, conv.out_channels
        for u in branches:
            c = u.conv
            ki, di = c.kernel_size, c.dilation
            if len(branches) > 1 or identity is not None:
                if any(kk % 2 == 0 for kk in ki) or resolve_padding(c) != (di[0] * (ki[0] - 1) // 2,
                                                                           di[1] * (ki[1] - 1) // 2):
                    raise ValueError(f"branch conv {c} must have an odd kernel padded by dilation * (k - 1) / 2 "
                                     "for the branches to share centre taps")
            if (c.in_channels, c.out_channels, c.stride, c.groups) != (c_in, c_out, conv.stride, conv.groups):
                raise ValueError(f"branch convs differ in channels, stride or groups: {c} beside {conv}")
            if ki[0] > k[0] or ki[1] > k[1] or (max(ki) > 1 and di != d):
                raise ValueError(f"branch conv {c} doesn't fit inside {conv} (kernel or dilation)")
        if identity is not None:
            _identity_bn(identity, c_out)
            if c_in != c_out or conv.stride != (1, 1):
                raise ValueError(f"an identity branch needs in == out channels and stride 1, got {conv}")
        self.branches = list(branches)
        self.identity = identity

    @property
    def conv(self) -> nn.Conv2d:
        """The largest branch's conv: its stride, padding, dilation and groups are the merged conv's."""
        return self.branches[0].conv

    def batch_norms(self) -> List[nn.Module]:
        bns = [u.bn for u in self.branches if u.bn is not None]
        return bns + ([self.identity] if self.identity is not None else [])

    def folds(self) -> bool:
        return all(bn_folds(bn) for bn in self.batch_norms())

    def settings(self) -> tuple:
        return tuple(u._settings(*u._live_modules()) + (u.conv._parameters["weight"].shape,) for u in self.branches)

    def weight_bias(self, dtype: torch.dtype, memory_format=torch.contiguous_format) -> Tuple[Tensor, Tensor]:
        """The merged conv from the live modules: :func:`merge_branches` when a gradient is needed,
        else the inference op ``effops::reparam_merge`` (one Triton pass on a GPU)."""
        ident = None if self.identity is None else _identity_state(self.identity)
        branches = [(u.conv._parameters["weight"], u.bn_state()) for u in self.branches]
        if torch.is_grad_enabled() and _needs_grad(branches, ident):
            return merge_branches(branches, ident, self.conv.groups, dtype, memory_format)
        return merge_unchecked(branches, ident, self.conv.groups, dtype, memory_format)

    def describe(self) -> str:
        parts = ["x".join(map(str, u.conv.kernel_size)) for u in self.branches]
        return "+".join(parts + (["identity"] if self.identity is not None else []))


@dataclass
class _Plan:
    merged: Optional[MergedBranches] = None    # conv_kxk + conv_1x1 + identity (training form)
    deployed: Optional[FusedConvBNAct] = None  # reparam_conv (re-parameterised form)

    @property
    def conv(self) -> nn.Conv2d:
        return self.deployed.conv if self.deployed is not None else self.merged.conv


def _parse(m: nn.Module) -> _Plan:
    if m._modules.get("attn") is None or m._modules.get("act") is None:
        raise ValueError("no attn / act children")
    reparam = m._modules.get("reparam_conv")
    if reparam is not None:
        try:
            return _Plan(deployed=FusedConvBNAct.from_modules(reparam, None, None, names=("reparam_conv", None, None)))
        except ValueError as e:
            raise ValueError(f"reparam_conv: {e}") from None
    branches = [conv_bn_branch(m.conv_kxk, "conv_kxk")]
    if m.conv_1x1 is not None:
        branches.append(conv_bn_branch(m.conv_1x1, "conv_1x1"))
    merged = MergedBranches(branches, m.identity)
    if merged.conv is not branches[0].conv:
        raise ValueError("conv_1x1 has a larger kernel than conv_kxk")
    dp = m._modules.get("drop_path")
    if dp is not None and type(dp) is not nn.Identity and type(dp).__name__ != "DropPath":
        raise ValueError(f"drop_path is a {type(dp).__name__}")
    return _Plan(merged=merged)


class FusedRepVGGBlock(nn.Module):
    """timm's ``RepVggBlock`` (training form or re-parameterised), eval-mode merged into one conv.

    ``FusedRepVGGBlock(in_chs, out_chs, kernel_size=3, stride=1, dilation=1, groups=1, act="relu")``
    builds the training-form layout with timm's ``state_dict`` keys (``conv_kxk.conv.weight``,
    ``conv_kxk.bn.*``, ``conv_1x1.conv.weight``, ``conv_1x1.bn.*``, ``identity.*`` when
    ``in_chs == out_chs`` and ``stride == 1``); :meth:`from_module` wraps a timm block and keeps
    its children and names, so ``state_dict``s load both ways.

    Equivalent PyTorch (timm's forward)::

        if reparam_conv is not None:                       # already re-parameterised
            return act(attn(reparam_conv(x)))
        y = conv_1x1(x) + conv_kxk(x)                      # each conv → BN
        if identity is not None:
            y = drop_path(y) + identity(x)                 # identity: a BN
        return act(attn(y))

    * Eval (BNs in eval, no gradient needed, no hooks): ``effops::reparam_merge``
      (:func:`merge_branches`' result, one Triton pass on a GPU) merges the branches into one
      k x k weight and bias from the live modules, per call, in float64 (cast once to the run
      dtype, OHWI on a GPU), then one ``conv_bn_act`` (no scale, the bias, the
      activation in the epilogue). With an ``attn`` module (SE, ...) the conv runs without
      activation, then ``attn``, then ``act``, as the original orders them.
    * Train, or when a gradient is needed, or a hook watches a child: the original forward
      (exact PyTorch: each branch's batch statistics, autograd, hooks).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
                 groups: int = 1, act: str = "relu", device=None, dtype=None):
        super().__init__()
        for arg, v in (("in_chs", in_chs), ("out_chs", out_chs), ("kernel_size", kernel_size), ("groups", groups)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"FusedRepVGGBlock: {arg} must be a positive int, got {v!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"FusedRepVGGBlock: kernel_size must be odd (the 1x1 sits at its centre), "
                             f"got {kernel_size}")
        if in_chs % groups or out_chs % groups:
            raise ValueError(f"FusedRepVGGBlock: groups={groups} must divide in_chs={in_chs} and out_chs={out_chs}")
        dd = dict(device=device, dtype=dtype)
        holder = nn.Module()
        holder.identity = nn.BatchNorm2d(out_chs, **dd) if in_chs == out_chs and stride == 1 else None
        pad = dilation * (kernel_size - 1) // 2
        holder.conv_kxk = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_chs, out_chs, kernel_size, stride, pad, dilation, groups, bias=False, **dd),
            bn=nn.BatchNorm2d(out_chs, **dd)))
        holder.conv_1x1 = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_chs, out_chs, 1, stride, 0, groups=groups, bias=False, **dd),
            bn=nn.BatchNorm2d(out_chs, **dd)))
        holder.drop_path = nn.Identity()
        holder.attn = nn.Identity()
        holder.act = make_activation(act)
        self._setup(holder)

    @classmethod
    def from_module(cls, module: nn.Module) -> "FusedRepVGGBlock":
        """Wrap a timm ``RepVggBlock`` (training form, or re-parameterised: ``reparam_conv``),
        sharing its children; ValueError saying why when it can't be merged."""
        if not is_repvgg_block(module):
            raise ValueError(f"{type(module).__name__} is not timm's RepVggBlock")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(module)
        self.training = module.training  # its children keep their own modes
        return self

    def _setup(self, m: nn.Module) -> None:
        plan = _parse(m)
        for n, c in m.named_children():
            self.add_module(n, c)
        # What timm's forward tests with ``is None``: plain attributes when the branch is absent.
        for n in ("reparam_conv", "identity", "conv_1x1", "conv_kxk"):
            if n not in self._modules and n in m.__dict__:
                setattr(self, n, m.__dict__[n])
        self._finish(plan)

    def _finish(self, plan: Optional[_Plan]) -> None:
        self.__dict__["_plan"] = plan  # wrappers sharing the children: not registered twice
        if plan is not None:
            c = plan.conv
            self.groups, self.in_chs, self.out_chs = c.groups, c.in_channels, c.out_channels
        self._hooks = hook_dicts(list(self.children()))
        self._snapshot = ChildrenSnapshot(list(self.children()))
        self._merged = DerivedCache()
        self.__dict__["_slots"] = None
        self._fingerprint = self._live_settings()
        self._checked = None

    def _live_settings(self) -> tuple:
        p = self._plan
        if p is None:
            return ()
        if p.deployed is not None:
            u = p.deployed
            return u._settings(*u._live_modules()) + (u.conv._parameters["weight"].shape,)
        return p.merged.settings()

    def _refresh(self) -> None:
        """Parse the children again after one was replaced or a conv setting changed; when they no
        longer form a block this class merges, the original forward runs (warning once)."""
        holder = nn.Module()
        for n, c in self.named_children():
            holder.add_module(n, c)
        for n in ("reparam_conv", "identity", "conv_1x1", "conv_kxk"):
            if n not in holder._modules:
                setattr(holder, n, self.__dict__.get(n))
        try:
            plan = _parse(holder)
        except ValueError as e:
            warnings.warn(f"effops.FusedRepVGGBlock runs unfused: its modules changed and {e}", stacklevel=3)
            plan = None
        self._finish(plan)

    def extra_repr(self) -> str:
        return ("unfused" if self._plan is None else describe_branches(self)) + f", act={type(self.act).__name__}"

    # -- the merged conv -------------------------------------------------------------
    def merged_weight_bias(self, dtype: Optional[torch.dtype] = None,
                           memory_format: torch.memory_format = torch.contiguous_format) -> Tuple[Tensor, Tensor]:
        """The one conv equal to the block's eval-mode branches: ``(weight in dtype, bias in
        float32 / float64)`` from the live modules (:meth:`MergedBranches.weight_bias`; the
        deployed form's own conv). Computed on every call; nothing is cached."""
        p = self._plan
        if p is None:
            raise RuntimeError("FusedRepVGGBlock: its children no longer form a block it can merge")
        if p.deployed is not None:
            conv = p.deployed.conv
            w, b = conv._parameters["weight"], conv._parameters["bias"]
            dtype = dtype or w.dtype
            return (_cast(w, dtype).contiguous(memory_format=memory_format),
                    None if b is None else _cast(b, _compute_dtype(dtype)))
        return p.merged.weight_bias(dtype or p.conv.weight.dtype, memory_format)

    def _merge_sources(self):
        """Every tensor the merged conv is computed from (the block's parameters and buffers,
        outside ``attn``), read through slots collected once per plan."""
        slots = self.__dict__.get("_slots")
        if slots is None:
            slots = self.__dict__["_slots"] = tensor_slots(self, skip=self.attn)
        return slot_tensors(slots)

    # -- forward -------------------------------------------------------------------
    def _fusable(self, x: Tensor) -> bool:
        p = self._plan
        if p is None or hooked(self._hooks) or (p.merged is not None and not p.merged.folds()):
            return False
        dp = self._modules.get("drop_path")
        if dp is not None and dp.training and type(dp) is not nn.Identity:
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in self.parameters())))

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = f"a {x.dim()}-D tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"FusedRepVGGBlock expected a 4-D input (N, C, H, W), got {got}")
        if x.shape[1] != self.in_chs:
            raise ValueError(f"FusedRepVGGBlock expected an input with {self.in_chs} channels, "
                             f"got shape {tuple(x.shape)}")
        if self._snapshot.changed() or self._live_settings() != self._fingerprint:
            self._refresh()
        if not self._fusable(x):
            return self.forward_unfused(x)
        dev = x.device.type
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) and x.dtype != torch.float64:
            dtype = torch.get_autocast_dtype(dev)  # (autocast leaves float64 tensors alone)
            x = x.to(dtype)
        else:
            dtype = self._plan.conv.weight.dtype
        conv = self._plan.conv
        if not torch.compiler.is_compiling() and native_fast(x):
            # CPU inference: the merged conv is derived once per parameter state (a merge costs
            # about as much as the conv), and the native conv prepacks it once.
            srcs = [t for t in self._merge_sources()]
            w, b = self._merged.get(srcs, lambda: self.merged_weight_bias(dtype), dtype)
            fuse_act = type(self.attn) is nn.Identity and activation_of(self.act) is not None
            act, act_param = activation_of(self.act) if fuse_act else ("identity", 0.0)
            y = native_module().conv_scale_bias_act(x, w, None, b, None, None, conv.stride, resolve_padding(conv),
                                                    conv.dilation, conv.groups, act, act_param, False)
            return y if fuse_act else self.act(self.attn(y))
        # On a GPU the conv kernels read OHWI weights: lay the merged weight out that way once.
        # Derived once per parameter state here too (the merge is a kernel launch, or a dozen
        # small ops, per call otherwise), except while tracing or capturing a CUDA graph.
        fmt = torch.channels_last if x.is_cuda else torch.contiguous_format
        srcs = self._merge_sources()
        if derived_reusable(x, srcs):
            w, b = self._merged.get(srcs, lambda: self.merged_weight_bias(dtype, fmt), (dtype, fmt))
        else:
            w, b = self.merged_weight_bias(dtype, fmt)
        fuse_act = type(self.attn) is nn.Identity and activation_of(self.act) is not None
        act, act_param = activation_of(self.act) if fuse_act else ("identity", 0.0)
        pad = resolve_padding(conv)
        compiling = torch.compiler.is_compiling()
        sig = (x.shape, x.dtype, x.device, w.dtype, w.device, conv.stride, pad, conv.dilation, conv.groups)
        if compiling or sig != self._checked:  # eager: validate each new signature once
            check_inputs(x, w, None, b, None, conv.stride, pad, conv.dilation, conv.groups, act)
            if not compiling:
                self._checked = sig
        args = (x, w, None, b, None, conv.stride, pad, conv.dilation, conv.groups, act, act_param, False)
        if compiling:
            y = _OP(*args)
        else:  # eager inference: the op's implementation without the torch.library layers
            y = dispatch.run("conv_bn_act", x, w, None, b, None, None, *args[5:])
        if fuse_act:
            return y
        return self.act(self.attn(y))

    def forward_unfused(self, x: Tensor) -> Tensor:
        """timm's ``RepVggBlock.forward`` with the original modules (the training path; exact semantics)."""
        if self._modules.get("reparam_conv") is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)
            x += identity
        x = self.attn(x)
        return self.act(x)


def is_repvgg_block(m: nn.Module) -> bool:
    """timm's ``RepVggBlock`` (recognised by type: its forward is known)."""
    t = type(m)
    return t.__name__ == "RepVggBlock" and t.__module__.startswith("timm.")


def describe_branches(fused: FusedRepVGGBlock) -> str:
    p = fused._plan
    c = p.conv
    s = f" s{c.stride[0]}" if c.stride != (1, 1) else ""
    g = f" g{c.groups}" if c.groups != 1 else ""
    if p.deployed is not None:
        k = "x".join(map(str, c.kernel_size))
        return f"re-parameterised conv{k}{s}{g} {c.in_channels}→{c.out_channels} + bias"
    return f"{p.merged.describe()}{s}{g} {c.in_channels}→{c.out_channels}"


def _describe(fused: FusedRepVGGBlock) -> str:
    c = fused._plan.conv
    k = "x".join(map(str, c.kernel_size))
    s = f" s{c.stride[0]}" if c.stride != (1, 1) else ""
    g = f" g{c.groups}" if c.groups != 1 else ""
    act = activation_of(fused.act)
    act_name = act[0] if act is not None else type(fused.act).__name__
    tail = f" + bias + {act_name}" if type(fused.attn) is nn.Identity else \
        f" + bias → {type(fused.attn).__name__} → {act_name}"
    if fused._plan.deployed is not None:
        return f"RepVGG block (re-parameterised) → conv{k}{s}{g} {c.in_channels}→{c.out_channels}{tail}"
    return f"RepVGG block {describe_branches(fused)} → one conv{k}{s}{g}{tail} (merged in fp64)"


REPVGG_RULE = register_block_rule(BlockRule(
    name="RepVGG block",
    matches=is_repvgg_block,
    build=FusedRepVGGBlock.from_module,
    describe=_describe,
    fused_type=FusedRepVGGBlock,
))
