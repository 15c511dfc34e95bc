"""One-Shot Aggregation (VoVNet's OSA block) without a materialised concat.

Layers, bottom up, all in this file:

1. Triton kernels: ``_osa_agg_kernel`` (the N-segment 1×1 aggregation conv: K walks
   up to ``MAX_SEGMENTS`` separate inputs, passed as tuple arguments),
   ``_ese_gate_kernel`` (eSE's pool → fc → hard-sigmoid), ``_gate_residual_kernel``
   (``y * gate (+ identity)``, in place) and ``_dw_pw_kernel`` (a depthwise-separable
   stage: the depthwise conv computed inside the 1×1's K loop), with their launchers;
   plain stage convs use the conv+BN+act kernel of :mod:`effops.ops.conv`;
2. the two backends of the whole-block op: ``triton`` (stage convs write their
   channel ranges of one NHWC buffer; the aggregation reads ``x`` and that buffer
   as two segments of K) and ``reference`` (plain PyTorch with ``torch.cat``);
3. the registered op ``effops::osa_block`` with a fake implementation, so
   ``torch.compile(fullgraph=True)`` sees the block as one opaque node;
4. :func:`osa_block`, the checked public entry point;
5. the aggregation on its own, for any concat → 1×1 conv (OSA, ELAN, CSP, DLA roots):
   backends, the registered ops ``effops::aggregate`` / ``effops::aggregate_out`` and
   :func:`aggregate`, its checked public entry point.

Equivalent PyTorch (eval mode, BN folded into each conv's weight and bias)::

    feats = [x]
    y = act(conv2d(x, red_w) + red_b)            if red_w is given (depthwise blocks, in != stage)
    for i in range(L):
        if dw_ws: y = conv2d(y, dw_ws[i], padding=k // 2, groups=C)     # depthwise, no BN/act
        y = act(conv2d(y, mid_ws[i], padding=k // 2) + mid_bs[i])
        feats.append(y)
    y = act(conv2d(cat(feats, 1), agg_w) + agg_b)
    if ese_w is not None: y = y * hardsigmoid(conv2d(y.mean((2, 3), keepdim=True), ese_w, ese_b))
    if identity:          y = y + x

The triton backend never builds ``cat(feats)``: the only large intermediate is
the stage buffer ``[N, L * stage_ch, H, W]`` (NHWC) that the stage convs write
into through channel views and the aggregation reads back.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch, tuning
from ..activations import check_activation
from ..views import ChannelView, first_overlap
from . import conv as _conv
from . import reference
from .conv import _FLOAT_DTYPES, _cdiv, _heuristic_meta, _interpret_block, _next_pow2, needs_int64, triton

if triton is not None:
    import triton.language as tl
    from .conv import _activation, _epilogue_store, _mma, _pixel_coords

    @triton.jit
    def _osa_agg_kernel(
        seg_ptrs, seg_chans, seg_sn, seg_sc, seg_sh, seg_sw,
        w_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr, psum_ptr,
        M, HW, W, C_out, num_hb,
        swo, swi,
        srn, src, srh, srw,
        son, soc, soh, sow,
        act_param,
        NUM_SEG: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
        PER_IMAGE: tl.constexpr,
        IDX64: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # A 1×1 conv whose K dimension is NUM_SEG separate inputs ("segments"): segment s
        # is seg_ptrs[s] with seg_chans[s] channels and strides (seg_sn[s], seg_sc[s],
        # seg_sh[s], seg_sw[s]), and reads weight columns [sum of the earlier segments'
        # channels, + seg_chans[s]). Each argument is a tuple with one entry per segment;
        # the segment loop is unrolled at compile time, so every segment gets its own
        # (software-pipelined) K loop with its own strides. Rows = output pixels.
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(C_out, BLOCK_N)
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        if IDX64:
            # Row-tile and channel indices int64 before any product with a stride (channel
            # x channel-stride wraps in int32 like pixel offsets), and pid_m * BLOCK_M /
            # pid_m * C_out (the partial-sum row) too.
            pid_m = pid_m.to(tl.int64)
            offs_n = offs_n.to(tl.int64)
            offs_k = offs_k.to(tl.int64)
        if PER_IMAGE:
            # eSE needs per-image channel sums: tile rows within one image so each
            # program writes one deterministic partial sum (no atomics).
            n0 = pid_m // num_hb
            offs_p = (pid_m % num_hb) * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_p < HW
            n_idx = offs_p * 0 + n0
        else:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            n_idx = offs_m // HW
            offs_p = offs_m % HW
        oh = offs_p // W
        ow = offs_p % W

        n_ok = offs_n < C_out
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b_col = w_ptr + (offs_n * swo)[None, :]
        k_base = 0  # the first weight column of segment s
        for s in tl.static_range(NUM_SEG):
            C_s = seg_chans[s]
            a_row = seg_ptrs[s] + n_idx * seg_sn[s] + oh * seg_sh[s] + ow * seg_sw[s]
            for k0 in range(0, C_s, BLOCK_K):
                ci = k0 + offs_k
                k_ok = ci < C_s
                a = tl.load(a_row[:, None] + (ci * seg_sc[s])[None, :], mask=m_ok[:, None] & k_ok[None, :],
                            other=0.0)
                b = tl.load(b_col + ((k_base + ci) * swi)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = _mma(a, b, acc, UPCAST_DOT, DOT_PRECISION)
            k_base = k_base + C_s

        y = acc
        if HAS_SCALE:  # the BatchNorm's per-channel scale, applied to the fp32 accumulator
            y = y * tl.load(scale_ptr + offs_n, mask=n_ok, other=1.0)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        y = _activation(y, ACT, act_param)
        mask = m_ok[:, None] & n_ok[None, :]
        if PER_IMAGE:
            # Sum of this tile's rows per channel, from the fp32 values (before rounding).
            part = tl.sum(tl.where(mask, y, 0.0), axis=0)
            tl.store(psum_ptr + pid_m * C_out + offs_n, part, mask=n_ok)
        if HAS_RES:  # the identity residual, added after the activation
            r = tl.load(res_ptr + (n_idx * srn + oh * srh + ow * srw)[:, None] + (offs_n * src)[None, :], mask=mask,
                        other=0.0)
            y = y + r.to(tl.float32)
        o_ptrs = out_ptr + (n_idx * son + oh * soh + ow * sow)[:, None] + (offs_n * soc)[None, :]
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _ese_gate_kernel(psum_ptr, w_ptr, b_ptr, gate_ptr, C, num_hb, inv_hw,
                         HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        # gate[n, c] = hardsigmoid(b[c] + sum_k w[c, k] * mean[n, k]), where
        # mean[n, k] = sum of the partial sums of image n's row tiles / (H * W).
        # psum has N * num_hb * C elements and w C * C: row offsets can pass 2**31 (they
        # are <= the output's element count), so rows are addressed by int64 *scalar* base
        # pointers (free: one scalar op per row) plus int32 offsets within a row block.
        n = tl.program_id(0).to(tl.int64)
        c0 = tl.program_id(1) * BLOCK_C
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        w_blk = w_ptr + c0.to(tl.int64) * C  # row c0 of w
        offs_r = tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < C
            mean = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for hb in range(0, num_hb):
                mean += tl.load(psum_ptr + (n * num_hb + hb) * C + offs_k, mask=k_ok, other=0.0)
            w = tl.load(w_blk + offs_r[:, None] * C + offs_k[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.sum(w * (mean * inv_hw)[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_c, mask=c_ok, other=0.0)
        g = tl.minimum(tl.maximum(acc + 3.0, 0.0), 6.0) / 6.0
        tl.store(gate_ptr + n * C + offs_c, g, mask=c_ok)

    @triton.jit
    def _gate_residual_kernel(y_ptr, gate_ptr, res_ptr, HW, W, C,
                              syn, syc, syh, syw, srn, src, srh, srw,
                              HAS_RES: tl.constexpr, IDX64: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # y[n, c, p] = y[n, c, p] * gate[n, c] (+ res[n, c, p]), in place. Pixel blocks
        # on grid axis 0: axes 1 and 2 are limited to 65535 programs on CUDA.
        pid_p = tl.program_id(0)
        n = tl.program_id(1)
        pid_c = tl.program_id(2)
        if IDX64:  # every index int64 before its product with a stride (channels included)
            pid_p = pid_p.to(tl.int64)
            n = n.to(tl.int64)
            pid_c = pid_c.to(tl.int64)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        p_ok = offs_p < HW
        c_ok = offs_c < C
        mask = p_ok[:, None] & c_ok[None, :]
        oh = offs_p // W
        ow = offs_p % W
        y_ptrs = y_ptr + n * syn + (oh * syh + ow * syw)[:, None] + (offs_c * syc)[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + n * C + offs_c, mask=c_ok, other=0.0)
        y = y * g[None, :]
        if HAS_RES:
            r = tl.load(res_ptr + n * srn + (oh * srh + ow * srw)[:, None] + (offs_c * src)[None, :], mask=mask,
                        other=0.0)
            y = y + r.to(tl.float32)
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _dw_pw_kernel(
        x_ptr, dw_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
        H, W, M, C_in, C_out,
        sxn, sxc, sxh, sxw,
        sdc, sdh, sdw,
        swo, swi,
        son, soc, soh, sow,
        act_param,
        DWK: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
        IDX64: tl.constexpr,
        UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Depthwise-separable stage: act(conv1x1(dwconv_kxk(x)) + bias), one kernel.
        # The A tile of the 1x1 GEMM (pixels x channels) is the depthwise conv's
        # output for this K chunk, computed on the fly from DWK*DWK shifted loads of
        # x: the depthwise result is never written to memory.
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(C_out, BLOCK_N)
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        if IDX64:  # pixel rows and channel indices int64 before any product with a stride
            pid_m = pid_m.to(tl.int64)
            offs_n = offs_n.to(tl.int64)
            offs_k = offs_k.to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        n_idx, oh, ow = _pixel_coords(offs_m, H, W)
        x_row = x_ptr + n_idx * sxn
        n_ok = offs_n < C_out
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, C_in, BLOCK_K):
            ci = k0 + offs_k
            k_ok = ci < C_in
            a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for t in tl.static_range(DWK * DWK):
                ih = oh + (t // DWK - DWK // 2)
                iw = ow + (t % DWK - DWK // 2)
                ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                xv = tl.load(x_row[:, None] + (ih * sxh + iw * sxw)[:, None] + (ci * sxc)[None, :],
                             mask=ok[:, None] & k_ok[None, :], other=0.0)
                wv = tl.load(dw_ptr + ci * sdc + (t // DWK) * sdh + (t % DWK) * sdw, mask=k_ok, other=0.0)
                a += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
            # Rounded to the input dtype, as eager PyTorch stores the depthwise output.
            a = a.to(x_ptr.dtype.element_ty)
            b = tl.load(w_ptr + (offs_n * swo)[None, :] + (ci * swi)[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)
            acc = _mma(a, b, acc, UPCAST_DOT, DOT_PRECISION)
        # No residual: its pointer and strides are unused placeholders.
        _epilogue_store(acc, offs_n, n_ok, m_ok, n_idx, oh, ow, scale_ptr, bias_ptr, out_ptr, out_ptr,
                        0, 0, 0, 0, son, soc, soh, sow, act_param, 0, HAS_SCALE, HAS_BIAS, False, False, ACT, 1)


def _dw_pw_configs():
    """Tiles for ``_dw_pw_kernel``. Its A operand is built from DWK*DWK shifted loads
    per K step; multi-buffering all of them (num_stages >= 3) needs 150-700 KB of
    shared memory, more than any GPU has (tests/test_aot_compile.py checks every tile
    here against sm_80 and sm_90 limits). One or two stages: the nine independent loads
    per step already keep memory busy."""
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st) for bm, bn, bk, w, st in [
        (128, 128, 64, 8, 1),
        (256, 128, 32, 8, 1),
        (128, 128, 32, 4, 1),
        (64, 128, 32, 4, 2),
        (128, 64, 32, 4, 1),
        (64, 64, 32, 4, 2),
        (32, 32, 32, 2, 1),
    ]]


def _dw_pw_heuristic(M: int, C_out: int) -> dict:
    bn = 128 if C_out > 64 else (64 if C_out > 32 else 32)
    return dict(BLOCK_M=128 if M >= 4096 else 64, BLOCK_N=bn, BLOCK_K=32, num_warps=4, num_stages=1)


def _launch_dw_pw(x, dw_w, pw_w, pw_s, pw_b, out, act, act_param) -> None:
    """``out = act(conv1x1(depthwise_conv(x, dw_w, padding=k // 2), pw_w) * pw_s + pw_b)`` in one kernel."""
    N, C_in, H, W = x.shape
    C_out = pw_w.shape[0]
    M = N * H * W
    interpreting = _conv._interpreting(x)
    args = (x, dw_w, pw_w, pw_s if pw_s is not None else out, pw_b if pw_b is not None else out, out,
            H, W, M, C_in, C_out,
            *x.stride(), dw_w.stride(0), dw_w.stride(2), dw_w.stride(3), pw_w.stride(0), pw_w.stride(1),
            *out.stride(), float(act_param))
    meta = dict(DWK=dw_w.shape[-1], HAS_SCALE=pw_s is not None, HAS_BIAS=pw_b is not None, ACT=act, IDX64=needs_int64(x, out),
                **_conv._dot_meta(x, interpreting))

    def launch(cfg):
        grid = (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(C_out, cfg["BLOCK_N"]),)
        _dw_pw_kernel[grid](*args, **meta, **cfg)

    def candidates():
        n_cap = max(32, _next_pow2(C_out))
        return [c for c in _dw_pw_configs() if c["BLOCK_N"] <= n_cap] or _dw_pw_configs()[-1:]

    _conv.launch_tuned(x, launch, lambda: dict(BLOCK_M=_interpret_block(M, 16, 64),
                                               BLOCK_N=_interpret_block(C_out, 16, 64),
                                               BLOCK_K=_interpret_block(C_in, 16, 64)),
                       ("dw_pw", tuning.bucket(M), C_in, C_out, meta["DWK"], x.dtype, pw_s is not None, act),
                       lambda: _dw_pw_heuristic(M, C_out), candidates)


MAX_SEGMENTS = 16  # inputs of one aggregation launch (each one unrolled K loop in the kernel)


def _launch_aggregate(segments, weight, scale, bias, residual, out, act, act_param,
                      want_psum: bool) -> Optional[Tuple[Tensor, int]]:
    """``out = act(conv1x1(cat(segments), weight) * scale + bias) (+ residual)`` in one
    launch, without the concat: ``segments`` are ``[N, C_i, H, W]`` tensors or views (any
    strides), read as consecutive ranges of K. With ``want_psum`` also returns per-(row
    tile, channel) fp32 sums of the activated output, ``[N * num_hb, C_out]``, and
    ``num_hb``, for the eSE gate (:func:`_launch_ese`). ``scale`` / ``bias``: fp32, contiguous."""
    chans = tuple([t.shape[1] for t in segments])  # (list comprehensions: cheaper than generators here)
    if 0 in chans:  # a segment without channels reads nothing
        segments = tuple([t for t in segments if t.shape[1]])
        chans = tuple([c for c in chans if c])
    x = segments[0]
    N, _, H, W = x.shape
    C_out = weight.shape[0]
    HW, M = H * W, N * H * W
    interpreting = _conv._interpreting(x)
    psum = None
    seg_args = (tuple(segments), chans, *zip(*[t.stride() for t in segments]))  # per-segment tuples
    meta = dict(
        NUM_SEG=len(segments),
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=act,
        PER_IMAGE=want_psum,
        IDX64=needs_int64(*segments, residual, out), **_conv._dot_meta(x, interpreting),
    )

    def launch(cfg) -> int:
        # Row tiles per image (PER_IMAGE) depend on BLOCK_M, and so does the partial-sum buffer.
        nonlocal psum
        num_hb = _cdiv(HW, cfg["BLOCK_M"])
        if want_psum and (psum is None or psum.shape[0] != N * num_hb):
            psum = torch.empty((N * num_hb, C_out), dtype=torch.float32, device=x.device)
        rows = N * num_hb if want_psum else _cdiv(M, cfg["BLOCK_M"])
        _osa_agg_kernel[(rows * _cdiv(C_out, cfg["BLOCK_N"]),)](
            *seg_args, weight, scale if scale is not None else out, bias if bias is not None else out,
            residual if residual is not None else out, out,
            psum if psum is not None else out,
            M, HW, W, C_out, num_hb,
            weight.stride(0), weight.stride(1),
            *(residual.stride() if residual is not None else (0, 0, 0, 0)), *out.stride(),
            float(act_param), **meta, **cfg)
        return num_hb

    k_seg = min(chans)
    # Pixels bucketed (effops.tuning.bucket). Per-image tiling (want_psum) tiles each image's HW
    # rows separately, so the key holds HW's bucket too: within one, every BLOCK_M >= bucket/4
    # gives each image the same number of row tiles. Flat tiling depends on M only.
    num_hb = _conv.launch_tuned(
        x, launch, lambda: dict(BLOCK_M=_interpret_block(HW if want_psum else M, 16, 64),
                                BLOCK_N=_interpret_block(C_out, 16, 64), BLOCK_K=_interpret_block(k_seg, 16, 64)),
        ("osa_agg", len(chans), tuning.bucket(M), tuning.bucket(HW) if want_psum else 0, chans, C_out, x.dtype,
         want_psum, scale is not None, residual is not None, act),
        lambda: _heuristic_meta(HW if want_psum else M, k_seg, C_out), lambda: _conv._candidates(k_seg, C_out))
    return (psum, num_hb) if want_psum else None


def _launch_ese(out, psum, num_hb, ese_w, ese_b, residual) -> None:
    """``out = out * hardsigmoid(fc(mean_hw(out))) (+ residual)`` in place, from the partial sums."""
    N, C, H, W = out.shape
    gate = torch.empty((N, C), dtype=torch.float32, device=out.device)
    w = ese_w.reshape(C, C)
    w = w if w.dtype == torch.float32 and w.is_contiguous() else w.to(torch.float32).contiguous()
    b = None if ese_b is None else ese_b.to(torch.float32).contiguous()
    interpreting = _conv._interpreting(out)
    bc = _interpret_block(C, 16, 64) if interpreting else 64
    bk = _interpret_block(C, 16, 64) if interpreting else 64
    bp = _interpret_block(H * W, 16, 64) if interpreting else 64
    rs = residual.stride() if residual is not None else (0, 0, 0, 0)
    with _conv._on_device(out.device) if not interpreting else _conv._NULL_CTX:
        _ese_gate_kernel[(N, _cdiv(C, bc))](psum, w, b if b is not None else w, gate, C, num_hb, 1.0 / (H * W),
                                            HAS_BIAS=b is not None, BLOCK_C=bc, BLOCK_K=bk)
        _gate_residual_kernel[(_cdiv(H * W, bp), N, _cdiv(C, bc))](
            out, gate, residual if residual is not None else out, H * W, W, C, *out.stride(), *rs,
            HAS_RES=residual is not None, IDX64=needs_int64(out, residual), BLOCK_P=bp, BLOCK_C=bc)


def _new_block_output(x: Tensor, c_out: int) -> Tensor:
    return torch.empty((x.shape[0], c_out, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
                       memory_format=_conv.output_format(x))


def _same(k: int) -> List[int]:
    return [k // 2, k // 2]


_ONE = [1, 1]
_ZERO = [0, 0]


def _run_triton(x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, agg_s, agg_b, ese_w, ese_b, identity,
                act, act_param):
    N, C_in, H, W = x.shape
    L, sc = len(mid_ws), mid_ws[0].shape[0]
    out = _new_block_output(x, agg_w.shape[0])
    if N == 0:
        return out
    # The single large intermediate: every stage output lives in its channel range of this NHWC buffer.
    stages = torch.empty((N, L * sc, H, W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    y = x
    if red_w is not None:
        y = _conv._run_triton(x, red_w, red_s, red_b, None, None, _ONE, _ZERO, _ONE, 1, act, act_param, False)
    for i in range(L):
        view = stages[:, i * sc:(i + 1) * sc]
        s_i = mid_ss[i] if mid_ss else None
        if dw_ws:  # depthwise-separable stage: the depthwise conv runs inside the 1x1's K loop
            _launch_dw_pw(y, dw_ws[i], mid_ws[i], s_i, mid_bs[i], view, act, act_param)
        else:
            _conv._run_triton(y, mid_ws[i], s_i, mid_bs[i], None, view, _ONE, _same(mid_ws[i].shape[-1]), _ONE, 1,
                              act, act_param, False)
        y = view
    residual = x if identity else None
    if ese_w is None:
        _launch_aggregate((x, stages), agg_w, agg_s, agg_b, residual, out, act, act_param, want_psum=False)
    else:
        psum, num_hb = _launch_aggregate((x, stages), agg_w, agg_s, agg_b, None, out, act, act_param,
                                         want_psum=True)
        _launch_ese(out, psum, num_hb, ese_w, ese_b, residual)
    return out


def _run_reference(x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, agg_s, agg_b, ese_w, ese_b, identity,
                   act, act_param):
    feats = [x]
    y = x
    if red_w is not None:
        y = _conv._run_reference(y, red_w, red_s, red_b, None, None, _ONE, _ZERO, _ONE, 1, act, act_param, False)
    for i, (w, b) in enumerate(zip(mid_ws, mid_bs)):
        if dw_ws:
            y = F.conv2d(y, dw_ws[i], None, 1, _same(dw_ws[i].shape[-1]), 1, y.shape[1])
        y = _conv._run_reference(y, w, mid_ss[i] if mid_ss else None, b, None, None, _ONE, _same(w.shape[-1]), _ONE,
                                 1, act, act_param, False)
        feats.append(y)
    y = reference.osa_aggregate(feats, agg_w, agg_s, agg_b, act, act_param, ese_w, ese_b, x if identity else None)
    return y.contiguous(memory_format=_conv.output_format(x))


def _triton_reasons(x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, *rest) -> List[str]:
    why = _conv._triton_reasons(x, agg_w, None, None, None, None)
    big = [w for w in [red_w, *mid_ws] if w is not None and _conv._max_offset(w) > _conv._INT32_MAX]
    return why + (["a stage weight larger than 2**31 elements"] if big else [])


dispatch.register("osa_block", "triton", _triton_reasons)(_run_triton)
dispatch.register("osa_block", "reference")(_run_reference)


@torch.library.custom_op("effops::osa_block", mutates_args=())
def _osa_block_op(
    x: Tensor, red_w: Optional[Tensor], red_s: Optional[Tensor], red_b: Optional[Tensor], dw_ws: List[Tensor],
    mid_ws: List[Tensor], mid_ss: List[Tensor], mid_bs: List[Tensor], agg_w: Tensor, agg_s: Optional[Tensor],
    agg_b: Optional[Tensor], ese_w: Optional[Tensor], ese_b: Optional[Tensor], identity: bool, act: str,
    act_param: float,
) -> Tensor:
    return dispatch.run("osa_block", x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, agg_s, agg_b, ese_w,
                        ese_b, identity, act, act_param)


@_osa_block_op.register_fake
def _(x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, agg_s, agg_b, ese_w, ese_b, identity, act,
      act_param):
    return _new_block_output(x, agg_w.shape[0])


_OP = torch.ops.effops.osa_block.default


@torch.library.custom_op("effops::osa_block_native", mutates_args=())
def _osa_block_native_op(
    x: Tensor, red_w: Optional[Tensor], red_s: Optional[Tensor], red_b: Optional[Tensor], dw_ws: List[Tensor],
    mid_ws: List[Tensor], mid_ss: List[Tensor], mid_bs: List[Tensor], agg_w: Tensor, agg_s: Optional[Tensor],
    agg_b: Optional[Tensor], ese_w: Optional[Tensor], ese_b: Optional[Tensor], identity: bool, act: str,
    act_param: float,
) -> Tensor:
    """``osa_block`` for torch.compile on CPU (float32 inference, native backend): the whole block in
    one C++ call (``osa_block_native`` in csrc/conv.cpp, whose CPU kernel replaces this body), with
    no Python between its convs. Always NHWC out."""
    y = _conv._native.module().osa_block_native(x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, agg_s,
                                                agg_b, ese_w, ese_b, identity, act, act_param)
    return y.contiguous(memory_format=torch.channels_last)


@_osa_block_native_op.register_fake
def _(x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, agg_s, agg_b, ese_w, ese_b, identity, act,
      act_param):
    return torch.empty((x.shape[0], agg_w.shape[0], x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


OSA_NATIVE_OP = torch.ops.effops.osa_block_native.default


def check_osa_inputs(x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, agg_s, agg_b, ese_w, ese_b, identity,
                     act) -> None:
    """Validate a whole block's arguments; errors name what was expected."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = f"a {x.dim()}-D tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a 4-D input (N, C, H, W) for the OSA block, got {got}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"expected a floating-point input (float16, bfloat16, float32 or float64), got {x.dtype}")
    if len(mid_ws) == 0:
        raise ValueError("an OSA block needs at least one stage conv (layer_per_block >= 1)")
    if len(mid_bs) != len(mid_ws) or (dw_ws and len(dw_ws) != len(mid_ws)) or (mid_ss and len(mid_ss) != len(mid_ws)):
        raise ValueError(f"got {len(mid_ws)} stage weights, {len(mid_ss)} scales, {len(mid_bs)} biases and "
                         f"{len(dw_ws)} depthwise weights")
    check_activation(act)
    c_in = x.shape[1]
    every = [("red_w", red_w), ("red_s", red_s), ("red_b", red_b), ("agg_w", agg_w), ("agg_s", agg_s),
             ("agg_b", agg_b), ("ese_w", ese_w), ("ese_b", ese_b)] + [(f"dw_ws[{i}]", t) for i, t in enumerate(dw_ws)] \
        + [(f"mid_ws[{i}]", t) for i, t in enumerate(mid_ws)] + [(f"mid_ss[{i}]", t) for i, t in enumerate(mid_ss)] \
        + [(f"mid_bs[{i}]", t) for i, t in enumerate(mid_bs)]
    for name, t in every:
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}; expected the same device")
    weights = [("red_w", red_w), ("agg_w", agg_w)] + [(f"dw_ws[{i}]", t) for i, t in enumerate(dw_ws)] \
        + [(f"mid_ws[{i}]", t) for i, t in enumerate(mid_ws)]
    for name, t in weights:
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"input is {x.dtype} but {name} is {t.dtype}; expected the same dtype")
    ch = c_in
    if red_w is not None:
        if tuple(red_w.shape[1:]) != (c_in, 1, 1):
            raise ValueError(f"expected red_w of shape (stage_ch, {c_in}, 1, 1), got {tuple(red_w.shape)}")
        ch = red_w.shape[0]
        _check_vector("red_s", red_s, ch)
        _check_vector("red_b", red_b, ch)
    sc = mid_ws[0].shape[0]
    for i, w in enumerate(mid_ws):
        if dw_ws:
            d = dw_ws[i]
            if d.dim() != 4 or d.shape[0] != ch or d.shape[1] != 1 or d.shape[2] % 2 == 0 or d.shape[2] != d.shape[3]:
                raise ValueError(f"expected dw_ws[{i}] of shape ({ch}, 1, k, k) with odd k, got {tuple(d.shape)}")
        if dw_ws and (w.dim() != 4 or tuple(w.shape[2:]) != (1, 1)):
            raise ValueError(f"expected mid_ws[{i}] of shape ({sc}, {ch}, 1, 1): after a depthwise conv the stage "
                             f"conv is pointwise, got {tuple(w.shape)}")
        if w.dim() != 4 or w.shape[0] != sc or w.shape[1] != ch or w.shape[2] % 2 == 0 or w.shape[2] != w.shape[3]:
            raise ValueError(
                f"expected mid_ws[{i}] of shape ({sc}, {ch}, k, k) with odd k (stage {i} reads {ch} channels), "
                f"got {tuple(w.shape)}")
        _check_vector(f"mid_bs[{i}]", mid_bs[i], sc)
        _check_vector(f"mid_ss[{i}]", mid_ss[i] if mid_ss else None, sc)
        ch = sc
    k_total = c_in + len(mid_ws) * sc
    if agg_w.dim() != 4 or agg_w.shape[1:] != (k_total, 1, 1):
        raise ValueError(
            f"expected the aggregation weight of shape (concat_ch, {k_total}, 1, 1) = in_ch {c_in} + "
            f"{len(mid_ws)} x stage_ch {sc}, got {tuple(agg_w.shape)}")
    c_out = agg_w.shape[0]
    _check_vector("agg_s", agg_s, c_out)
    _check_vector("agg_b", agg_b, c_out)
    if ese_w is not None and tuple(ese_w.shape) not in ((c_out, c_out, 1, 1), (c_out, c_out)):
        raise ValueError(f"expected the eSE weight of shape ({c_out}, {c_out}, 1, 1), got {tuple(ese_w.shape)}")
    _check_vector("the eSE bias", ese_b, c_out)
    if identity and c_out != c_in:
        raise ValueError(f"identity residual needs concat_ch == in_ch, got {c_out} output and {c_in} input channels")


def _check_vector(name: str, t: Optional[Tensor], n: int) -> None:
    if t is not None and tuple(t.shape) != (n,):
        raise ValueError(f"expected {name} of shape ({n},), got {tuple(t.shape)}")


def osa_block(
    x: Tensor,
    mid_ws: List[Tensor],
    mid_bs: List[Optional[Tensor]],
    agg_w: Tensor,
    agg_b: Optional[Tensor] = None,
    *,
    mid_ss: Optional[List[Tensor]] = None,
    agg_s: Optional[Tensor] = None,
    red_w: Optional[Tensor] = None,
    red_s: Optional[Tensor] = None,
    red_b: Optional[Tensor] = None,
    dw_ws: Optional[List[Tensor]] = None,
    ese_w: Optional[Tensor] = None,
    ese_b: Optional[Tensor] = None,
    identity: bool = False,
    act: str = "relu",
    act_param: float = 0.0,
) -> Tensor:
    """The whole OSA block in eval form, each BatchNorm given as a per-channel scale and bias
    (``mid_ss`` / ``agg_s`` / ``red_s``: ``None`` means a scale of 1, e.g. BN already folded
    into the weights).

    Equivalent PyTorch (see the module docstring for the full form)::

        feats, y = [x], x
        for w, s, b in zip(mid_ws, mid_ss, mid_bs):
            y = act(F.conv2d(y, w, padding=w.shape[-1] // 2) * s[:, None, None] + b[:, None, None])
            feats.append(y)
        y = act(F.conv2d(torch.cat(feats, 1), agg_w) * agg_s[:, None, None] + agg_b[:, None, None])
        if ese_w is not None: y = y * F.hardsigmoid(F.conv2d(y.mean((2, 3), keepdim=True), ese_w, ese_b))
        return y + x if identity else y

    Weights are in the input's dtype; scales and biases are best kept in float32. Inference only (no autograd):
    :class:`effops.FusedOSA` runs the unfused PyTorch modules when gradients are needed.
    """
    dw_ws = list(dw_ws or [])
    mid_ws = list(mid_ws)
    sc = mid_ws[0].shape[0] if mid_ws else 0
    mid_bs = [b if b is not None else torch.zeros(sc, dtype=torch.float32, device=x.device) for b in mid_bs]
    mid_ss = list(mid_ss or [])
    check_osa_inputs(x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, agg_s, agg_b, ese_w, ese_b,
                     identity, act)
    return _OP(x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, agg_s, agg_b, ese_w, ese_b,
               bool(identity), act, float(act_param))


# ----------------------------------------------------------------------------
# The N-segment aggregation on its own: concat -> 1x1 conv without the concat
# ----------------------------------------------------------------------------
def _run_aggregate_triton(segments, weight, scale, bias, residual, ese_w, ese_b, out, act, act_param):
    x = segments[0]
    if out is None:
        out = _new_block_output(x, weight.shape[0])
    if out.numel() == 0:
        return out
    if scale is not None and (scale.dtype != torch.float32 or not scale.is_contiguous()):
        scale = scale.to(torch.float32).contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    if ese_w is None:
        _launch_aggregate(segments, weight, scale, bias, residual, out, act, act_param, want_psum=False)
    else:  # the residual comes after the gate: applied by the gate pass
        psum, num_hb = _launch_aggregate(segments, weight, scale, bias, None, out, act, act_param, want_psum=True)
        _launch_ese(out, psum, num_hb, ese_w, ese_b, residual)
    return out


def _run_aggregate_reference(segments, weight, scale, bias, residual, ese_w, ese_b, out, act, act_param):
    y = reference.osa_aggregate(segments, weight, scale, bias, act, act_param, ese_w, ese_b, residual)
    if out is None:
        return y.contiguous(memory_format=_conv.output_format(segments[0]))
    out.copy_(y)
    return out


def _aggregate_triton_reasons(segments, weight, *rest) -> List[str]:
    return _conv._triton_reasons(segments[0], weight, None, None, None, None)


def _aggregate_native_reasons(segments, weight, *rest) -> List[str]:
    return _conv.native_reasons(segments[0], weight)


def _run_aggregate_native(segments, weight, scale, bias, residual, ese_w, ese_b, out, act, act_param):
    # float32: GEMMs over the segments where they lie (csrc/conv.cpp, no concat), the BN folded
    # into the weight, bias + activation (+ the residual, without eSE) in the epilogue; bfloat16:
    # one NHWC concat and oneDNN's 1x1 conv. The eSE gate by the native SE kernels (pool +
    # excitation, then gate * y + residual in one pass).
    nat = _conv._native.module()
    segs = list(segments)
    res, dst = (residual, out) if ese_w is None else (None, None)
    means = None
    if segs[0].dtype == torch.float32:
        if ese_w is not None:  # the eSE squeeze rides the GEMM's stores
            means = torch.empty(segs[0].shape[0], weight.shape[0], dtype=torch.float32)
        y = nat.conv_scale_bias_act_segments(segs, weight, scale, bias, res, dst, act, float(act_param), True, means)
    else:
        y = nat.conv_scale_bias_act(torch.cat(segs, 1), weight, scale, bias, res, dst, _ONE, _ZERO, _ONE, 1, act,
                                    float(act_param), True)
    if ese_w is None:
        return y
    if means is not None:
        gate = nat.se_gate_of_means(means, None, None, ese_w, ese_b, "identity", 0.0, "hardsigmoid", 0.0)
    else:
        gate = nat.se_gate(y, None, None, ese_w, ese_b, "identity", 0.0, "hardsigmoid", 0.0)
    # gated in place when y is this call's own new tensor (a second one is written from cold cache lines)
    return nat.se_apply(y, gate, residual, y if out is None else out, "identity", 0.0)


def _osa_native_reasons(x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, *rest) -> List[str]:
    return _conv.native_reasons(x, agg_w)


def _run_native(x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, agg_s, agg_b, ese_w, ese_b, identity,
                act, act_param):
    # The op form (FusedOSA's CPU inference calls its modules' native paths instead, which
    # cache the folded weights). float32: the whole block in one C++ call (osa_block_native, as a
    # compiled FusedOSA runs it); bfloat16: each conv through csrc/conv.cpp, then the aggregation.
    nat = _conv._native.module()
    if x.dtype == torch.float32:
        return nat.osa_block_native(x, red_w, red_s, red_b, dw_ws, mid_ws, mid_ss, mid_bs, agg_w, agg_s, agg_b, ese_w,
                                    ese_b, identity, act, float(act_param))
    feats = [x]
    y = x
    if red_w is not None:
        y = nat.conv_scale_bias_act(y, red_w, red_s, red_b, None, None, _ONE, _ZERO, _ONE, 1, act, act_param, False)
    for i, (w, b) in enumerate(zip(mid_ws, mid_bs)):
        s = mid_ss[i] if mid_ss else None
        if dw_ws:
            y = nat.conv_scale_bias_act(y, dw_ws[i], None, None, None, None, _ONE, _same(dw_ws[i].shape[-1]), _ONE,
                                        y.shape[1], "identity", 0.0, False)
        y = nat.conv_scale_bias_act(y, w, s, b, None, None, _ONE, _same(w.shape[-1]), _ONE, 1, act, act_param, False)
        feats.append(y)
    return _run_aggregate_native(feats, agg_w, agg_s, agg_b, x if identity else None, ese_w, ese_b, None, act,
                                 act_param)


dispatch.register("osa_block", "native", _osa_native_reasons)(_run_native)
dispatch.register("aggregate", "native", _aggregate_native_reasons)(_run_aggregate_native)
dispatch.register("aggregate", "triton", _aggregate_triton_reasons)(_run_aggregate_triton)
dispatch.register("aggregate", "reference")(_run_aggregate_reference)


@torch.library.custom_op("effops::aggregate", mutates_args=())
def _aggregate_op(
    segments: List[Tensor], weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor],
    residual: Optional[Tensor], ese_w: Optional[Tensor], ese_b: Optional[Tensor], act: str, act_param: float,
) -> Tensor:
    return dispatch.run("aggregate", segments, weight, scale, bias, residual, ese_w, ese_b, None, act, act_param)


@_aggregate_op.register_fake
def _(segments, weight, scale, bias, residual, ese_w, ese_b, act, act_param):
    return _new_block_output(segments[0], weight.shape[0])


@torch.library.custom_op("effops::aggregate_out", mutates_args=("out",))
def _aggregate_out_op(
    segments: List[Tensor], weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor],
    residual: Optional[Tensor], ese_w: Optional[Tensor], ese_b: Optional[Tensor], act: str, act_param: float,
    out: Tensor,
) -> None:
    dispatch.run("aggregate", segments, weight, scale, bias, residual, ese_w, ese_b, out, act, act_param)


@_aggregate_out_op.register_fake
def _(segments, weight, scale, bias, residual, ese_w, ese_b, act, act_param, out):
    return None


_AGG_OP = torch.ops.effops.aggregate.default
_AGG_OUT_OP = torch.ops.effops.aggregate_out.default


def check_aggregate_inputs(segments, weight, scale, bias, residual, ese_w, ese_b, act) -> None:
    """Validate :func:`aggregate`'s arguments (``segments`` already tensors); errors name what was expected."""
    if not segments:
        raise ValueError("aggregate needs at least one input segment")
    if len(segments) > MAX_SEGMENTS:
        raise ValueError(
            f"aggregate takes at most {MAX_SEGMENTS} segments, got {len(segments)}; pass consecutive channel ranges "
            f"of one buffer as one view, or aggregate in two steps")
    x = segments[0]
    for i, t in enumerate(segments):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = f"a {t.dim()}-D tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"expected segment {i} to be a 4-D (N, C, H, W) tensor or ChannelView, got {got}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"expected floating-point segments (float16, bfloat16, float32 or float64), segment {i} is {t.dtype}")
        if t.dtype != x.dtype:
            raise TypeError(f"segment 0 is {x.dtype} but segment {i} is {t.dtype}; expected the same dtype")
        if t.device != x.device:
            raise ValueError(f"segment 0 is on {x.device} but segment {i} is on {t.device}; expected the same device")
        if (t.shape[0], t.shape[2], t.shape[3]) != (x.shape[0], x.shape[2], x.shape[3]):
            raise ValueError(
                f"segment {i} has shape {tuple(t.shape)} but segment 0 has {tuple(x.shape)}; expected the same "
                f"batch size and spatial size (N, H, W) in every segment")
    check_activation(act)
    for name, t in (("weight", weight), ("scale", scale), ("bias", bias), ("residual", residual),
                    ("ese_weight", ese_w), ("ese_bias", ese_b)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the segments are on {x.device}; expected the same device")
    chans = [t.shape[1] for t in segments]
    k = sum(chans)
    if k == 0:
        raise ValueError("the segments have no channels")
    if not isinstance(weight, Tensor) or weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1) \
            or weight.shape[1] != k:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            f"expected a 1x1 conv weight of shape (C_out, {k}, 1, 1): its input channels are the segments' "
            f"{' + '.join(map(str, chans))} = {k} channels in order, got {got}")
    if weight.dtype != x.dtype:
        raise TypeError(f"the segments are {x.dtype} but weight is {weight.dtype}; expected the same dtype")
    c_out = weight.shape[0]
    _check_vector("scale", scale, c_out)
    _check_vector("bias", bias, c_out)
    if residual is not None:
        expected = (x.shape[0], c_out, x.shape[2], x.shape[3])
        if tuple(residual.shape) != expected:
            raise ValueError(f"expected residual of shape {expected}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual is {residual.dtype} but the segments are {x.dtype}; expected the same dtype")
    if ese_w is None and ese_b is not None:
        raise ValueError("ese_bias given without ese_weight")
    if ese_w is not None and tuple(ese_w.shape) not in ((c_out, c_out, 1, 1), (c_out, c_out)):
        raise ValueError(f"expected the eSE weight of shape ({c_out}, {c_out}, 1, 1), got {tuple(ese_w.shape)}")
    _check_vector("ese_bias", ese_b, c_out)


def aggregate(
    segments: Sequence[Union[Tensor, ChannelView]],
    weight: Tensor,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    act: str = "identity",
    act_param: float = 0.0,
    residual: Optional[Tensor] = None,
    ese_weight: Optional[Tensor] = None,
    ese_bias: Optional[Tensor] = None,
    out: Union[ChannelView, Tensor, None] = None,
) -> Tensor:
    """A 1×1 conv over the channel concatenation of ``segments``, without building the
    concatenation: one kernel reads every segment in place as a range of the GEMM's K.

    Equivalent PyTorch::

        y = F.conv2d(torch.cat(segments, 1), weight)
        y = act(y * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
        if ese_weight is not None:                                      # VoVNetV2's eSE gate
            y = y * F.hardsigmoid(F.conv2d(y.mean((2, 3), keepdim=True), ese_weight, ese_bias))
        if residual is not None:
            y = y + residual

    ``segments``: 1 to ``MAX_SEGMENTS`` (16) tensors or :class:`~effops.ChannelView` objects of shape
    ``[N, C_i, H, W]``, same N, H, W, dtype and device, any strides (NCHW, NHWC, channel views
    of one buffer with any step); ``weight`` is ``[C_out, sum(C_i), 1, 1]``, its input channels
    taken in segment order. ``scale`` / ``bias`` are per output channel (a folded BatchNorm;
    best kept in float32). The result is NHWC when segment 0 is NHWC (or a channel view of an
    NHWC buffer), else NCHW. With ``out`` (a tensor of the output's shape or a ChannelView)
    the result is written into it in place, e.g. into a channel range of a larger buffer;
    ``out`` must not share memory with any input (ValueError names which does).
    Concat then 1×1 conv, as in OSA, ELAN, CSP blocks and DLA roots. Inference only
    (RuntimeError when a gradient would be needed).
    """
    if not isinstance(segments, (list, tuple)):
        raise TypeError(
            f"expected segments as a list or tuple of tensors / ChannelViews, got {type(segments).__name__}")
    segs = [t.as_tensor() if isinstance(t, ChannelView) else t for t in segments]
    check_aggregate_inputs(segs, weight, scale, bias, residual, ese_weight, ese_bias, act)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (*segs, weight, scale, bias, residual, ese_weight, ese_bias)):
        raise RuntimeError("aggregate is inference-only (no autograd formula); call it under torch.no_grad() "
                           "or torch.inference_mode()")
    if out is None:
        return _AGG_OP(segs, weight, scale, bias, residual, ese_weight, ese_bias, act, float(act_param))
    dst = out.as_tensor() if isinstance(out, ChannelView) else out
    x = segs[0]
    expected = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    if not isinstance(dst, Tensor) or tuple(dst.shape) != expected:
        got = tuple(dst.shape) if isinstance(dst, Tensor) else type(dst).__name__
        raise ValueError(f"expected out of shape {expected}, got {got}")
    if dst.dtype != x.dtype or dst.device != x.device:
        raise TypeError(f"out is {dst.dtype} on {dst.device}; expected {x.dtype} on {x.device}")
    if not torch.compiler.is_compiling():  # traced (fake) tensors have no addresses to compare
        named = [(f"segment {i}", t) for i, t in enumerate(segs)] + [
            ("residual", residual), ("weight", weight), ("scale", scale), ("bias", bias), ("ese_weight", ese_weight),
            ("ese_bias", ese_bias)]
        name = first_overlap(dst, named)
        if name is not None:
            raise ValueError(
                f"out overlaps {name}: aggregate(out=...) writes out while reading {name}, so they must not share "
                f"memory; disjoint channel ranges of one buffer are fine")
    _AGG_OUT_OP(segs, weight, scale, bias, residual, ese_weight, ese_bias, act, float(act_param), dst)
    return dst
