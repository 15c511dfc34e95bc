"""Reference implementations: the specification of every effops op.

Plain PyTorch, written for reading. They are the test oracle, the CPU
fallback (the ``reference`` backend) and the training path until a fused
backward exists. Half-precision inputs are computed in float32 and rounded
once at the end, which is what the fused kernels do (fp32 accumulation, fp32
epilogue); float64 inputs stay float64 so tests can build an exact oracle.
"""
from __future__ import annotations

import contextlib

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import apply_activation

_Pair = Tuple[int, int]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_affine(y: Tensor, scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    if scale is not None:
        y = y * scale.to(y.dtype).view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, 1, 1)
    return y


def conv_scale_bias_act(
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    stride: _Pair = (1, 1),
    padding: _Pair = (0, 0),
    dilation: _Pair = (1, 1),
    groups: int = 1,
    act: str = "identity",
    act_param: float = 0.0,
    residual_after_act: bool = False,
    gate: Optional[Tensor] = None,
    out_shuffle_groups: int = 1,
) -> Tensor:
    """The fused conv epilogue (what the conv kernel computes)::

        x = x * gate[:, :, None, None]                                   # if gate ([N, C_in]) is given
        z = conv2d(x, weight, None, stride, padding, dilation, groups)   # fp32 accumulate
        y = z * scale[c] + bias[c]                                       # folded BN
        y = act(y + residual)      if residual is given and not residual_after_act
        y = act(y) + residual      if residual_after_act
        y = channel_shuffle(y, out_shuffle_groups)                       # if out_shuffle_groups > 1
        return y.to(x.dtype)
    """
    cd = _compute_dtype(x.dtype)
    xc = x.to(cd)
    if gate is not None:
        xc = xc * gate.to(cd)[:, :, None, None]
    z = F.conv2d(xc, weight.to(cd), None, stride, padding, dilation, groups)
    y = _channel_affine(z, scale, bias)
    y = add_residual_around(y, lambda t: apply_activation(t, act, act_param),
                            None if residual is None else residual.to(cd), residual_after_act)
    if out_shuffle_groups != 1:
        y = channel_shuffle(y, out_shuffle_groups)
    return y.to(x.dtype)


def add_residual_around(y: Tensor, act, residual: Optional[Tensor], residual_after_act: bool,
                        inplace: bool = False) -> Tensor:
    """``act(y + residual)`` (``residual_after_act=False``) or ``act(y) + residual``; ``act`` is
    a function or module (None: identity). ``inplace`` adds into ``y`` (``act`` must then work
    in place too, or return a new tensor)."""
    if residual is not None and not residual_after_act:
        y = y.add_(residual) if inplace else y + residual
    if act is not None:
        y = act(y)
    if residual is not None and residual_after_act:
        y = y.add_(residual) if inplace else y + residual
    return y


def bn_scale_bias(
    conv_bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm after a conv as a per-output-channel scale and bias, in ``dtype``::

        s = bn_weight / sqrt(running_var + eps)
        b = (conv_bias - running_mean) * s + bn_bias

    so that ``bn(conv(x, weight, conv_bias)) == conv(x, weight) * s + b``. Differentiable.
    """
    s = torch.rsqrt(_as(running_var, dtype) + eps)
    if bn_weight is not None:
        s = s * _as(bn_weight, dtype)
    mean = _as(running_mean, dtype)
    b = -mean * s if bn_bias is None else torch.addcmul(_as(bn_bias, dtype), mean, s, value=-1)
    if conv_bias is not None:
        b = torch.addcmul(b, _as(conv_bias, dtype), s)
    return s, b


def bn_scale_bias_many(states: List[tuple], dtype: torch.dtype = torch.float32) -> List[Tuple[Tensor, Tensor]]:
    """:func:`bn_scale_bias` of several BatchNorms, each ``state`` being its arguments
    ``(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)``. Without autograd
    and with affine BNs, the math runs as ``torch._foreach_*`` ops over all of them (one
    launch per step on a GPU instead of one per BN and step): same values."""
    if torch.is_grad_enabled() or len(states) < 2 or any(st[1] is None or st[2] is None for st in states):
        return [bn_scale_bias(*st, dtype) for st in states]
    s = torch._foreach_add([_as(st[4], dtype) for st in states], [float(st[5]) for st in states])
    torch._foreach_rsqrt_(s)
    torch._foreach_mul_(s, [_as(st[1], dtype) for st in states])
    b = torch._foreach_mul([_as(st[3], dtype) for st in states], s)
    b = torch._foreach_sub([_as(st[2], dtype) for st in states], b)
    return [(si, bi if st[0] is None else torch.addcmul(bi, _as(st[0], dtype), si))
            for st, si, bi in zip(states, s, b)]


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Tensor.to costs ~1 us of dispatch even when it returns self; this runs on every call.
    return t if t.dtype == dtype else t.to(dtype)


def fold_bn(
    weight: Tensor,
    conv_bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it, in float32 (or float64)::

        s  = bn_weight / sqrt(running_var + eps)
        w' = weight * s[:, None, None, None]
        b' = (conv_bias - running_mean) * s + bn_bias

    so that ``bn(conv(x)) == conv(x, w') + b'``. Returns ``(w', b')`` in the
    compute dtype. Differentiable: gradients flow back to the conv and BN parameters.
    """
    cd = _compute_dtype(weight.dtype)
    s, b = bn_scale_bias(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, cd)
    return weight.to(cd) * s.view(-1, 1, 1, 1), b


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    conv_bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride: _Pair = (1, 1),
    padding: _Pair = (0, 0),
    dilation: _Pair = (1, 1),
    groups: int = 1,
    act: str = "relu",
    act_param: float = 0.0,
) -> Tensor:
    """Conv2d → BatchNorm2d → activation with exact ``torch.nn`` semantics::

        y = F.conv2d(x, weight, conv_bias, stride, padding, dilation, groups)
        y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias,
                         training, momentum, eps)   # updates running stats in training
        return act(y)
    """
    y = F.conv2d(x, weight, conv_bias, stride, padding, dilation, groups)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return apply_activation(y, act, act_param)


def osa_aggregate(
    inputs: Sequence[Tensor],
    weight: Tensor,
    scale: Optional[Tensor],
    bias: Optional[Tensor],
    act: str = "relu",
    act_param: float = 0.0,
    ese_weight: Optional[Tensor] = None,
    ese_bias: Optional[Tensor] = None,
    identity: Optional[Tensor] = None,
) -> Tensor:
    """One-Shot Aggregation: the 1×1 conv over the concatenation of ``inputs``::

        y = act(conv2d(cat(inputs, dim=1), weight) * scale[c] + bias[c])
        if ese_weight is not None:                                   # VoVNetV2 eSE
            g = hardsigmoid(conv2d(y.mean((2, 3), keepdim=True), ese_weight, ese_bias))
            y = y * g
        if identity is not None:
            y = y + identity
        return y.to(inputs[0].dtype)

    ``weight`` is ``[C_out, sum(C_i), 1, 1]``; the fused kernel reads the inputs
    as consecutive segments of its K dimension instead of concatenating them. The
    specification of :func:`effops.ops.aggregate` (``identity`` is its ``residual``)
    and of the OSA block's aggregation.
    """
    x = inputs[0]
    cd = _compute_dtype(x.dtype)
    cat = torch.cat([t.to(cd) for t in inputs], dim=1)
    y = _channel_affine(F.conv2d(cat, weight.to(cd)), scale, bias)
    y = apply_activation(y, act, act_param)
    if ese_weight is not None:
        pooled = y.mean((2, 3), keepdim=True)
        g = F.conv2d(pooled, ese_weight.to(cd), None if ese_bias is None else ese_bias.to(cd))
        y = y * F.hardsigmoid(g)
    if identity is not None:
        y = y + identity.to(cd)
    return y.to(x.dtype)


def depthwise_conv_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    bias: Optional[Tensor],
    stride: _Pair = (1, 1),
    padding: _Pair = (1, 1),
    dilation: _Pair = (1, 1),
    act: str = "relu",
    act_param: float = 0.0,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Depthwise conv (one filter per channel, ``weight`` ``[C, 1, kh, kw]``) with
    folded BN, activation and optional residual added after the activation::

        y = act(conv2d(x, weight, groups=C) * scale[c] + bias[c]) (+ residual)
    """
    if weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"depthwise weight must be [C, 1, kh, kw] with C = {x.shape[1]} input channels, "
            f"got {tuple(weight.shape)}"
        )
    return conv_scale_bias_act(
        x, weight, scale, bias, residual, stride, padding, dilation, x.shape[1], act, act_param, True
    )


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle::

        n, c, h, w = x.shape
        x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    Output channel ``j * groups + i`` is input channel ``i * (c // groups) + j``.
    """
    n, c, h, w = x.shape
    if groups < 1 or c % groups:
        raise ValueError(f"channel_shuffle: {c} channels are not divisible into {groups} groups")
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def se_gate(
    x: Tensor,
    reduce_weight: Optional[Tensor],
    reduce_bias: Optional[Tensor],
    expand_weight: Tensor,
    expand_bias: Optional[Tensor],
    act: str = "relu",
    act_param: float = 0.0,
    gate: str = "sigmoid",
    gate_param: float = 0.0,
) -> Tensor:
    """The squeeze-and-excitation gate, ``[N, C]`` in float32 (float64 for float64 ``x``);
    weights as 1×1 conv ``[out, in, 1, 1]`` or linear ``[out, in]``::

        s = x.mean((2, 3))                                   # squeeze, per (n, c), accumulated in fp32
        h = act(s @ reduce_weight.T + reduce_bias)           # skipped when reduce_weight is None (eSE)
        return gate(h @ expand_weight.T + expand_bias)
    """
    cd = _compute_dtype(x.dtype)
    # In cd even under autocast (which would run the linears in its lower dtype).
    with torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else contextlib.nullcontext():
        h = x.mean((2, 3), dtype=cd)
        if reduce_weight is not None:
            h = F.linear(h, reduce_weight.to(cd).flatten(1), None if reduce_bias is None else reduce_bias.to(cd))
            h = apply_activation(h, act, act_param)
        g = F.linear(h, expand_weight.to(cd).flatten(1), None if expand_bias is None else expand_bias.to(cd))
        return apply_activation(g, gate, gate_param)


def se_apply(x: Tensor, gate: Tensor, residual: Optional[Tensor] = None, act: str = "identity",
             act_param: float = 0.0) -> Tensor:
    """A squeeze-and-excitation gate ``[N, C]`` applied to ``x`` (the SE-bottleneck epilogue
    ``act(x * s + shortcut)``), computed in float32 (float64 for float64 ``x``), rounded once::

        y = x * gate[:, :, None, None]
        if residual is not None:
            y = y + residual
        return act(y).to(x.dtype)
    """
    cd = _compute_dtype(x.dtype)
    y = x.to(cd) * gate.to(cd)[:, :, None, None]
    if residual is not None:
        y = y + residual.to(cd)
    return apply_activation(y, act, act_param).to(x.dtype)


def squeeze_excite(
    x: Tensor,
    reduce_weight: Optional[Tensor],
    reduce_bias: Optional[Tensor],
    expand_weight: Tensor,
    expand_bias: Optional[Tensor],
    act: str = "relu",
    gate: str = "sigmoid",
    act_param: float = 0.0,
    gate_param: float = 0.0,
) -> Tensor:
    """Squeeze-and-excitation (weights as 1×1 conv ``[out, in, 1, 1]`` or linear ``[out, in]``)::

        s = x.mean((2, 3))                                   # squeeze, per (n, c)
        h = act(s @ reduce_weight.T + reduce_bias)           # skipped when reduce_weight is None (eSE)
        g = gate(h @ expand_weight.T + expand_bias)
        return x * g[:, :, None, None]

    i.e. ``se_apply(x, se_gate(x, ...))``.
    """
    g = se_gate(x, reduce_weight, reduce_bias, expand_weight, expand_bias, act, act_param, gate, gate_param)
    return se_apply(x, g)
