"""Fused conv + folded BatchNorm + activation (+ residual), NHWC implicit GEMM.

Layers, bottom up, all in this file:

1. the Triton kernels (``_conv_bn_act_kernel``, its TMA variant, ``_depthwise_kernel``) and
   their launcher ``_run_triton``, whose tuner also times cuDNN paths on a GPU;
2. the registered ops ``effops::conv_bn_act`` (functional, differentiable) and
   ``effops::conv_bn_act_out`` (writes a channel view in place), each with a
   fake implementation so ``torch.compile(fullgraph=True)`` traces them;
3. the backend registrations (``triton`` here, ``reference`` from
   :mod:`effops.ops.reference`) the dispatcher chooses from;
4. :func:`conv_bn_act`, the checked public entry point.

Equivalent PyTorch::

    x = x * gate[:, :, None, None]   # gate=[N, C_in] (applied as the kernel loads x)
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    y = y * scale[None, :, None, None] + bias[None, :, None, None]
    y = act(y + residual)            # residual_after_act=False
    y = act(y) + residual            # residual_after_act=True
    y = channel_shuffle(y, g)        # out_shuffle_groups=g (applied as the kernel stores y)
"""
from __future__ import annotations

import contextlib
import functools
import operator
import weakref
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch, tuning
from .. import native as _native
from ..activations import activation_grad, apply_activation, check_activation
from ..views import ChannelView, first_overlap
from . import reference

try:  # Triton is optional: without it (macOS, Windows, CPU wheels) the reference backend runs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer kernel only
    TensorDescriptor = None

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------
# 1. Triton kernel and launcher
# ----------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _activation(y, ACT: tl.constexpr, act_param):
        if ACT == "relu":
            y = tl.maximum(y, 0.0)
        elif ACT == "relu6":
            y = tl.minimum(tl.maximum(y, 0.0), 6.0)
        elif ACT == "leaky_relu":
            y = tl.where(y > 0, y, y * act_param)
        elif ACT == "hardswish":
            y = y * tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
        elif ACT == "hardsigmoid":
            y = tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
        elif ACT == "silu":
            y = y * tl.sigmoid(y)
        elif ACT == "sigmoid":
            y = tl.sigmoid(y)
        elif ACT == "gelu":
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        elif ACT == "gelu_tanh":
            # tanh(u) = 2 * sigmoid(2u) - 1 (tl has no portable tanh across Triton versions)
            u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            y = 0.5 * y * (2.0 * tl.sigmoid(2.0 * u))
        return y

    @triton.jit
    def _pixel_coords(offs, OH, OW):
        """Output-pixel row index -> (image, row, column)."""
        if offs.dtype == tl.int64:
            # 64-bit addressing (IDX64): the int32 scalar product OH * OW could wrap (one
            # image of >= 2**31 pixels), so divide by OW and OH in turn instead.
            row = offs // OW
            n = row // OH
            oh = row % OH
            ow = offs % OW
        else:
            ohw = OH * OW
            rem = offs % ohw
            n = offs // ohw
            oh = rem // OW
            ow = rem % OW
        return n, oh, ow

    @triton.jit
    def _mma(a, b, acc, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """``acc + a @ b`` in fp32. Under the interpreter bf16 operands are upcast first:
        Triton's interpreter computes bf16 dots wrongly, fp32 operands are exact."""
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _epilogue_store(y, co, c_ok, m_ok, n_idx, oh, ow, scale_ptr, bias_ptr, res_ptr, out_ptr,
                        srn, src, srh, srw, son, soc, soh, sow, act_param, C_out,
                        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                        RES_AFTER_ACT: tl.constexpr, ACT: tl.constexpr, SHUFFLE_G: tl.constexpr):
        """The conv epilogue on an fp32 [pixels, channels] tile: ``* scale + bias``,
        residual before or after the activation, store through the output's strides.
        Callers pass ``co``, ``n_idx``, ``oh``, ``ow`` as int64 when the launch needs
        64-bit addressing (IDX64): every product with a stride here then is int64.
        ``SHUFFLE_G > 1`` stores channel ``co`` (of ``C_out``) at the position a channel
        shuffle with that many groups moves it to; scale, bias and residual are indexed
        by ``co`` (the conv's own channel order)."""
        if HAS_SCALE:
            y = y * tl.load(scale_ptr + co, mask=c_ok, other=1.0)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + co, mask=c_ok, other=0.0)[None, :]
        mask = m_ok[:, None] & c_ok[None, :]
        if HAS_RES:
            r = tl.load(res_ptr + (n_idx * srn + oh * srh + ow * srw)[:, None] + (co * src)[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            if not RES_AFTER_ACT:
                y = y + r
        y = _activation(y, ACT, act_param)
        if HAS_RES:
            if RES_AFTER_ACT:
                y = y + r
        if SHUFFLE_G > 1:
            # channel_shuffle: conv channel i * (C_out // g) + j lands at j * g + i.
            cpg = C_out // SHUFFLE_G
            co = (co % cpg) * SHUFFLE_G + co // cpg
        o_ptrs = out_ptr + (n_idx * son + oh * soh + ow * sow)[:, None] + (co * soc)[None, :]
        y = y.to(out_ptr.dtype.element_ty)
        tl.store(o_ptrs, y, mask=mask)
        return y  # what was stored (callers summing the output's channels read it from here)

    @triton.jit
    def _conv_bn_act_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr, gate_ptr, psum_ptr,
        H, W, OH, OW, M, C_in_g, C_out_g,
        sxn, sxc, sxh, sxw,
        swo, swi, swh, sww,
        srn, src, srh, srw,
        son, soc, soh, sow,
        sgn, sgc,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        act_param,
        KH: tl.constexpr, KW: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr, RES_AFTER_ACT: tl.constexpr,
        ACT: tl.constexpr, HAS_GATE: tl.constexpr, SHUFFLE_G: tl.constexpr, CH_SUM: tl.constexpr,
        POINTWISE: tl.constexpr, IDX64: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # GEMM view: rows = output pixels (n, oh, ow), cols = output channels of
        # this group, K = (kh, kw, input channel). Every tensor is addressed via
        # element strides, so NCHW, NHWC and channel views all work unchanged.
        # HAS_GATE: the A tile is multiplied by gate[n, input channel] after loading
        # (conv2d(x * gate[:, :, None, None], w) without writing the gated x); the launcher
        # then tiles the rows per image (see below).
        # CH_SUM: also psum[pid_m, co] = sum over the tile's rows of the stored output (fp32),
        # rows tiled per image as for HAS_GATE: with num_hb row tiles per image, row
        # n * num_hb + hb of psum holds image n's channel sums over its hb-th pixel block, the
        # layout the SE excitation reads (effops.ops.se). One program per element: deterministic.
        pid = tl.program_id(0)
        g = tl.program_id(1)
        num_pid_n = tl.cdiv(C_out_g, BLOCK_N)
        # N-blocks of one M-block run back to back so the input tile stays in L2.
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        if IDX64:
            # Every index that multiplies a stride becomes int64 *before* the product:
            # pixel rows (pid_m * BLOCK_M included) and channel indices, whose products
            # with a channel stride (NCHW images of >= 2**31 elements, channel views
            # with huge channel strides) wrap in int32 as much as pixel offsets do.
            pid_m = pid_m.to(tl.int64)
            g = g.to(tl.int64)
            offs_n = offs_n.to(tl.int64)
            offs_k = offs_k.to(tl.int64)

        if HAS_GATE or CH_SUM:
            # Row tiles never straddle two images, so the gate is one [BLOCK_K] vector per K
            # step. A per-row [BLOCK_M, BLOCK_K] gate gather would be software-pipelined through
            # shared memory like the operands and overflow it with the large tiles (256x128x64:
            # 240 KiB). The cost: a partial last tile per image.
            hw = (pid_m * 0 + OH) * OW  # in pid_m's integer width: int64 under IDX64
            tiles = tl.cdiv(hw, BLOCK_M)
            img = pid_m // tiles
            offs_p = (pid_m % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_p < hw
            offs_m = img * hw + offs_p
        else:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
        n_idx, oh, ow = _pixel_coords(offs_m, OH, OW)
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        x_row = x_ptr + n_idx * sxn

        n_ok = offs_n < C_out_g
        co = g * C_out_g + offs_n
        ci0 = g * C_in_g

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if POINTWISE:
            # 1x1, stride 1, no padding, pixel-dense input: a plain GEMM over
            # [pixels, C_in] rows, the canonical loop Triton pipelines best.
            a_row = x_ptr + offs_m * sxw
            for k0 in range(0, C_in_g, BLOCK_K):
                ci = k0 + offs_k
                k_ok = ci < C_in_g
                a = tl.load(a_row[:, None] + ((ci0 + ci) * sxc)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                if HAS_GATE:
                    a = _gate_tile(a, gate_ptr, img, ci0 + ci, k_ok, sgn, sgc)
                b = tl.load(w_ptr + (co * swo)[None, :] + (ci * swi)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = _mma(a, b, acc, UPCAST_DOT, DOT_PRECISION)
        else:
            num_kc = tl.cdiv(C_in_g, BLOCK_K)
            # One flat K loop (not nested kh/kw/c loops) so Triton software-pipelines it.
            for kk in range(0, KH * KW * num_kc):
                kc = kk % num_kc
                khw = kk // num_kc
                kh = khw // KW
                kw = khw % KW
                ih = ih0 + kh * dil_h
                iw = iw0 + kw * dil_w
                pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                ci = kc * BLOCK_K + offs_k
                k_ok = ci < C_in_g
                a_ptrs = x_row[:, None] + (ih * sxh + iw * sxw)[:, None] + ((ci0 + ci) * sxc)[None, :]
                a = tl.load(a_ptrs, mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                if HAS_GATE:
                    a = _gate_tile(a, gate_ptr, img, ci0 + ci, k_ok, sgn, sgc)
                b_ptrs = w_ptr + (co * swo)[None, :] + (ci * swi)[:, None] + kh * swh + kw * sww
                b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = _mma(a, b, acc, UPCAST_DOT, DOT_PRECISION)

        y = _epilogue_store(acc, co, n_ok, m_ok, n_idx, oh, ow, scale_ptr, bias_ptr, res_ptr, out_ptr,
                            srn, src, srh, srw, son, soc, soh, sow, act_param, C_out_g * tl.num_programs(1),
                            HAS_SCALE, HAS_BIAS, HAS_RES, RES_AFTER_ACT, ACT, SHUFFLE_G)
        if CH_SUM:  # the launcher refuses SHUFFLE_G > 1 here: psum columns are the conv's channels
            part = tl.sum(tl.where(m_ok[:, None] & n_ok[None, :], y.to(tl.float32), 0.0), axis=0)
            tl.store(psum_ptr + pid_m * (C_out_g * tl.num_programs(1)) + co, part, mask=n_ok)

    @triton.jit
    def _gate_tile(a, gate_ptr, img, ci, k_ok, sgn, sgc):
        """An A tile ``[pixels of image img, input channels ci]`` times ``gate[img, ci]``, in
        fp32, rounded back to the operand dtype for the dot (what ``x * gate`` computed in
        that dtype would feed the conv)."""
        g = tl.load(gate_ptr + img * sgn + ci * sgc, mask=k_ok, other=0.0)
        return (a.to(tl.float32) * g.to(tl.float32)[None, :]).to(a.dtype)

    @triton.jit
    def _depthwise_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr, gate_ptr,
        H, W, OH, OW, M, C,
        sxn, sxc, sxh, sxw,
        swc, swh, sww,
        srn, src, srh, srw,
        son, soc, soh, sow,
        sgn, sgc,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        act_param,
        KH: tl.constexpr, KW: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr, RES_AFTER_ACT: tl.constexpr,
        ACT: tl.constexpr, HAS_GATE: tl.constexpr, SHUFFLE_G: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # Depthwise conv (groups == C_in == C_out): out[p, c] = sum_taps x[p + tap, c] * w[c, tap].
        # Memory-bound, no GEMM: each program owns a [pixels, channels] tile (contiguous along
        # channels in NHWC) and accumulates the KH*KW shifted input tiles, each times one
        # weight per channel. Same epilogue as the GEMM kernel (_epilogue_store).
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        if IDX64:  # pixel and channel indices int64 before any product (see _conv_bn_act_kernel)
            pid_p = pid_p.to(tl.int64)
            pid_c = pid_c.to(tl.int64)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < M
        n_idx, oh, ow = _pixel_coords(offs_p, OH, OW)
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        co = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = co < C
        x_row = x_ptr + n_idx * sxn
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for t in tl.static_range(KH * KW):
            ih = ih0 + (t // KW) * dil_h
            iw = iw0 + (t % KW) * dil_w
            ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_row[:, None] + (ih * sxh + iw * sxw)[:, None] + (co * sxc)[None, :],
                         mask=ok[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(w_ptr + co * swc + (t // KW) * swh + (t % KW) * sww, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        if HAS_GATE:
            # Output channel c reads only input channel c, and every tap of a pixel lies in its
            # image: conv(x * gate) = conv(x) * gate[n, c], applied once to the fp32 sum.
            gv = tl.load(gate_ptr + (n_idx * sgn)[:, None] + (co * sgc)[None, :], mask=p_ok[:, None] & c_ok[None, :],
                         other=0.0)
            acc = acc * gv.to(tl.float32)
        _epilogue_store(acc, co, c_ok, p_ok, n_idx, oh, ow, scale_ptr, bias_ptr, res_ptr, out_ptr,
                        srn, src, srh, srw, son, soc, soh, sow, act_param, C,
                        HAS_SCALE, HAS_BIAS, HAS_RES, RES_AFTER_ACT, ACT, SHUFFLE_G)


    @triton.jit
    def _conv_bn_act_tma_kernel(
        x_desc, w_desc, scale_ptr, bias_ptr, res_ptr, out_ptr,
        H, W, M, C_in, C_out,
        srn, src, srh, srw,
        son, soc, soh, sow,
        pad_h, pad_w, dil_h, dil_w,
        act_param,
        KH: tl.constexpr, KW: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr, RES_AFTER_ACT: tl.constexpr,
        ACT: tl.constexpr, SHUFFLE_G: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # The same implicit GEMM, with both operands fetched by tensor-memory-accelerator
        # (TMA) descriptors instead of per-thread gathers, for stride-1 "same" convs
        # (output size == input size; every VoVNet/ResNet 3x3 and 1x1 stride-1 conv):
        #   x_desc: the NHWC input as a [N*H*W, C_in] matrix (row stride = pixel stride);
        #   w_desc: the OHWI weight as a [C_out, KH*KW*C_in] matrix.
        # Output pixel m reads input pixel m + dh*W + dw at tap (dh, dw), so each tap's A
        # tile is a contiguous block of rows, shifted. Rows shifted outside the image (which
        # would wrap into the neighbouring row or image) are zeroed in registers; rows and
        # channels outside the matrices come back as zeros from the TMA unit itself. A
        # K chunk that runs past C_in reads the next tap's weights, times those zero channels.
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(C_out, BLOCK_N)
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        n_idx, oh, ow = _pixel_coords(offs_m, H, W)
        n0 = pid_n * BLOCK_N
        num_kc = tl.cdiv(C_in, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, KH * KW * num_kc):
            kc = kk % num_kc
            khw = kk // num_kc
            dh = (khw // KW) * dil_h - pad_h
            dw = (khw % KW) * dil_w - pad_w
            a = x_desc.load([m0 + dh * W + dw, kc * BLOCK_K])
            if KH * KW > 1:
                ih = oh + dh
                iw = ow + dw
                inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = tl.where(inside[:, None], a, tl.zeros_like(a))
            b = w_desc.load([n0, khw * C_in + kc * BLOCK_K])
            acc = _mma(a, b.T, acc, UPCAST_DOT, DOT_PRECISION)
        co = n0 + tl.arange(0, BLOCK_N)
        _epilogue_store(acc, co, co < C_out, m_ok, n_idx, oh, ow, scale_ptr, bias_ptr, res_ptr, out_ptr,
                        srn, src, srh, srw, son, soc, soh, sow, act_param, C_out,
                        HAS_SCALE, HAS_BIAS, HAS_RES, RES_AFTER_ACT, ACT, SHUFFLE_G)

    INTERPRETED = type(_conv_bn_act_kernel).__name__ == "InterpretedFunction"
else:
    INTERPRETED = False

def _cdiv(a: int, b: int) -> int:
    # Plain int math: triton.cdiv / next_power_of_2 are ConstexprFunctions in recent
    # Triton and cost ~3 us per call, several times per launch.
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _interpreting(t: Tensor) -> bool:
    """Whether launches for ``t`` take the interpreter path (CPU tensors under
    TRITON_INTERPRET=1) rather than the device path (tuned or heuristic tiles).
    Tests patch it (with ``_on_device``) to run the device path under the interpreter,
    which no CPU-only run would otherwise execute."""
    return t.device.type == "cpu"


def _cuda_configs():
    """Candidate tiles (see benchmarks/tools/sweep_conv_configs.py for a sweep)."""
    cfg = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 4, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 32, 4, 5),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (64, 64, 64, 4, 4),
        (64, 32, 64, 4, 4),
        (32, 32, 32, 2, 4),
    ]:
        cfg.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages))
    return cfg


def _candidates(C_in_g: int, C_out_g: int, tma_elem_size: int = 0):
    """Tiles to time for one problem. Tiles much wider than the problem only waste work:
    drop them before benchmarking, but always keep the smallest so something remains.
    ``tma_elem_size`` (the dtype's size when the TMA kernel can run the problem, else 0)
    adds the TMA kernel's variants of the large tiles: the timing decides between them."""
    n_cap = max(32, _next_pow2(C_out_g))
    k_cap = max(32, _next_pow2(C_in_g))
    kept = [c for c in _cuda_configs() if c["BLOCK_N"] <= n_cap and c["BLOCK_K"] <= k_cap] or _cuda_configs()[-1:]
    if tma_elem_size:
        # A TMA box row of at most 128 bytes: the widest shared-memory swizzle.
        kept += [dict(c, TMA=True) for c in kept
                 if c["BLOCK_M"] >= 64 and c["BLOCK_N"] >= 64 and c["BLOCK_K"] * tma_elem_size <= 128]
    return kept


def _with_tma_fallback(C_in_g: int, C_out_g: int):
    """``choose`` for :func:`effops.tuning.pick`: the fastest config, and when that is a TMA
    tile, the fastest other config (a pointer tile or a vendor path) with it as ``FALLBACK``:
    the same shapes can come with other strides or alignment, which the TMA kernel can't take."""
    def choose(ranked):
        cfg = ranked[0]
        if cfg.get("TMA"):
            fallback = next((c for c in ranked if not c.get("TMA")), None)
            cfg = dict(cfg, FALLBACK=fallback or _candidates(C_in_g, C_out_g)[-1])
        return cfg
    return choose


_TMA_DEVICES: dict = {}


def _tma_device(device: torch.device) -> bool:
    """TMA exists from Hopper (sm_90) on; the interpreter emulates it on the CPU."""
    if device.type == "cpu":
        return True
    ok = _TMA_DEVICES.get(device.index)
    if ok is None:
        ok = _TMA_DEVICES[device.index] = torch.cuda.get_device_capability(device)[0] >= 9
    return ok


def tma_eligible(x: Tensor, weight: Tensor, out: Tensor, stride, dilation, groups: int) -> bool:
    """Whether ``_conv_bn_act_tma_kernel`` can run this conv: Triton with TMA descriptors
    on an sm_90+ GPU; a stride-1 conv whose output is the input's size; an NHWC,
    pixel-dense input (channel views included) and an OHWI-contiguous weight, with the
    16-byte alignment of addresses and row strides TMA requires; int32 coordinates."""
    return _tma_eligible(x, weight, out.shape[2], out.shape[3], stride, dilation, groups)


def _tma_eligible(x: Tensor, weight: Tensor, OH: int, OW: int, stride, dilation, groups: int) -> bool:
    """:func:`tma_eligible` for an output of spatial size ``OH x OW``."""
    if TensorDescriptor is None or groups != 1 or stride[0] != 1 or stride[1] != 1:
        return False
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    if OH != H or OW != W:
        return False
    es = x.element_size()
    ps = _pixel_stride(x)
    if ps is None or (ps * es) % 16 or (C_in * es) % 16 or x.data_ptr() % 16:
        return False
    if not _strides_match(weight, (KH * KW * C_in, 1, KW * C_in, C_in)) or weight.data_ptr() % 16:
        return False
    if (N * H * W + H * W) * ps > _INT32_MAX or weight.numel() > _INT32_MAX:
        return False
    return _tma_device(x.device)


def _strides_match(t: Tensor, want) -> bool:
    # The stride of a size-1 dimension is meaningless (PyTorch leaves it arbitrary).
    return all(n == 1 or s == w for n, s, w in zip(t.shape, t.stride(), want))


def _pixel_stride(x: Tensor) -> Optional[int]:
    """P when ``x`` (N, C, H, W) is channel-contiguous and its pixels are rows of a
    matrix with row stride P (NHWC tensors and channel views of them), else None."""
    N, C, H, W = x.shape
    sn, sc, sh, sw = x.stride()
    ps = sw if W > 1 else (sh if H > 1 else (sn if N > 1 else C))
    if ps < C or (C > 1 and sc != 1) or not _strides_match(x, (H * W * ps, 1, W * ps, ps)):
        return None
    return ps


def _launch_tma(x, weight, args_tail, meta, cfg):
    """``_conv_bn_act_tma_kernel`` with ``cfg``'s tile (see tma_eligible for when it applies)."""
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    x_desc = TensorDescriptor(x, [N * H * W, C_in], [_pixel_stride(x), 1], [bm, bk])
    w_desc = TensorDescriptor(weight, [C_out, KH * KW * C_in], [KH * KW * C_in, 1], [bn, bk])
    grid = (_cdiv(N * H * W, bm) * _cdiv(C_out, bn),)
    _conv_bn_act_tma_kernel[grid](x_desc, w_desc, *args_tail, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                  num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))


def _heuristic_meta(M: int, C_in_g: int, C_out_g: int) -> dict:
    """One fixed config when autotuning is off (EFFOPS_AUTOTUNE=0): no
    benchmarking on first call, deterministic start-up (tests, CI-like runs)."""
    bn = 128 if C_out_g > 64 else (64 if C_out_g > 32 else 32)
    bk = 64 if C_in_g >= 64 else 32
    bm = 128 if M >= 4096 else 64
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4 if bm * bn <= 8192 else 8, num_stages=3)


def _max_offset(t: Optional[Tensor]) -> int:
    # Conservative bound on any element offset the kernel may form for t
    # (masked lanes included): sum(size * stride).
    if t is None:
        return 0
    return sum(map(operator.mul, t.shape, t.stride()))


def needs_int64(*tensors: Optional[Tensor]) -> bool:
    return any(_max_offset(t) > _INT32_MAX for t in tensors)


def _new_output_needs_int64(x: Tensor, C: int, OH: int, OW: int) -> bool:
    """``needs_int64(out)`` for the output ``_new_output`` would allocate (``out=None``), without allocating it."""
    N = x.shape[0]
    if prefers_channels_last(x):  # strides (OH*OW*C, 1, OW*C, C)
        bound = N * OH * OW * C + C + OH * OW * C + OW * C
    else:  # strides (C*OH*OW, OH*OW, OW, 1)
        bound = N * C * OH * OW + C * OH * OW + OH * OW + OW
    return bound > _INT32_MAX


def _dot_meta(x: Tensor, interpreting: bool) -> dict:
    """``tl.dot`` settings shared by every GEMM launcher: bf16 operands upcast under the
    interpreter (see ``_mma``); fp32 follows nn.Conv2d, TF32 exactly when cuDNN would use it."""
    return dict(
        UPCAST_DOT=interpreting and x.dtype == torch.bfloat16,
        DOT_PRECISION="tf32" if (x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreting)
        else "ieee",
    )


def _interpret_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _next_pow2(max(n, 1))))


def _depthwise_configs():
    """Tiles for ``_depthwise_kernel`` (pixels x channels; no shared-memory pipeline)."""
    return [dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=w, num_stages=1) for bp, bc, w in [
        (64, 64, 4), (32, 128, 4), (128, 32, 4), (128, 64, 8), (16, 128, 4), (256, 16, 4), (32, 32, 2),
    ]]


def _depthwise_heuristic(C: int) -> dict:
    bc = 64 if C >= 64 else (32 if C > 16 else 16)
    return dict(BLOCK_P=4096 // bc if bc < 64 else 64, BLOCK_C=bc, num_warps=4, num_stages=1)


# Vendor (cuDNN) candidates: timed beside the Triton tiles of the conv and depthwise launchers.
_VENDOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
VENDORS = ("cudnn", "cudnn_relu", "cudnn_add_relu")


def _cudnn_usable(x: Tensor) -> bool:
    """Whether cuDNN runs convs of ``x`` here: a CUDA tensor, with cuDNN present and enabled.
    Tests patch it to offer the vendor candidates to CPU tensors on the device branch."""
    return x.is_cuda and torch.backends.cudnn.enabled and torch.backends.cudnn.is_available()


def vendor_reasons(x: Tensor) -> List[str]:
    """Why the tuner offers no cuDNN candidate for input ``x`` (empty: it does)."""
    why = []
    if not x.is_cuda:
        why.append(f"cuDNN runs on cuda tensors, got {x.device.type}")
    elif not torch.backends.cudnn.is_available():
        why.append("this torch build has no cuDNN")
    elif not torch.backends.cudnn.enabled:
        why.append("torch.backends.cudnn.enabled is False")
    if x.dtype not in _VENDOR_DTYPES:
        why.append(f"the cuDNN candidates take float16, bfloat16 or float32, got {x.dtype}")
    return why


def _vendor_applies(name: str, residual, act: str, residual_after_act: bool) -> bool:
    if name == "cudnn":
        return True
    if name == "cudnn_relu":
        return act == "relu" and residual is None
    if name == "cudnn_add_relu":
        return act == "relu" and residual is not None and not residual_after_act
    return False


def _vendor_candidates(x: Tensor, residual, act: str, residual_after_act: bool, gate=None,
                       out_shuffle_groups: int = 1) -> List[dict]:
    """The cuDNN configs the tuner times beside the Triton tiles (none off CUDA or without cuDNN,
    nor for a gated input or a shuffled write: cuDNN would need an extra pass for either):
    ``cudnn`` (conv + bias, then residual / activation in place) always, and cuDNN's fused
    ``cudnn_relu`` / ``cudnn_add_relu`` where the epilogue is exactly theirs."""
    if gate is not None or out_shuffle_groups != 1 or x.dtype not in _VENDOR_DTYPES or not _cudnn_usable(x):
        return []
    return [{"VENDOR": v} for v in VENDORS if _vendor_applies(v, residual, act, residual_after_act)]


def _extras_key(gate, out_shuffle_groups: int) -> tuple:
    """Tuning-key suffix for a gated input or a shuffled write (empty for plain calls, whose
    keys, and so stored tuning files, stay as they are)."""
    return () if gate is None and out_shuffle_groups == 1 else (("gate", gate is not None),
                                                                 ("shuffle", out_shuffle_groups))


def _vendor_act(act: str, act_param: float):
    """The activation applied in place to a fresh conv output (functional where there is no in-place form)."""
    f = _INPLACE_ACT.get(act)
    if f is not None:
        return f
    if act == "leaky_relu":
        return lambda y: F.leaky_relu(y, act_param, inplace=True)
    return lambda y: apply_activation(y, act, act_param)


def _launch_vendor(name, x, weight, scale, bias, residual, out, stride, padding, dilation, groups, act, act_param,
                   residual_after_act) -> Tensor:
    """One vendor config: the BN scale folded into the weight (in fp32, cast to the input dtype;
    :func:`_vendor_weight_bias`), the bias in the conv. The result lands
    in ``out`` when given (the copy is part of the launch, so the tuner times it), else it is
    cuDNN's own output when that has :func:`output_format`'s layout."""
    if not _vendor_applies(name, residual, act, residual_after_act):
        raise ValueError(f"vendor config {name!r} can't run act={act!r} with "
                         f"{'no residual' if residual is None else 'a residual'}"
                         f"{' after the activation' if residual is not None and residual_after_act else ''}")
    w, b = _vendor_weight_bias(weight, scale, bias, x.dtype)
    if name == "cudnn_relu":
        y = torch.cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups)
    elif name == "cudnn_add_relu":
        y = torch.cudnn_convolution_add_relu(x, w, residual, 1.0, b, stride, padding, dilation, groups)
    else:
        y = F.conv2d(x, w, b, stride, padding, dilation, groups)
        y = reference.add_residual_around(y, _vendor_act(act, act_param), residual, residual_after_act, inplace=True)
    return _deliver(y, out, x, weight, stride, padding, dilation)


# cuDNN's folded operands, keyed by the sources' ids and dtype: (data pointers and versions,
# weak references to the sources, (weight, bias)). See _vendor_weight_bias.
_VENDOR_FOLDS: dict = {}
_VENDOR_PRUNE = {"at": 64}


def clear_vendor_folds() -> None:
    """Drop every cached cuDNN operand (``effops.refresh()``)."""
    _VENDOR_FOLDS.clear()


def _vendor_weight_bias(weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], dtype: torch.dtype):
    """cuDNN's operands: ``(weight * scale).to(dtype)`` (the product in fp32) and ``bias.to(dtype)``.

    Derived once per state of ``(weight, scale, bias)`` and reused while each is the same tensor
    at the same data pointer and version (a module's scale and bias are themselves derived once
    per BN state, so they are the same tensors call after call), where :func:`derived_reusable`
    allows: three launches less per call. Writes no version counter sees need
    ``effops.refresh()``, as everywhere. Only weak references to the sources are held; entries
    whose sources are gone are dropped as the table grows."""
    def fold():
        w = weight if scale is None else (weight * scale.view(-1, 1, 1, 1)).to(dtype)
        return w, None if bias is None else bias.to(dtype)

    srcs = [t for t in (weight, scale, bias) if t is not None]
    if (scale is None and (bias is None or bias.dtype == dtype)) or not derived_reusable(weight, srcs):
        return fold()
    try:
        state = tuple((t.data_ptr(), t._version) for t in srcs)
    except RuntimeError:  # inference tensors have no version counter
        return fold()
    key = (id(weight), id(scale), id(bias), dtype)
    hit = _VENDOR_FOLDS.get(key)
    if hit is not None and hit[0] == state and all(r() is t for r, t in zip(hit[1], srcs)):
        return hit[2]
    with torch.no_grad():
        value = fold()
    _VENDOR_FOLDS[key] = (state, tuple(weakref.ref(t) for t in srcs), value)
    if len(_VENDOR_FOLDS) > _VENDOR_PRUNE["at"]:
        for k in [k for k, v in _VENDOR_FOLDS.items() if any(r() is None for r in v[1])]:
            del _VENDOR_FOLDS[k]
        _VENDOR_PRUNE["at"] = max(64, 2 * len(_VENDOR_FOLDS))
    return value


def _deliver(y: Tensor, out: Optional[Tensor], x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    """A result computed outside effops' kernels, where the op promises it: into ``out`` when
    given, else ``y`` itself when it already has :func:`output_format`, else a copy that has."""
    if out is None:
        if y.is_contiguous(memory_format=output_format(x)):
            return y
        out = _new_output(x, weight, stride, padding, dilation)
    out.copy_(y)
    return out


def _run_depthwise(x, weight, scale, bias, residual, out, stride, padding, dilation, act, act_param,
                   residual_after_act, gate=None, out_shuffle_groups: int = 1, force_int64: bool = False) -> Tensor:
    """The depthwise launcher (tuned beside cuDNN on a GPU, unless the call has a gate or a
    shuffled write, which cuDNN doesn't do); returns the result, ``out`` when given."""
    N, C, H, W = x.shape
    KH, KW = weight.shape[2], weight.shape[3]
    OH, OW = _out_hw(H, W, (KH, KW), stride, padding, dilation) if out is None else (out.shape[2], out.shape[3])
    M = N * OH * OW
    meta = dict(KH=KH, KW=KW, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
                HAS_RES=residual is not None, RES_AFTER_ACT=bool(residual_after_act), ACT=act,
                HAS_GATE=gate is not None, SHUFFLE_G=out_shuffle_groups,
                IDX64=force_int64 or needs_int64(x, residual, out, gate)
                or (out is None and _new_output_needs_int64(x, C, OH, OW)))

    def launch(cfg):
        if "VENDOR" in cfg:
            return _launch_vendor(cfg["VENDOR"], x, weight, scale, bias, residual, out, stride, padding, dilation, C,
                                  act, act_param, residual_after_act)
        dst = out if out is not None else _new_output(x, weight, stride, padding, dilation)
        rs = residual.stride() if residual is not None else (0, 0, 0, 0)
        _depthwise_kernel[(_cdiv(M, cfg["BLOCK_P"]), _cdiv(C, cfg["BLOCK_C"]))](
            x, weight, scale if scale is not None else dst, bias if bias is not None else dst,
            residual if residual is not None else dst, dst, gate if gate is not None else dst,
            H, W, OH, OW, M, C,
            *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *rs, *dst.stride(),
            *(gate.stride() if gate is not None else (0, 0)),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            float(act_param), **meta, **cfg)
        return dst

    return launch_tuned(
        x, launch, lambda: dict(BLOCK_P=_interpret_block(M, 16, 64), BLOCK_C=_interpret_block(C, 16, 64)),
        ("depthwise", tuning.bucket(M), C, KH, KW, tuple(stride), tuple(dilation), x.dtype, residual is not None,
         act, bool(residual_after_act) and residual is not None, scale is not None, out is not None)
        + _extras_key(gate, out_shuffle_groups),
        lambda: _depthwise_heuristic(C),
        lambda: _depthwise_configs() + _vendor_candidates(x, residual, act, residual_after_act, gate,
                                                          out_shuffle_groups))


def launch_tuned(x: Tensor, launch, interpret_cfg, key, heuristic, candidates, choose=None):
    """What every launcher does with its ``launch(cfg)``: under the interpreter (CPU tensors)
    one small fixed tile, ``interpret_cfg()``; on a GPU the config :func:`effops.tuning.pick`
    gives for ``key`` (timed once per problem bucket and device kind, then cached), launched
    on the tensors' device. Returns what ``launch`` returns."""
    if _interpreting(x):
        return launch(interpret_cfg())
    with _on_device(x.device):
        return launch(tuning.pick(key, launch, heuristic, candidates, x.device, choose=choose))


def _run_triton(x, weight, scale, bias, residual, out, stride, padding, dilation, groups, act, act_param,
                residual_after_act, gate: Optional[Tensor] = None, out_shuffle_groups: int = 1,
                force_int64: bool = False, config: Optional[dict] = None, channel_sums: bool = False):
    """Launch the conv and return its result: ``out`` when given, else a new tensor in
    :func:`output_format` (on a GPU possibly cuDNN's own output, when the tuner picked cuDNN).
    ``gate`` ([N, C_in]) scales the A tile after loading (pointer kernels: the TMA kernel refuses
    gated calls, so the tuner offers it no TMA tile); ``out_shuffle_groups`` permutes the stored
    channels in every kernel's epilogue. cuDNN is not offered for either.
    ``config`` bypasses tuning: a tile (BLOCK_M/N/K, num_warps, num_stages, ``TMA``) or a
    vendor path (``{"VENDOR": "cudnn" | "cudnn_relu" | "cudnn_add_relu"}``);
    benchmarks/tools/sweep_conv_configs.py uses it.
    ``channel_sums``: return ``(y, psum, num_hb)`` instead, ``psum`` the fp32 ``[N * num_hb, C_out]``
    per-(image, pixel block) channel sums of the stored ``y`` written by the GEMM kernel's epilogue
    (rows tiled per image; depthwise convs run the GEMM kernel too; no TMA tile, no cuDNN, no
    ``out_shuffle_groups``)."""
    N, C_in, H, W = x.shape
    C_out, C_in_g, KH, KW = weight.shape
    OH, OW = _out_hw(H, W, (KH, KW), stride, padding, dilation) if out is None else (out.shape[2], out.shape[3])
    M = N * OH * OW
    if channel_sums and out_shuffle_groups != 1:
        raise ValueError("channel_sums can't be combined with out_shuffle_groups (the sums are per conv channel)")
    if M == 0 or C_out == 0:
        y = out if out is not None else _new_output(x, weight, stride, padding, dilation)
        if channel_sums:
            return y, torch.zeros((N, C_out), dtype=torch.float32, device=x.device), 1
        return y
    C_out_g = C_out // groups
    if scale is not None and (scale.dtype != torch.float32 or not scale.is_contiguous()):
        scale = scale.to(torch.float32).contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    if groups > 1 and C_in_g == 1 and C_out_g == 1 and config is None and not channel_sums:
        # Depthwise: the GEMM would compute one useful column of every >= 32-wide tile.
        return _run_depthwise(x, weight, scale, bias, residual, out, stride, padding, dilation, act, act_param,
                              residual_after_act, gate, out_shuffle_groups, force_int64)
    interpreting = _interpreting(x)
    meta = dict(
        KH=KH, KW=KW,
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, RES_AFTER_ACT=bool(residual_after_act),
        ACT=act, HAS_GATE=gate is not None, SHUFFLE_G=out_shuffle_groups, CH_SUM=bool(channel_sums),
        POINTWISE=(KH == 1 and KW == 1 and stride[0] == 1 and stride[1] == 1 and padding[0] == 0 and padding[1] == 0
                   and x.stride(2) == W * x.stride(3) and x.stride(0) == H * x.stride(2)),
        IDX64=(force_int64 or needs_int64(x, residual, out, gate)
               or (out is None and _new_output_needs_int64(x, C_out, OH, OW))),
        **_dot_meta(x, interpreting),
    )
    extras = gate is not None or out_shuffle_groups != 1 or channel_sums
    per_image = gate is not None or channel_sums  # row tiles never span two images
    psum, num_hb = None, 1

    def gemm_weight() -> Tensor:
        if interpreting or weight.is_contiguous(memory_format=torch.channels_last):
            return weight
        # The GEMM kernels read K (kh, kw, input channel) contiguously from an OHWI weight
        # (and the TMA kernel requires it). Modules run with the weight they hold, so an
        # OIHW weight is laid out per call: keep conv weights channels_last on a GPU.
        return weight.contiguous(memory_format=torch.channels_last)

    def tma_ok(wk: Tensor) -> bool:  # the TMA kernel's addressing is int32 throughout; it has no gate
        return not meta["IDX64"] and not per_image and _tma_eligible(x, wk, OH, OW, stride, dilation, groups)

    def vendor(name: str) -> Tensor:
        if extras:
            raise ValueError(f"vendor config {name!r} can't run a gated input, a shuffled write or channel sums")
        return _launch_vendor(name, x, weight, scale, bias, residual, out, stride, padding, dilation, groups, act,
                              act_param, residual_after_act)

    def launch(cfg) -> Tensor:
        if "VENDOR" in cfg:
            return vendor(cfg["VENDOR"])
        wk = gemm_weight()
        if cfg.get("TMA") and "FALLBACK" in cfg and not tma_ok(wk):
            # A TMA tile tuned on this problem's shapes, for a call it can't take (other strides or alignment).
            cfg = cfg["FALLBACK"]
            if "VENDOR" in cfg:
                return vendor(cfg["VENDOR"])
        nonlocal psum, num_hb
        dst = out if out is not None else _new_output(x, weight, stride, padding, dilation)
        rs = residual.stride() if residual is not None else (0, 0, 0, 0)
        if channel_sums:  # one partial-sum row per (image, row tile): depends on BLOCK_M
            num_hb = _cdiv(OH * OW, cfg["BLOCK_M"])
            if psum is None or psum.shape[0] != N * num_hb:
                psum = torch.empty((N * num_hb, C_out), dtype=torch.float32, device=x.device)
        args = (
            x, wk, scale if scale is not None else dst, bias if bias is not None else dst,
            residual if residual is not None else dst, dst, gate if gate is not None else dst,
            psum if psum is not None else dst,
            H, W, OH, OW, M, C_in_g, C_out_g,
            *x.stride(), *wk.stride(), *rs, *dst.stride(), *(gate.stride() if gate is not None else (0, 0)),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            float(act_param),
        )
        if cfg.get("TMA"):
            tma_meta = dict(meta)
            for k in ("POINTWISE", "IDX64", "HAS_GATE", "CH_SUM"):  # the TMA kernel has none of these
                del tma_meta[k]
            _launch_tma(x, wk, (*args[2:6], H, W, M, C_in, C_out, *rs, *dst.stride(), padding[0], padding[1],
                                dilation[0], dilation[1], float(act_param)), tma_meta, cfg)
            return dst
        # A gated or channel-summing launch tiles the rows per image (the kernel's HAS_GATE / CH_SUM).
        m_tiles = N * _cdiv(OH * OW, cfg["BLOCK_M"]) if per_image else _cdiv(M, cfg["BLOCK_M"])
        grid = (m_tiles * _cdiv(C_out_g, cfg["BLOCK_N"]), groups)
        _conv_bn_act_kernel[grid](*args, **meta, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                  BLOCK_K=cfg["BLOCK_K"], num_warps=cfg.get("num_warps", 4),
                                  num_stages=cfg.get("num_stages", 3))
        return dst

    if config is not None:
        if "VENDOR" in config:
            if extras or not _vendor_applies(config["VENDOR"], residual, act, residual_after_act):
                vendor(config["VENDOR"])  # raises ValueError naming why
        elif config.get("TMA") and not tma_ok(gemm_weight()):
            raise ValueError("config asks for the TMA kernel, which can't run this conv (see conv.tma_eligible)")
        with _NULL_CTX if interpreting else _on_device(x.device):
            y = launch(config)
        return (y, psum, num_hb) if channel_sums else y
    # Tuned once per problem and pixel-count bucket (effops.tuning); the launch uses the real M.
    # Whether the result must land in a given tensor is in the key: a vendor candidate then times its copy.
    # The tuner's last launch is the chosen config's: psum and num_hb are then that launch's.
    y = launch_tuned(
        x, launch, lambda: dict(BLOCK_M=_interpret_block(M, 16, 64), BLOCK_N=_interpret_block(C_out_g, 16, 64),
                                BLOCK_K=_interpret_block(C_in_g, 16, 64)),
        ("conv", tuning.bucket(M), C_in_g, C_out_g, KH, KW, tuple(stride), x.dtype, meta["POINTWISE"],
         meta["HAS_SCALE"], meta["HAS_RES"], act, groups, meta["HAS_RES"] and meta["RES_AFTER_ACT"], out is not None)
        + _extras_key(gate, out_shuffle_groups) + (("channel_sums",) if channel_sums else ()),
        lambda: _heuristic_meta(M, C_in_g, C_out_g),
        lambda: (_candidates(C_in_g, C_out_g, x.element_size() if tma_ok(gemm_weight()) else 0)
                 + ([] if channel_sums else
                    _vendor_candidates(x, residual, act, residual_after_act, gate, out_shuffle_groups))),
        choose=_with_tma_fallback(C_in_g, C_out_g))
    return (y, psum, num_hb) if channel_sums else y


_NULL_CTX = contextlib.nullcontext()


def _on_device(device: torch.device):
    # Triton launches on the current device; switching costs a few µs per call,
    # so only switch when the tensors live elsewhere.
    return _NULL_CTX if device.index == torch.cuda.current_device() else torch.cuda.device(device)


def _triton_reasons(x, weight, scale, bias, residual, out, *rest) -> List[str]:
    why = []
    if triton is None:
        return ["triton is not installed"]
    dev = x.device.type
    if dev == "cpu":
        if not INTERPRETED:
            why.append("CPU tensors run only under Triton's interpreter: set TRITON_INTERPRET=1 before importing effops")
        elif not dispatch.triton_on_cpu_allowed():
            why.append("CPU tensors take the Triton interpreter only when asked (use_backend('triton'), "
                       "EFFOPS_BACKEND=triton or EFFOPS_CPU_BACKEND=triton)")
    elif dev != "cuda":
        why.append(f"the triton backend runs on cuda tensors (or cpu under TRITON_INTERPRET=1), got {dev}")
    elif INTERPRETED:
        why.append("TRITON_INTERPRET=1 is set: the interpreter runs cpu tensors only")
    if x.dtype not in _KERNEL_DTYPES:
        why.append(f"the triton kernel takes float16, bfloat16 or float32, got {x.dtype}")
    if _max_offset(weight) > _INT32_MAX:
        why.append("weight larger than 2**31 elements")
    return why


_INPLACE_ACT = {
    "identity": lambda y: y,
    "relu": lambda y: F.relu(y, inplace=True),
    "relu6": lambda y: F.hardtanh(y, 0.0, 6.0, inplace=True),
    "hardswish": lambda y: F.hardswish(y, inplace=True),
    "hardsigmoid": lambda y: F.hardsigmoid(y, inplace=True),
    "silu": lambda y: F.silu(y, inplace=True),
    "sigmoid": lambda y: y.sigmoid_(),
}


def _run_reference(x, weight, scale, bias, residual, out, stride, padding, dilation, groups, act, act_param,
                   residual_after_act, gate=None, out_shuffle_groups=1):
    if gate is not None or out_shuffle_groups != 1:
        y = reference.conv_scale_bias_act(x, weight, scale, bias, residual, stride, padding, dilation, groups, act,
                                          act_param, residual_after_act, gate, out_shuffle_groups)
        return _deliver(y, out, x, weight, stride, padding, dilation)
    if x.dtype in (torch.float32, torch.float64) and act in _INPLACE_ACT:
        # Same math as reference.conv_scale_bias_act in fewer passes: the bias rides in the conv,
        # the BN scale is folded into the weight when that is the smaller tensor (else applied
        # in place to the output), the activation and residual run in place.
        b = None if bias is None else bias.to(x.dtype)
        s = None if scale is None else scale.to(x.dtype).view(-1, 1, 1, 1)
        oh, ow = _out_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
        if s is not None and weight.numel() <= x.shape[0] * weight.shape[0] * oh * ow:
            weight, s = weight * s, None
        y = F.conv2d(x, weight, b if s is None else None, stride, padding, dilation, groups)
        if s is not None:
            y.mul_(s.view(1, -1, 1, 1))
            if b is not None:
                y.add_(b.view(1, -1, 1, 1))
        y = reference.add_residual_around(y, _INPLACE_ACT[act], residual, residual_after_act, inplace=True)
    else:
        y = reference.conv_scale_bias_act(
            x, weight, scale, bias, residual, stride, padding, dilation, groups, act, act_param, residual_after_act
        )
    return _deliver(y, out, x, weight, stride, padding, dilation)


def native_reasons(x: Tensor, weight: Optional[Tensor] = None) -> List[str]:
    """Why the native CPU backend can't take input ``x`` (and ``weight``; empty: it can). Shared
    by every op."""
    if not isinstance(x, Tensor) or x.device.type != "cpu":
        return [f"the native backend runs CPU tensors, got {getattr(x, 'device', type(x).__name__)}"]
    why = []
    if x.dtype == torch.bfloat16:
        if not native_bf16():
            why.append("this CPU has no native bfloat16 (oneDNN reports no AVX512-BF16/AMX support)")
    elif x.dtype != torch.float32:
        why.append(f"the native backend takes float32 or bfloat16, got {x.dtype}")
    if isinstance(weight, Tensor) and weight.dtype != x.dtype:
        why.append(f"the native backend takes weights in the input's dtype ({x.dtype}), got {weight.dtype}")
    if not _native.available():
        why.append(f"the native extension is unavailable: {_native.status(load=False)[1]}")
    return why


def derived_reusable(x: Tensor, sources) -> bool:
    """Whether a call with input ``x`` may reuse values derived from the tensors ``sources`` (a BN's
    scale and bias, cuDNN's folded weight) from an earlier call: not while tracing (the trace must
    compute them), not while a CUDA graph is captured (its replays then read the live parameters,
    as they would without a cache), and not when autograd needs them differentiable."""
    if torch.compiler.is_compiling():
        return False
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in sources))


def native_fast(x) -> bool:
    """Whether an eager CPU call with input ``x`` goes to the native backend (modules then call
    it directly, skipping the dispatcher): CPU float32 (bfloat16 where the CPU has it), native
    preferred or forced, and the extension built."""
    if not isinstance(x, Tensor) or x.device.type != "cpu" or not native_first():
        return False
    if x.dtype != torch.float32 and not (x.dtype == torch.bfloat16 and native_bf16()):
        return False
    return _native_loaded()


@torch._dynamo.assume_constant_result
def _native_loaded() -> bool:
    # Under torch.compile, Dynamo calls this while tracing and bakes in the answer: loading the
    # extension takes a lock and hashes the sources, which it can't trace (a graph break in the
    # first fused module of a model compiled before any eager call). Eager calls run it as is.
    return _native.available()


# The per-call question of every fused module's eager fast path (it reads os.environ's dict directly).
native_first = dispatch.native_first


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _native_conv_reasons(x, weight, *rest) -> List[str]:
    return native_reasons(x, weight)


def _run_native(x, weight, scale, bias, residual, out, stride, padding, dilation, groups, act, act_param,
                residual_after_act, gate=None, out_shuffle_groups=1):
    # oneDNN with the BN folded into a prepacked weight (cached in C++, keyed by the tensors'
    # identities and versions), fused activation / residual: csrc/conv.cpp.
    return _native.module().conv_scale_bias_act(
        x, weight, scale, bias, residual, out, list(stride), list(padding), list(dilation), groups, act,
        float(act_param), residual_after_act, gate, out_shuffle_groups)


dispatch.register("conv_bn_act", "native", _native_conv_reasons)(_run_native)
dispatch.register("conv_bn_act", "triton", _triton_reasons)(_run_triton)
dispatch.register("conv_bn_act", "reference")(_run_reference)


# ----------------------------------------------------------------------------
# 2. Registered ops
# ----------------------------------------------------------------------------
def _out_hw(H: int, W: int, k: Tuple[int, int], stride, padding, dilation) -> Tuple[int, int]:
    oh = (H + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    ow = (W + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    return oh, ow


def output_format(x: Tensor) -> torch.memory_format:
    """The memory format of every effops op's output for input ``x``: NHWC when ``x`` is
    (or is a channel view of) an NHWC tensor, as cuDNN would choose, else NCHW."""
    return torch.channels_last if prefers_channels_last(x) else torch.contiguous_format


def prefers_channels_last(x: Tensor) -> bool:
    """Whether a conv of ``x`` should produce NHWC memory (as cuDNN would)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return True
    # A channel view of an NHWC buffer is neither, but channel-minor.
    return not x.is_contiguous() and x.stride(1) < x.stride(3)


def _new_output(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    oh, ow = _out_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=output_format(x))


@torch.library.custom_op("effops::conv_bn_act", mutates_args=())
def _conv_bn_act_op(
    x: Tensor, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    stride: List[int], padding: List[int], dilation: List[int], groups: int,
    act: str, act_param: float, residual_after_act: bool,
    gate: Optional[Tensor] = None, out_shuffle_groups: int = 1,
) -> Tensor:
    # Backends allocate the output themselves (out=None) in the layout _new_output gives.
    return dispatch.run("conv_bn_act", x, weight, scale, bias, residual, None, stride, padding, dilation, groups,
                        act, act_param, residual_after_act, gate, out_shuffle_groups)


@_conv_bn_act_op.register_fake
def _(x, weight, scale, bias, residual, stride, padding, dilation, groups, act, act_param, residual_after_act,
      gate=None, out_shuffle_groups=1):
    return _new_output(x, weight, stride, padding, dilation)


@torch.library.custom_op("effops::conv_bn_act_out", mutates_args=("out",))
def _conv_bn_act_out_op(
    x: Tensor, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    stride: List[int], padding: List[int], dilation: List[int], groups: int,
    act: str, act_param: float, residual_after_act: bool, out: Tensor,
    gate: Optional[Tensor] = None, out_shuffle_groups: int = 1,
) -> None:
    dispatch.run("conv_bn_act", x, weight, scale, bias, residual, out, stride, padding, dilation, groups, act,
                 act_param, residual_after_act, gate, out_shuffle_groups)


@_conv_bn_act_out_op.register_fake
def _(x, weight, scale, bias, residual, stride, padding, dilation, groups, act, act_param, residual_after_act, out,
      gate=None, out_shuffle_groups=1):
    return None


def _setup_context(ctx, inputs, output):
    x, weight, scale, bias, residual, stride, padding, dilation, groups, act, act_param, res_after = inputs[:12]
    gate, shuffle_groups = inputs[12:] if len(inputs) > 12 else (None, 1)
    ctx.save_for_backward(x, weight, scale, bias, residual, gate)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.act = (act, act_param, res_after, shuffle_groups)


def _backward(ctx, grad_out):
    # No fused backward yet: recompute the pre-activation in fp32 (cheaper in
    # memory than saving it) and apply the chain rule with PyTorch's conv grads.
    x, weight, scale, bias, residual, gate = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    act, act_param, res_after, shuffle_groups = ctx.act
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc, wc, g = x.to(cd), weight.to(cd), grad_out.to(cd)
    if shuffle_groups != 1:
        # The output is channel_shuffle(y, g); its inverse is a shuffle with C // g groups.
        g = reference.channel_shuffle(g, g.shape[1] // shuffle_groups)
    xg = xc if gate is None else xc * gate.to(cd)[:, :, None, None]
    z = F.conv2d(xg, wc, None, stride, padding, dilation, groups)
    pre = reference._channel_affine(z, scale, bias)
    if residual is not None and not res_after:
        pre = pre + residual.to(cd)
    g_pre = activation_grad(pre, g, act, act_param)
    g_z = g_pre if scale is None else g_pre * scale.to(cd).view(1, -1, 1, 1)
    need = ctx.needs_input_grad
    gx = gw = gs = gb = gr = gg = None
    if need[0] or (gate is not None and need[12]):
        g_xg = torch.nn.grad.conv2d_input(x.shape, wc, g_z, stride, padding, dilation, groups)
        if need[0]:
            gx = (g_xg if gate is None else g_xg * gate.to(cd)[:, :, None, None]).to(x.dtype)
        if gate is not None and need[12]:
            gg = (g_xg * xc).sum((2, 3)).to(gate.dtype)
    if need[1]:
        gw = torch.nn.grad.conv2d_weight(xg, weight.shape, g_z, stride, padding, dilation, groups).to(weight.dtype)
    if scale is not None and need[2]:
        gs = (g_pre * z).sum((0, 2, 3)).to(scale.dtype)
    if bias is not None and need[3]:
        gb = g_pre.sum((0, 2, 3)).to(bias.dtype)
    if residual is not None and need[4]:
        gr = (g if res_after else g_pre).to(residual.dtype)
    return gx, gw, gs, gb, gr, None, None, None, None, None, None, None, gg, None


_conv_bn_act_op.register_autograd(_backward, setup_context=_setup_context)


# The OpOverload itself: calling it skips CustomOpDef.__call__'s Python layer.
_OP = torch.ops.effops.conv_bn_act.default


@torch.library.custom_op("effops::conv_bn_act_native", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def _conv_bn_act_native_op(
    x: Tensor, weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float, residual: Optional[Tensor],
    stride: List[int], padding: List[int], dilation: List[int], groups: int, act: str, act_param: float,
    residual_after_act: bool, gate: Optional[Tensor] = None, out_shuffle_groups: int = 1,
    stats_counter: Optional[Tensor] = None,
) -> Tensor:
    """The native backend's conv + eval-mode BN + act with the BN given as its tensors, for
    torch.compile on CPU (inference only: no autograd). Taking the module's own tensors, not a
    scale and bias computed in the graph, lets the extension key its folded, prepacked weight
    on them, so a compiled model packs once, with or without freezing."""
    y = _native.module().conv_bn_act(x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps,
                                     residual, None, stride, padding, dilation, groups, act, act_param,
                                     residual_after_act, gate, out_shuffle_groups, stats_counter)
    out = _native_nhwc_output(x, weight.shape[0], stride, padding, dilation, weight.shape[2:])
    return y if y.stride() == out.stride() else out.copy_(y)


def _native_nhwc_output(x: Tensor, channels: int, stride, padding, dilation, kernel) -> Tensor:
    """The output of the native compile-only ops: always NHWC, whatever ``x``'s layout (oneDNN with a
    prepacked weight, the GEMM and the depthwise kernel all write NHWC; the C++ kernels make the
    strides exactly these)."""
    oh, ow = _out_hw(x.shape[2], x.shape[3], kernel, stride, padding, dilation)
    return torch.empty((x.shape[0], channels, oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


@_conv_bn_act_native_op.register_fake
def _(x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, stride, padding, dilation,
      groups, act, act_param, residual_after_act, gate=None, out_shuffle_groups=1, stats_counter=None):
    return _native_nhwc_output(x, weight.shape[0], stride, padding, dilation, weight.shape[2:])


NATIVE_BN_OP = torch.ops.effops.conv_bn_act_native.default


@torch.library.custom_op("effops::ghost_native", mutates_args=())
def _ghost_native_op(
    x: Tensor, gate: Optional[Tensor],
    w1: Tensor, cb1: Optional[Tensor], bw1: Optional[Tensor], bb1: Optional[Tensor], rm1: Optional[Tensor],
    rv1: Optional[Tensor], eps1: float, counter1: Optional[Tensor], stride1: List[int], padding1: List[int],
    dilation1: List[int], groups1: int, act1: str, act_param1: float,
    w2: Tensor, cb2: Optional[Tensor], bw2: Optional[Tensor], bb2: Optional[Tensor], rm2: Optional[Tensor],
    rv2: Optional[Tensor], eps2: float, counter2: Optional[Tensor], padding2: List[int], dilation2: List[int],
    groups2: int, act2: str, act_param2: float,
) -> Tensor:
    """A ghost module on the native backend, for torch.compile on CPU (inference only): the primary
    conv + BN + act (input gate ``gate``) into channels ``[0, C1)`` of one new buffer, then the
    stride-1 cheap conv + BN + act reading them in place into ``[C1, C1 + C2)``: one node, where two
    native ops and a cat would copy both halves into the concatenation. BNs as their own tensors,
    as in ``conv_bn_act_native`` (the extension's folded, packed weights stay cached)."""
    buf = _ghost_output(x, w1, w2, stride1, padding1, dilation1)
    init, mod = w1.shape[0], _native.module()
    x1 = buf.narrow(1, 0, init)
    mod.conv_bn_act(x, w1, cb1, bw1, bb1, rm1, rv1, eps1, None, x1, stride1, padding1, dilation1, groups1, act1,
                    act_param1, True, gate, 1, counter1)
    mod.conv_bn_act(x1, w2, cb2, bw2, bb2, rm2, rv2, eps2, None, buf.narrow(1, init, w2.shape[0]), [1, 1], padding2,
                    dilation2, groups2, act2, act_param2, True, None, 1, counter2)
    return buf


def _ghost_output(x, w1, w2, stride1, padding1, dilation1) -> Tensor:
    return _native_nhwc_output(x, w1.shape[0] + w2.shape[0], stride1, padding1, dilation1, w1.shape[2:])


@_ghost_native_op.register_fake
def _(x, gate, w1, cb1, bw1, bb1, rm1, rv1, eps1, counter1, stride1, padding1, dilation1, groups1, act1, act_param1,
      w2, cb2, bw2, bb2, rm2, rv2, eps2, counter2, padding2, dilation2, groups2, act2, act_param2):
    return _ghost_output(x, w1, w2, stride1, padding1, dilation1)


GHOST_NATIVE_OP = torch.ops.effops.ghost_native.default


@torch.library.custom_op("effops::pointwise_depthwise_native", mutates_args=())
def _pointwise_depthwise_native_op(
    x: Tensor,
    w1: Tensor, cb1: Optional[Tensor], bw1: Optional[Tensor], bb1: Optional[Tensor], rm1: Optional[Tensor],
    rv1: Optional[Tensor], eps1: float, counter1: Optional[Tensor], act1: str, act_param1: float,
    w2: Tensor, cb2: Optional[Tensor], bw2: Optional[Tensor], bb2: Optional[Tensor], rm2: Optional[Tensor],
    rv2: Optional[Tensor], eps2: float, counter2: Optional[Tensor], stride2: List[int], padding2: List[int],
    dilation2: List[int], act2: str, act_param2: float,
) -> Tensor:
    """An expand 1×1 conv + BN + act and a depthwise conv + BN + act on the native backend, for
    torch.compile on CPU (inference only): ``pointwise_depthwise_bn_act``, whose expanded tensor is
    computed a band of rows at a time and never written out. BNs as their own tensors, as in
    ``conv_bn_act_native``."""
    y = _native.module().pointwise_depthwise_bn_act(x, w1, cb1, bw1, bb1, rm1, rv1, eps1, counter1, act1, act_param1,
                                                    w2, cb2, bw2, bb2, rm2, rv2, eps2, counter2, stride2, padding2,
                                                    dilation2, act2, act_param2)
    out = _native_nhwc_output(x, w2.shape[0], stride2, padding2, dilation2, w2.shape[2:])
    return y if y.stride() == out.stride() else out.copy_(y)


@_pointwise_depthwise_native_op.register_fake
def _(x, w1, cb1, bw1, bb1, rm1, rv1, eps1, counter1, act1, act_param1, w2, cb2, bw2, bb2, rm2, rv2, eps2, counter2,
      stride2, padding2, dilation2, act2, act_param2):
    return _native_nhwc_output(x, w2.shape[0], stride2, padding2, dilation2, w2.shape[2:])


PAIR_NATIVE_OP = torch.ops.effops.pointwise_depthwise_native.default


@torch.library.custom_op("effops::depthwise_pointwise_native", mutates_args=())
def _depthwise_pointwise_native_op(
    x: Tensor,
    w1: Tensor, cb1: Optional[Tensor], bw1: Optional[Tensor], bb1: Optional[Tensor], rm1: Optional[Tensor],
    rv1: Optional[Tensor], eps1: float, counter1: Optional[Tensor], stride1: List[int], padding1: List[int],
    dilation1: List[int], act1: str, act_param1: float,
    w2: Tensor, cb2: Optional[Tensor], bw2: Optional[Tensor], bb2: Optional[Tensor], rm2: Optional[Tensor],
    rv2: Optional[Tensor], eps2: float, counter2: Optional[Tensor], act2: str, act_param2: float,
    residual: Optional[Tensor],
) -> Tensor:
    """A depthwise conv + BN + act and a 1×1 conv + BN + act (+ residual) on the native backend, for
    torch.compile on CPU (inference only): ``depthwise_pointwise_bn_act``, whose depthwise output is
    computed a band of rows at a time and never written out. BNs as their own tensors, as in
    ``conv_bn_act_native`` (the C++ CPU kernel in csrc/module.cpp replaces this body on CPU)."""
    y = _native.module().depthwise_pointwise_bn_act(x, w1, cb1, bw1, bb1, rm1, rv1, eps1, counter1, stride1, padding1,
                                                    dilation1, act1, act_param1, w2, cb2, bw2, bb2, rm2, rv2, eps2,
                                                    counter2, act2, act_param2, residual)
    out = _native_nhwc_output(x, w2.shape[0], stride1, padding1, dilation1, w1.shape[2:])
    return y if y.stride() == out.stride() else out.copy_(y)


@_depthwise_pointwise_native_op.register_fake
def _(x, w1, cb1, bw1, bb1, rm1, rv1, eps1, counter1, stride1, padding1, dilation1, act1, act_param1, w2, cb2, bw2,
      bb2, rm2, rv2, eps2, counter2, act2, act_param2, residual):
    return _native_nhwc_output(x, w2.shape[0], stride1, padding1, dilation1, w1.shape[2:])


DW_PAIR_NATIVE_OP = torch.ops.effops.depthwise_pointwise_native.default


# ----------------------------------------------------------------------------
# 3. Public entry point with input checks
# ----------------------------------------------------------------------------
def _pair(v, name: str) -> List[int]:
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v}")
    return v


def check_inputs(x, weight, scale, bias, residual, stride, padding, dilation, groups, act, gate=None,
                 out_shuffle_groups: int = 1) -> Tuple[int, int]:
    """Validate arguments; return the output spatial size. Errors name what was expected."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = f"{x.dim()}-D tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a 4-D input (N, C, H, W), got a {got}")
    if weight.dim() != 4:
        raise ValueError(f"expected a 4-D conv weight (C_out, C_in/groups, kh, kw), got shape {tuple(weight.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"expected a floating-point input (float16, bfloat16, float32 or float64), got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"input is {x.dtype} but weight is {weight.dtype}; expected the same dtype")
    for name, t in (("weight", weight), ("scale", scale), ("bias", bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}; expected the same device")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide the {weight.shape[0]} output channels")
    c_in = weight.shape[1] * groups
    if x.shape[1] != c_in:
        raise ValueError(
            f"expected input with {c_in} channels (weight {tuple(weight.shape)}, groups {groups}), "
            f"got {x.shape[1]} channels (input shape {tuple(x.shape)})"
        )
    c_out = weight.shape[0]
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != c_out):
            raise ValueError(f"expected {name} of shape ({c_out},), got {tuple(t.shape)}")
    check_activation(act)
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"invalid stride {stride}, padding {padding} or dilation {dilation}")
    oh, ow = _out_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    if oh < 1 or ow < 1:
        raise ValueError(
            f"input of spatial size {tuple(x.shape[2:])} is too small for kernel {tuple(weight.shape[2:])} "
            f"with stride {stride}, padding {padding}, dilation {dilation}"
        )
    if residual is not None and tuple(residual.shape) != (x.shape[0], c_out, oh, ow):
        raise ValueError(f"expected residual of shape {(x.shape[0], c_out, oh, ow)}, got {tuple(residual.shape)}")
    if residual is not None and residual.dtype != x.dtype:
        raise TypeError(f"residual is {residual.dtype} but the input is {x.dtype}; expected the same dtype")
    if gate is not None:
        check_gate(gate, x, c_in)
    if out_shuffle_groups != 1 or type(out_shuffle_groups) is not int:
        check_shuffle_groups(out_shuffle_groups, c_out)
    return oh, ow


def check_gate(gate, x: Tensor, c_in: int) -> None:
    """Validate an input gate: ``[N, C_in]``, float32 or ``x``'s dtype, on ``x``'s device."""
    if not isinstance(gate, Tensor):
        raise TypeError(f"expected gate to be a tensor of shape ({x.shape[0]}, {c_in}), got {type(gate).__name__}")
    if tuple(gate.shape) != (x.shape[0], c_in):
        raise ValueError(f"expected gate of shape (N, C_in) = ({x.shape[0]}, {c_in}), got {tuple(gate.shape)}")
    if gate.dtype != torch.float32 and gate.dtype != x.dtype:
        raise TypeError(f"gate is {gate.dtype}; expected float32 or the input's dtype {x.dtype}")
    if gate.device != x.device:
        raise ValueError(f"gate is on {gate.device} but the input is on {x.device}; expected the same device")


def check_shuffle_groups(groups, c_out: int) -> None:
    """Validate ``out_shuffle_groups``: an int >= 1 that divides the output channels."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or c_out % groups:
        raise ValueError(f"out_shuffle_groups must be an int >= 1 dividing the {c_out} output channels, got {groups!r}")


def checked_out(out: Union[ChannelView, Tensor], x: Tensor, weight: Tensor, scale, bias, residual, stride, padding,
                dilation, gate: Optional[Tensor] = None) -> Tensor:
    """The tensor ``out`` names, after checking it can receive this conv's result in place:
    the output's shape, ``x``'s dtype and device, no gradient needed, no overlap with an input."""
    dst = out.as_tensor() if isinstance(out, ChannelView) else out
    oh, ow = _out_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    expected = (x.shape[0], weight.shape[0], oh, ow)
    if tuple(dst.shape) != expected:
        raise ValueError(f"expected out of shape {expected}, got {tuple(dst.shape)}")
    if dst.dtype != x.dtype or dst.device != x.device:
        raise TypeError(f"out is {dst.dtype} on {dst.device}; expected {x.dtype} on {x.device}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, scale, bias, residual, gate)):
        raise RuntimeError("conv_bn_act(out=...) is inference-only; call it without out= to get gradients")
    if not torch.compiler.is_compiling():  # traced (fake) tensors have no addresses to compare
        _check_out_overlap(dst, x, residual, weight, scale, bias, gate)
    return dst


def _check_out_overlap(dst: Tensor, x, residual, weight, scale, bias, gate=None) -> None:
    """ValueError when ``out`` shares a memory element with an input the op reads: tiles
    would read values other tiles already overwrote, and the tile tuner re-launches the
    kernel on the same arguments. Disjoint views of one buffer pass (see views.overlaps).
    ~1 us per input in another allocation, a few us for one in ``out``'s buffer."""
    name = first_overlap(dst, (("x", x), ("residual", residual), ("weight", weight), ("scale", scale),
                               ("bias", bias), ("gate", gate)))
    if name is not None:
        t = dict(x=x, residual=residual, weight=weight, scale=scale, bias=bias, gate=gate)[name]
        raise ValueError(
            f"out overlaps {name}: conv_bn_act(out=...) writes out while reading {name}, so they must not "
            f"share memory (out shape {tuple(dst.shape)} strides {dst.stride()}, {name} shape "
            f"{tuple(t.shape)} strides {t.stride()}); disjoint channel ranges of one buffer are fine")


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    *,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    act: str = "identity",
    act_param: float = 0.0,
    residual_after_act: bool = False,
    out: Union[ChannelView, Tensor, None] = None,
    gate: Optional[Tensor] = None,
    out_shuffle_groups: int = 1,
) -> Tensor:
    """Fused ``act(conv2d(x, weight) * scale + bias (+ residual)) (+ residual)``.

    Equivalent PyTorch::

        if gate is not None:                                  # [N, C_in], e.g. an SE gate
            x = x * gate[:, :, None, None]
        y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        y = y * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
        y = act(y + residual) if not residual_after_act else act(y) + residual
        if out_shuffle_groups > 1:
            y = reference.channel_shuffle(y, out_shuffle_groups)

    ``scale`` and ``bias`` are per output channel and kept in float32 (folded
    BatchNorm). Inputs may be NCHW or NHWC (``channels_last``, the fast path)
    or any strided view. With ``out`` (a :class:`~effops.ChannelView` or a
    tensor of the output's shape) the result is written into it in place,
    e.g. into a channel range of a larger concat buffer; that form is
    inference-only. ``out`` may live in the same buffer as ``x`` (disjoint channel
    ranges, as OSA stage convs use it, steps included) but must not overlap the
    elements the op reads (``x``, ``residual``, ``weight``, ``scale``, ``bias``):
    ValueError names the argument that does. An empty batch returns an empty result.

    ``gate`` (float32 or ``x``'s dtype, ``[N, C_in]``) is applied as the kernel loads ``x``:
    the gated input is never written (an inverted residual's SE gate inside the project
    conv). Gradients reach it too. ``out_shuffle_groups`` stores output channel ``co`` at
    ``(co % (C_out // g)) * g + co // (C_out // g)``: a ShuffleNet channel shuffle of the
    result as it is written (``residual``, ``scale`` and ``bias`` are in the conv's own
    channel order, before the shuffle).
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    check_inputs(x, weight, scale, bias, residual, stride, padding, dilation, groups, act, gate, out_shuffle_groups)
    if out is None:
        if gate is None and out_shuffle_groups == 1:
            return _OP(x, weight, scale, bias, residual, stride, padding, dilation, groups, act,
                       float(act_param), bool(residual_after_act))
        return _OP(x, weight, scale, bias, residual, stride, padding, dilation, groups, act,
                   float(act_param), bool(residual_after_act), gate, out_shuffle_groups)
    dst = checked_out(out, x, weight, scale, bias, residual, stride, padding, dilation, gate)
    _conv_bn_act_out_op(x, weight, scale, bias, residual, stride, padding, dilation, groups, act,
                        float(act_param), bool(residual_after_act), dst, gate, out_shuffle_groups)
    return dst


def conv_bn_act_with_channel_sums(
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    *,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    act: str = "identity",
    act_param: float = 0.0,
    residual_after_act: bool = False,
) -> Tuple[Tensor, Tensor, int]:
    """``(y, psum, num_hb)``: :func:`conv_bn_act`'s result ``y`` and per-(image, pixel block)
    channel sums of it, the input :func:`effops.ops.se.se_gate_from_sums` takes (an SE squeeze
    riding the conv's epilogue: ``y`` is not read again to pool it).

    Equivalent PyTorch::

        y = conv_bn_act(x, weight, scale, bias, residual, ...)
        psum = y.sum((2, 3), dtype=torch.float32)       # [N * num_hb, C_out], num_hb = 1
        # psum.view(N, num_hb, C_out).sum(1) is the per-image channel sum in every case

    On the triton backend the GEMM kernel's epilogue writes ``psum`` (fp32 sums of the stored,
    rounded values; rows tiled per image, ``num_hb`` row tiles per image, each element written
    by one program: deterministic); on the reference backend ``num_hb`` is 1 (float64 sums for
    a float64 ``y``). Inference only: not a registered op (no autograd, not traceable), so
    callers use :func:`conv_bn_act` plus the SE gate's own pool under torch.compile or autograd.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    check_inputs(x, weight, scale, bias, residual, stride, padding, dilation, groups, act)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, scale, bias, residual)):
        raise RuntimeError("conv_bn_act_with_channel_sums is inference-only; use conv_bn_act for gradients")
    args = (x, weight, scale, bias, residual, None, stride, padding, dilation, groups, act, float(act_param),
            bool(residual_after_act))
    backend = dispatch.select("conv_bn_act", *args)
    if backend.name == "triton":
        return _run_triton(*args, channel_sums=True)
    y = backend.run(*args)
    cd = torch.float64 if y.dtype == torch.float64 else torch.float32
    return y, y.sum((2, 3), dtype=cd), 1
