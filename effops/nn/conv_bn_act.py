"""``FusedConvBNAct``: drop-in for Conv2d → BatchNorm2d → activation."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..activations import activation_of, apply_activation, make_activation
from ..ops import reference
from .. import dispatch
from ..ops.conv import _OP, check_inputs

_HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, f"_global{a}", {}) for a in _HOOK_ATTRS)


def hook_dicts(modules) -> tuple:
    """The hook registries of ``modules`` and everything below them. Registering a hook
    adds to these dicts in place, so ``hooked()`` of the tuple stays current without
    walking the module tree on every forward (~1 us for a whole FusedOSA)."""
    seen, out = set(), []
    for top in modules:
        for m in top.modules():
            if id(m) not in seen:
                seen.add(id(m))
                out.extend(getattr(m, a) for a in _HOOK_ATTRS)
    return tuple(out)


def hooked(dicts: tuple) -> bool:
    """Whether a hook would observe one of the modules behind ``dicts`` (a ``hook_dicts``
    tuple) being called: one registered on them, or a global module hook. Fused paths
    never call those modules, so their owners then run the modules themselves."""
    return any(dicts) or any(_GLOBAL_HOOKS)


def version_cached(entry, tensors, extra, compute):
    """``(entry, value)``: ``compute()``'s result, cached in ``entry`` (a ``(key, value)`` pair
    or None, owned by the caller) until any of ``tensors`` is modified in place, moved or
    replaced, or ``extra`` changes. Not cached while compiling, when autograd needs the
    result, or for inference tensors (no version counter); ``entry`` is then returned as is."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return entry, compute()  # differentiable / traced
    try:
        key = (extra, tuple([(t.data_ptr(), t._version) for t in tensors]))
    except RuntimeError:
        return entry, compute()
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, compute())
    return entry, entry[1]


def _timm_bn_act(bn: nn.Module) -> bool:
    """timm's BN modules that apply their own activation (``bn.drop`` then ``bn.act``)."""
    return type(bn).__name__ in ("BatchNormAct2d", "FrozenBatchNormAct2d") and type(bn).__module__.startswith("timm.")


def frozen_bn(bn: Optional[nn.Module]) -> bool:
    """torchvision's ``FrozenBatchNorm2d`` and timm's ``FrozenBatchNormAct2d`` (what timm's
    ``freeze_batch_norm_2d`` swaps in): affine and statistics are buffers, and they always
    normalise with the running statistics."""
    t = type(bn)
    return (t.__name__ == "FrozenBatchNorm2d" and t.__module__.startswith("torchvision.")) or \
        (t.__name__ == "FrozenBatchNormAct2d" and t.__module__.startswith("timm."))


def is_batch_norm(bn: Optional[nn.Module]) -> bool:
    """A BatchNorm this library folds: ``nn.BatchNorm2d``, timm ``BatchNormAct2d``, torchvision ``FrozenBatchNorm2d``."""
    return type(bn) is nn.BatchNorm2d or _timm_bn_act(bn) or frozen_bn(bn)


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
        if _timm_bn_act(bn) and type(bn.drop) is not nn.Identity:
            return "BatchNormAct2d with dropout"
    if act is not None and activation_of(act) is None:
        return f"activation {type(act).__name__} is not supported"
    if bn is not None and _timm_bn_act(bn) and activation_of(bn.act) is None:
        return f"activation {type(bn.act).__name__} inside BatchNormAct2d is not supported"
    return None


class FusedConvBNAct(nn.Module):
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
    * Otherwise BN is folded into the conv in float32, cast once to the input
      dtype and cached; the cache is re-derived when any parameter or buffer
      changes (in-place updates included), moves or changes dtype. The fused
      op supports autograd, so gradients reach the conv and BN parameters
      (frozen-BN fine-tuning); in that case the fold is recomputed each call.

    * While a hook is registered on the conv, the BN or the activation (or a
      global module hook exists), those modules are called one after the other,
      so the hooks fire as they did before fusion.

    ``forward(x, residual=None, residual_after_act=True)`` optionally adds a
    residual tensor of the output's shape, after (or before) the activation.
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
        why = why_not_fusable(conv, bn, act)
        if why is not None:
            raise ValueError(f"cannot fuse {type(conv).__name__} → {type(bn).__name__} → {type(act).__name__}: {why}")
        if len(names) != 3:
            raise ValueError(f"names must be (conv, bn, act) child names, got {names}")
        self.add_module(names[0], conv)
        if bn is not None:
            self.add_module(names[1], bn)
        act_src = act
        if bn is not None and _timm_bn_act(bn):
            # BatchNormAct2d applies its own activation; an extra one is only meaningful
            # (and accepted) when the BN's is Identity, e.g. act(bn(conv(x)) + residual).
            if act is None:
                act_src = bn.act
            elif type(bn.act) is not nn.Identity:
                raise ValueError(f"{type(bn).__name__} already applies {type(bn.act).__name__}; "
                                 f"can't add {type(act).__name__} after it")
        if act is not None and names[2] is not None:
            self.add_module(names[2], act)
        # Set after add_module: until then the conv/bn properties must not resolve
        # (add_module refuses names that hasattr() already finds).
        self._names = names
        # Called on the hooked path (see forward); kept out of _modules when the caller
        # didn't register it (a traced forward's own activation child).
        self.__dict__["_act_module"] = act
        self._hooks = hook_dicts([m for m in (conv, bn, act) if m is not None])
        self._act = activation_of(act_src)
        self._padding = list(resolve_padding(conv))
        self._stride, self._dilation = list(conv.stride), list(conv.dilation)
        self._cache = None
        self._checked = None

    # Children are looked up by their (possibly original) names.
    @property
    def conv(self) -> nn.Conv2d:
        return self._modules[self._names[0]]

    @property
    def bn(self) -> Optional[nn.BatchNorm2d]:
        return self._modules.get(self._names[1]) if self._names[1] else None

    @property
    def activation(self) -> Tuple[str, float]:
        """``(name, param)`` of the fused activation."""
        return self._act

    def extra_repr(self) -> str:
        return f"act={self._act[0]}"

    def _folds(self) -> bool:
        # Runs on every forward: dict lookups instead of nn.Module.__getattr__ (~1 us each).
        name = self._names[1]
        bn = self._modules.get(name) if name is not None else None
        if bn is None:
            return True
        if bn.training:
            return frozen_bn(bn)  # a frozen BN uses its running statistics in train() too
        buffers = bn._buffers
        return buffers.get("running_mean") is not None and buffers.get("running_var") is not None

    def _fold(self, dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
        conv, bn = self.conv, self.bn
        if bn is None:
            w, b = conv.weight, conv.bias
            b = None if b is None else b.float()
        else:
            w, b = reference.fold_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        w = w.to(dtype)
        if conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
            # Depthwise: tap-major memory ([kh, kw, C]) so each tap's per-channel weights are
            # one contiguous vector for the depthwise kernel. Same logical [C, 1, kh, kw] tensor.
            return w.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1), b
        # channels_last weights make the GEMM kernel's K (input channel) loads contiguous.
        return w.contiguous(memory_format=torch.channels_last), b

    def _state_tensors(self):
        # Straight from the parameter/buffer dicts: nn.Module.__getattr__ costs
        # about a microsecond per lookup, and this runs on every forward.
        mods = self._modules
        p = mods[self._names[0]]._parameters
        ts = [p["weight"], p.get("bias")]
        if self._names[1] is not None and self._names[1] in mods:
            bn = mods[self._names[1]]
            bp, bb = bn._parameters, bn._buffers
            # Affine weights are parameters in BatchNorm2d, buffers in FrozenBatchNorm2d.
            ts += [bp.get("weight", bb.get("weight")), bp.get("bias", bb.get("bias")), bb.get("running_mean"),
                   bb.get("running_var"), bb.get("num_batches_tracked")]
        return [t for t in ts if t is not None]

    def folded_parameters(self, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """The folded ``(weight, bias)`` the eval path runs with (cached when no grad is needed)."""
        dtype = dtype or self.conv.weight.dtype
        tensors = self._state_tensors()
        bn = self.bn
        extra = (dtype, bn.eps if bn is not None else None, tensors[0].device)
        entry, folded = version_cached(self._cache, tensors, extra, lambda: self._fold(dtype))
        if entry is not self._cache:  # nn.Module.__setattr__ costs ~1 us: only on a miss
            self._cache = entry
        return folded

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, residual_after_act: bool = True) -> Tensor:
        if hooked(self._hooks) and self._modules_compute_it(residual, residual_after_act):
            return self._forward_modules(x, residual, residual_after_act)
        conv = self.conv
        dev = x.device.type if isinstance(x, Tensor) else "cpu"
        if isinstance(x, Tensor) and dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
            residual = None if residual is None else residual.to(x.dtype)
            dtype = x.dtype
        else:
            dtype = conv.weight.dtype
        compiling = torch.compiler.is_compiling()
        w = conv._parameters["weight"]
        sig = None if compiling or not isinstance(x, Tensor) else (
            x.shape, x.dtype, x.device, w.device, w.dtype,
            None if residual is None else (residual.shape, residual.dtype, residual.device))
        if sig is None or sig != self._checked:  # eager: validate each new (input, weight) signature once
            check_inputs(x, self._weight_as(dtype), None, None, residual, self._stride, self._padding, self._dilation,
                         conv.groups, self._act[0])
            if sig is not None:
                self._checked = sig
        if not self._folds():
            return self._forward_unfused(x, self._weight_as(dtype), residual, residual_after_act)
        weight, bias = self.folded_parameters(dtype)
        act, act_param = self._act
        args = (x, weight, None, bias, residual, self._stride, self._padding, self._dilation, conv.groups,
                act, act_param, residual_after_act)
        if compiling or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual))):
            return _OP(*args)  # the registered op: traceable, differentiable
        # Eager inference: run the op's implementation without the torch.library
        # layers (they cost more host time than a small conv takes on the GPU).
        return dispatch.run("conv_bn_act", x, weight, None, bias, residual, None, *args[5:])

    def _modules_compute_it(self, residual, residual_after_act) -> bool:
        # A timm BatchNormAct2d applies its own activation, so calling it can't put a
        # residual before that activation (a combination only direct callers can ask for).
        bn = self.bn
        return residual is None or residual_after_act or bn is None or not _timm_bn_act(bn) \
            or type(bn.act) is nn.Identity

    def _forward_modules(self, x, residual, residual_after_act):
        """The path taken while a hook is registered on the conv, the BN or the activation
        (or globally): the original modules are called, so their hooks see exactly what
        they saw before ``optimize()``. Same math as the other paths, without fusion."""
        conv, bn, act = self.conv, self.bn, self._act_module
        if bn is not None and bn.training and not frozen_bn(bn):
            self._cache = None  # running statistics change: see _forward_unfused
        y = conv(x)
        if bn is not None:
            if y.shape[0] == 0:
                return y  # as _forward_unfused: an empty batch leaves the running stats alone
            y = bn(y)  # a timm BatchNormAct2d applies its own activation here
        if residual is not None and not residual_after_act:
            y = y + residual
        if act is not None:
            y = act(y)
        elif bn is None or not _timm_bn_act(bn):
            y = apply_activation(y, *self._act)
        if residual is not None and residual_after_act:
            y = y + residual
        return y

    def _weight_as(self, dtype: torch.dtype) -> Tensor:
        # Only validation and the unfused path need the raw weight in the run dtype
        # (autocast); the folded path casts once into its cache instead.
        w = self.conv.weight
        return w if w.dtype == dtype else w.to(dtype)

    def _forward_unfused(self, x, w, residual, residual_after_act):
        # BatchNorm in training mode: batch statistics, so nothing can be folded.
        # Exactly PyTorch's own modules (nn.BatchNorm2d.forward also for timm's
        # BatchNormAct2d, whose activation is applied below like any other).
        conv, bn = self.conv, self.bn
        # batch_norm updates running stats in its kernel without bumping their
        # version counters, so the cached fold can't notice: drop it here.
        self._cache = None
        b = conv.bias if conv.bias is None or conv.bias.dtype == w.dtype else conv.bias.to(w.dtype)
        y = torch.nn.functional.conv2d(x, w, b, self._stride, self._padding, self._dilation, conv.groups)
        if y.shape[0] == 0:
            return y  # batch statistics of an empty batch are undefined; leave running stats alone
        y = nn.BatchNorm2d.forward(bn, y)
        if residual is not None and not residual_after_act:
            y = y + residual
        y = apply_activation(y, *self._act)
        if residual is not None and residual_after_act:
            y = y + residual
        return y
