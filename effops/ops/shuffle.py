"""Channel shuffle (ShuffleNet's permutation) as a standalone copy kernel.

Layers, bottom up, all in this file:

1. the Triton kernel ``_shuffle_kernel`` (a strided gather-copy over a [pixels, channels]
   tile) and its launcher :func:`_launch_shuffle` (tile via ``conv.launch_tuned``);
2. the two backends of the op: ``triton`` (the kernel; float16, bfloat16, float32) and
   ``reference`` (:func:`effops.ops.reference.channel_shuffle`; every other dtype);
3. the registered ops ``effops::channel_shuffle`` (with a fake implementation and an
   autograd formula: the inverse permutation is a shuffle with ``C // groups`` groups) and
   ``effops::channel_shuffle_out`` (writes into a given tensor);
4. :func:`channel_shuffle`, the checked public entry point.

Equivalent PyTorch::

    n, c, h, w = x.shape
    x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)

i.e. ``out[:, c] = x[:, (c % groups) * (C // groups) + c // groups]``.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import Tensor

from .. import dispatch, tuning
from ..views import ChannelView, first_overlap
from . import conv as _conv
from . import reference
from .conv import _cdiv, _interpret_block, _next_pow2, needs_int64, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _shuffle_kernel(
        x_ptr, out_ptr,
        HW, W, C, CPG, GROUPS, num_pb,
        sxn, sxc, sxh, sxw,
        son, soc, soh, sow,
        FLAT_HW: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # out[n, c, p] = x[n, (c % GROUPS) * CPG + c // GROUPS, p] over a [BLOCK_P pixels,
        # BLOCK_C output channels] tile of one image. Stores are contiguous along whichever
        # axis of out is dense (channels in NHWC, pixels in NCHW); loads are contiguous along
        # pixels in NCHW and, in NHWC, gathered within each pixel's channel row (the rows a
        # tile reads are the rows it writes, so every cache line is used).
        pid = tl.program_id(0)
        pid_c = tl.program_id(1)
        n = pid // num_pb
        pb = pid % num_pb
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        p_ok = offs_p < HW
        c_ok = offs_c < C
        src = (offs_c % GROUPS) * CPG + offs_c // GROUPS
        if IDX64:  # every index int64 before its product with a stride (channels included)
            n = n.to(tl.int64)
            offs_p = offs_p.to(tl.int64)
            offs_c = offs_c.to(tl.int64)
            src = src.to(tl.int64)
        if FLAT_HW:  # both tensors have sh == W * sw: a pixel is one stride (vectorisable when sw == 1)
            x_pix = offs_p * sxw
            o_pix = offs_p * sow
        else:
            oh = offs_p // W
            ow = offs_p % W
            x_pix = oh * sxh + ow * sxw
            o_pix = oh * soh + ow * sow
        mask = p_ok[:, None] & c_ok[None, :]
        v = tl.load(x_ptr + n * sxn + x_pix[:, None] + (src * sxc)[None, :], mask=mask)
        tl.store(out_ptr + n * son + o_pix[:, None] + (offs_c * soc)[None, :], v, mask=mask)


def _channel_minor(t: Tensor) -> bool:
    return t.stride(1) < t.stride(3)


def _shuffle_configs(channel_minor: bool) -> List[dict]:
    """Tiles (pixels x channels) of ``_shuffle_kernel``: channel-wide for NHWC outputs,
    pixel-long for NCHW ones. No shared memory: a copy needs no pipeline."""
    tiles = ([(32, 128, 4), (64, 64, 4), (16, 256, 4), (64, 128, 8), (128, 32, 4), (16, 32, 2)] if channel_minor
             else [(256, 16, 4), (512, 8, 4), (128, 32, 4), (1024, 4, 4), (256, 32, 8), (64, 16, 2)])
    return [dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=w, num_stages=1) for bp, bc, w in tiles]


def _shuffle_heuristic(C: int, HW: int, channel_minor: bool) -> dict:
    if channel_minor:
        bc = min(128, max(16, _next_pow2(C)))
        return dict(BLOCK_P=max(16, 4096 // bc), BLOCK_C=bc, num_warps=4, num_stages=1)
    bp = min(512, max(16, _next_pow2(HW)))
    return dict(BLOCK_P=bp, BLOCK_C=max(4, 4096 // bp), num_warps=4, num_stages=1)


def _launch_shuffle(x: Tensor, groups: int, out: Tensor) -> None:
    """``out = channel_shuffle(x, groups)`` in one launch; any strides for both."""
    N, C, H, W = x.shape
    HW = H * W
    flat = x.stride(2) == W * x.stride(3) and out.stride(2) == W * out.stride(3)
    meta = dict(FLAT_HW=flat, IDX64=needs_int64(x, out))
    cm = _channel_minor(out)

    def launch(cfg):
        num_pb = _cdiv(HW, cfg["BLOCK_P"])
        _shuffle_kernel[(N * num_pb, _cdiv(C, cfg["BLOCK_C"]))](
            x, out, HW, W, C, C // groups, groups, num_pb, *x.stride(), *out.stride(), **meta,
            BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg.get("num_warps", 4),
            num_stages=cfg.get("num_stages", 1))

    def candidates():
        c_cap, p_cap = max(16, _next_pow2(C)), max(64, _next_pow2(HW))
        every = _shuffle_configs(cm)
        return [c for c in every if c["BLOCK_C"] <= c_cap and c["BLOCK_P"] <= p_cap] or every[-1:]

    _conv.launch_tuned(
        x, launch, lambda: dict(BLOCK_P=_interpret_block(HW, 16, 64), BLOCK_C=_interpret_block(C, 16, 64)),
        ("shuffle", tuning.bucket(N * HW), tuning.bucket(HW), C, x.dtype, cm, _channel_minor(x), flat),
        lambda: _shuffle_heuristic(C, HW, cm), candidates)


def _new_output(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_conv.output_format(x))


def _run_triton(x: Tensor, groups: int, out: Optional[Tensor]) -> Tensor:
    if out is None:
        out = _new_output(x)
    if out.numel():
        _launch_shuffle(x, groups, out)
    return out


def _run_reference(x: Tensor, groups: int, out: Optional[Tensor]) -> Tensor:
    # ATen's own channel_shuffle is the same permutation (tests compare it with
    # reference.channel_shuffle bit for bit) in one copy that keeps the memory format, where
    # the view / transpose / reshape spelling copies up to three times: 2-10x faster on CPU.
    y = torch.channel_shuffle(x, groups)
    if out is None:
        return y.contiguous(memory_format=_conv.output_format(x))
    out.copy_(y)
    return out


def _triton_reasons(x: Tensor, groups: int, out: Optional[Tensor]) -> List[str]:
    return _conv._triton_reasons(x, None, None, None, None, None)


def _native_reasons(x: Tensor, groups: int, out: Optional[Tensor]) -> List[str]:
    return _conv.native_reasons(x)


def _run_native(x: Tensor, groups: int, out: Optional[Tensor]) -> Tensor:
    # csrc/shuffle.cpp: one strided pass (per NHWC pixel, a permutation of its channel vector).
    return _conv._native.module().channel_shuffle(x, groups, out)


dispatch.register("channel_shuffle", "native", _native_reasons)(_run_native)
dispatch.register("channel_shuffle", "triton", _triton_reasons)(_run_triton)
dispatch.register("channel_shuffle", "reference")(_run_reference)


@torch.library.custom_op("effops::channel_shuffle", mutates_args=())
def _channel_shuffle_op(x: Tensor, groups: int) -> Tensor:
    return dispatch.run("channel_shuffle", x, groups, None)


@_channel_shuffle_op.register_fake
def _(x, groups):
    return _new_output(x)


def _setup_context(ctx, inputs, output):
    ctx.groups = inputs[1]


def _backward(ctx, grad):
    # The inverse of a shuffle with g groups is a shuffle with C // g groups.
    return _OP(grad, max(grad.shape[1] // ctx.groups, 1)), None


_channel_shuffle_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("effops::channel_shuffle_out", mutates_args=("out",))
def _channel_shuffle_out_op(x: Tensor, groups: int, out: Tensor) -> None:
    dispatch.run("channel_shuffle", x, groups, out)


@_channel_shuffle_out_op.register_fake
def _(x, groups, out):
    return None


_OP = torch.ops.effops.channel_shuffle.default
_OUT_OP = torch.ops.effops.channel_shuffle_out.default


@torch.library.custom_op("effops::interleave_native", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def _interleave_native_op(a: Tensor, b: Tensor) -> Tensor:
    """``torch.stack((a, b), dim=2).flatten(1, 2)`` (channel ``2c`` from ``a``, ``2c + 1`` from ``b``:
    ShuffleNetV2's g = 2 shuffle of ``cat(a, b)``) by the native backend's one-pass kernel, NHWC,
    for torch.compile on CPU (inference only: no autograd). Inductor's own loop for the stack
    expression gathers every other channel element by element."""
    n, c, h, w = a.shape
    out = torch.empty((n, 2 * c, h, w), dtype=a.dtype, device=a.device, memory_format=torch.channels_last)
    _conv._native.module().interleave_channels(a, b, out)
    return out


@_interleave_native_op.register_fake
def _(a, b):
    n, c, h, w = a.shape
    return torch.empty((n, 2 * c, h, w), dtype=a.dtype, device=a.device, memory_format=torch.channels_last)


INTERLEAVE_NATIVE_OP = torch.ops.effops.interleave_native.default


def check_shuffle_inputs(x, groups) -> None:
    """Validate :func:`channel_shuffle`'s arguments; errors name what was expected."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = f"a {x.dim()}-D tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a 4-D input (N, C, H, W) for channel_shuffle, got {got}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"expected groups as an int, got {type(groups).__name__}")
    if groups < 1:
        raise ValueError(f"channel_shuffle needs groups >= 1, got {groups}")
    if x.shape[1] % groups:
        raise ValueError(f"channel_shuffle: {x.shape[1]} channels are not divisible by groups={groups}")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"channel_shuffle takes real floating-point or integer tensors, got {x.dtype}")


def channel_shuffle(x: Union[Tensor, ChannelView], groups: int, *,
                    out: Union[ChannelView, Tensor, None] = None) -> Tensor:
    """ShuffleNet's channel shuffle of an ``[N, C, H, W]`` tensor (or :class:`~effops.ChannelView`).

    Equivalent PyTorch (``torch.nn.functional.channel_shuffle``)::

        n, c, h, w = x.shape
        x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    Output channel ``j * groups + i`` is input channel ``i * (C // groups) + j``: a pure
    permutation, bit-exact. Any input strides (NCHW, NHWC, channel views of a larger buffer).
    The result is NHWC when ``x`` is NHWC (or a channel view of an NHWC buffer), else NCHW.
    With ``out`` (a tensor of ``x``'s shape, dtype and device, or a ChannelView) the result
    is written into it in place; ``out`` must not share memory with ``x`` (ValueError).
    float16 / bfloat16 / float32 run the Triton kernel; other dtypes (float64, integers) the
    reference backend. Differentiable without ``out`` (the gradient is the inverse shuffle).
    """
    if isinstance(x, ChannelView):
        x = x.as_tensor()
    check_shuffle_inputs(x, groups)
    if out is None:
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
            return _OP(x, groups)  # the registered op: traceable, differentiable
        # Eager inference: the op's implementation without the torch.library layers (~25 us of
        # host time on the CPU VM, more than the shuffle itself at ShuffleNet's shapes).
        return dispatch.run("channel_shuffle", x, groups, None)
    dst = out.as_tensor() if isinstance(out, ChannelView) else out
    if not isinstance(dst, Tensor) or tuple(dst.shape) != tuple(x.shape):
        got = tuple(dst.shape) if isinstance(dst, Tensor) else type(dst).__name__
        raise ValueError(f"expected out of shape {tuple(x.shape)} (the input's), got {got}")
    if dst.dtype != x.dtype or dst.device != x.device:
        raise TypeError(f"out is {dst.dtype} on {dst.device}; expected {x.dtype} on {x.device}")
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("channel_shuffle(out=...) has no autograd formula; call it without out= when gradients "
                           "are needed, or under torch.no_grad()")
    if not torch.compiler.is_compiling() and first_overlap(dst, (("the input", x),)) is not None:
        raise ValueError("out overlaps the input: channel_shuffle(out=...) writes out while reading x, so they must "
                         "not share memory")
    _OUT_OP(x, groups, dst)
    return dst
