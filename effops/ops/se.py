"""Squeeze-and-excitation: the gate (squeeze + excitation) and its application.

Layers, bottom up, all in this file:

1. Triton kernels and their launchers:

   * ``_se_pool_kernel``: per-(image, channel) fp32 sums of ``x`` over blocks of pixels, one
     partial-sum row per (image, pixel block) in a small ``[N * num_hb, C]`` buffer (no atomics:
     deterministic);
   * ``_se_excite_kernel``: the fixed-order sum of those partial sums (the mean) and the
     excitation ``gate(W2 · act(W1 · mean + b1) + b2)`` for every sample in one launch (each
     program owns a block of samples and of output channels and computes the hidden layer of
     its samples itself). The tuner may instead run it once per layer (two launches, no hidden
     layer recomputed), whichever it measures faster;
   * ``_se_apply_kernel``: ``act(x * gate[n, c] + residual)`` in one pass, any strides, output
     into a new tensor or a channel view;

2. the backends ``triton`` (float16 / bfloat16 / float32 inputs) and ``reference``
   (:func:`effops.ops.reference.se_gate` / :func:`~effops.ops.reference.se_apply`; float64);
3. the registered ops ``effops::se_gate`` and ``effops::se_apply`` (fake implementations and
   autograd formulas) and ``effops::se_apply_out`` (writes a given tensor; inference only);
4. :func:`se_gate` and :func:`se_apply`, the checked public entry points, and
   :func:`se_gate_from_sums` (inference only, not a registered op): the gate from partial
   sums some other kernel wrote, e.g. the producing conv's epilogue
   (:func:`effops.ops.conv.conv_bn_act_with_channel_sums`), so no pool pass reads ``x``.

Equivalent PyTorch::

    s = x.mean((2, 3))                                       # squeeze: [N, C]
    h = act(s @ reduce_weight.T + reduce_bias)               # skipped for effective SE (reduce_weight None)
    g = gate(h @ expand_weight.T + expand_bias)              # se_gate(...): [N, C], float32
    y = act_out(x * g[:, :, None, None] + residual)          # se_apply(x, g, residual, act=act_out)
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import Tensor

from .. import dispatch, tuning
from ..activations import activation_grad, apply_activation, check_activation
from ..views import ChannelView, first_overlap
from . import conv as _conv
from . import reference
from .conv import _FLOAT_DTYPES, _INT32_MAX, _cdiv, _interpret_block, _max_offset, _next_pow2, needs_int64, triton
from .shuffle import _channel_minor, _shuffle_configs, _shuffle_heuristic

if triton is not None:
    import triton.language as tl
    from .conv import _activation

    @triton.jit
    def _se_pool_kernel(
        x_ptr, psum_ptr,
        HW, W, C, num_hb, hw_per_prog,
        sxn, sxc, sxh, sxw,
        FLAT_HW: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # psum[n * num_hb + hb, c] = sum of x[n, c, p] over the pixels p of block hb
        # ([hb * hw_per_prog, (hb + 1) * hw_per_prog), hw_per_prog a multiple of BLOCK_P), in fp32.
        # The tile accumulates elementwise and is reduced once at the end: one add per element
        # in the loop, and a fixed summation order.
        row = tl.program_id(0)
        pid_c = tl.program_id(1)
        n = row // num_hb
        p0 = (row % num_hb) * hw_per_prog
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_p = tl.arange(0, BLOCK_P)
        c_ok = offs_c < C
        if IDX64:  # every index int64 before its product with a stride (channels included)
            row = row.to(tl.int64)
            n = n.to(tl.int64)
            p0 = p0.to(tl.int64)
            offs_c = offs_c.to(tl.int64)
            offs_p = offs_p.to(tl.int64)
        x_img = x_ptr + n * sxn
        c_off = (offs_c * sxc)[None, :]
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for t in range(0, hw_per_prog, BLOCK_P):
            p = p0 + t + offs_p
            if FLAT_HW:  # sh == W * sw: a pixel is one stride (vectorisable along pixels in NCHW)
                pix = p * sxw
            else:
                pix = (p // W) * sxh + (p % W) * sxw
            v = tl.load(x_img + pix[:, None] + c_off, mask=(p < HW)[:, None] & c_ok[None, :], other=0.0)
            acc += v.to(tl.float32)
        tl.store(psum_ptr + row * C + offs_c, tl.sum(acc, axis=0), mask=c_ok)

    @triton.jit
    def _excite_input(in_ptr, row, offs_k, n_ok, k_ok, K, num_hb, in_scale):
        """``[BLOCK_N, BLOCK_K]`` of the excitation's input: the ``num_hb`` partial-sum rows of
        each sample summed in a fixed order (deterministic), times ``in_scale``."""
        ptrs = in_ptr + row[:, None] + offs_k[None, :]
        mask = n_ok[:, None] & k_ok[None, :]
        v = tl.load(ptrs, mask=mask, other=0.0)
        for hb in range(1, num_hb):
            v += tl.load(ptrs + hb * K, mask=mask, other=0.0)
        return v * in_scale

    @triton.jit
    def _se_excite_kernel(
        in_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
        N, K, R, O, num_hb, in_scale,
        sw1o, sw1i, sw2o, sw2i,
        act1_param, act2_param,
        TWO_LAYERS: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
        ACT1: tl.constexpr, ACT2: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # in: fp32 [N * num_hb, K], num_hb partial-sum rows per sample (a plain [N, K] matrix when
        # num_hb == 1); v = in_scale * (sum of a sample's rows). out: fp32 [N, O]. Biases: dense.
        #   TWO_LAYERS: out = ACT2(ACT1(v @ W1.T + b1) @ W2.T + b2)    W1 [R, K], W2 [O, R]
        #   otherwise:  out = ACT2(v @ W2.T + b2)                      W2 [O, K]
        # Weights of any float dtype and strides ([out, in, 1, 1] conv or [out, in] linear), read
        # in fp32. A program owns BLOCK_N samples x BLOCK_O outputs; with two layers it computes its
        # samples' hidden layer in BLOCK_R chunks, each consumed by the second layer at once (the
        # hidden layer never goes to memory; every output block recomputes it). The products are
        # broadcast-and-sum on CUDA cores: BLOCK_N is 1 at batch 1, where tl.dot's 16-row minimum
        # would waste 15/16 of its work on a mat-vec.
        pid_n = tl.program_id(0)  # sample blocks on axis 0: axes 1 and 2 are limited to 65535 programs on CUDA
        pid_o = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        n_ok = offs_n < N
        o_ok = offs_o < O
        # int64 rows: N * num_hb * K is bounded by the input's size, which may pass 2**31.
        row = offs_n.to(tl.int64) * num_hb * K
        acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
        if TWO_LAYERS:
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_ok = offs_r < R
                h = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = offs_k < K
                    v = _excite_input(in_ptr, row, offs_k, n_ok, k_ok, K, num_hb, in_scale)
                    w = tl.load(w1_ptr + (offs_r * sw1o)[None, :] + (offs_k * sw1i)[:, None],
                                mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
                    h += tl.sum(v[:, :, None] * w[None, :, :], axis=1)
                if HAS_B1:
                    h += tl.load(b1_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
                # Padded hidden units (r >= R) may be nonzero after ACT1 (sigmoid(0) = 0.5): their
                # second-layer weights are masked to zero.
                h = _activation(h, ACT1, act1_param)
                w = tl.load(w2_ptr + (offs_o * sw2o)[None, :] + (offs_r * sw2i)[:, None],
                            mask=r_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(h[:, :, None] * w[None, :, :], axis=1)
        else:
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                v = _excite_input(in_ptr, row, offs_k, n_ok, k_ok, K, num_hb, in_scale)
                w = tl.load(w2_ptr + (offs_o * sw2o)[None, :] + (offs_k * sw2i)[:, None],
                            mask=k_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(v[:, :, None] * w[None, :, :], axis=1)
        if HAS_B2:
            acc += tl.load(b2_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        y = _activation(acc, ACT2, act2_param)
        tl.store(out_ptr + (offs_n.to(tl.int64) * O)[:, None] + offs_o[None, :], y, mask=n_ok[:, None] & o_ok[None, :])

    @triton.jit
    def _se_apply_kernel(
        x_ptr, gate_ptr, res_ptr, out_ptr,
        HW, W, C, num_pb,
        sxn, sxc, sxh, sxw,
        sgn, sgc,
        srn, src, srh, srw,
        son, soc, soh, sow,
        act_param,
        HAS_RES: tl.constexpr, ACT: tl.constexpr, FLAT_HW: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # out[n, c, p] = ACT(x[n, c, p] * gate[n, c] (+ res[n, c, p])), in fp32, rounded once, over a
        # [BLOCK_P pixels, BLOCK_C channels] tile of one image (pixel blocks of all images on grid
        # axis 0: axes 1 and 2 are limited to 65535 programs on CUDA).
        pid = tl.program_id(0)
        pid_c = tl.program_id(1)
        n = pid // num_pb
        offs_p = (pid % num_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        p_ok = offs_p < HW
        c_ok = offs_c < C
        if IDX64:  # every index int64 before its product with a stride (channels included)
            n = n.to(tl.int64)
            offs_p = offs_p.to(tl.int64)
            offs_c = offs_c.to(tl.int64)
        if FLAT_HW:  # every tensor has sh == W * sw: a pixel is one stride
            x_pix = offs_p * sxw
            r_pix = offs_p * srw
            o_pix = offs_p * sow
        else:
            oh = offs_p // W
            ow = offs_p % W
            x_pix = oh * sxh + ow * sxw
            r_pix = oh * srh + ow * srw
            o_pix = oh * soh + ow * sow
        mask = p_ok[:, None] & c_ok[None, :]
        y = tl.load(x_ptr + n * sxn + x_pix[:, None] + (offs_c * sxc)[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + n * sgn + offs_c * sgc, mask=c_ok, other=0.0).to(tl.float32)
        y = y * g[None, :]
        if HAS_RES:
            r = tl.load(res_ptr + n * srn + r_pix[:, None] + (offs_c * src)[None, :], mask=mask, other=0.0)
            y = y + r.to(tl.float32)
        y = _activation(y, ACT, act_param)
        tl.store(out_ptr + n * son + o_pix[:, None] + (offs_c * soc)[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=mask)


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pool_configs(channel_minor: bool) -> List[dict]:
    """Tiles of ``_se_pool_kernel`` (pixels x channels, channel-wide for NHWC, pixel-long for
    NCHW) and ``TILES``: pixel tiles per program (fewer partial sums against more programs)."""
    tiles = ([(32, 64, 4), (64, 64, 4), (16, 128, 4), (64, 128, 8)] if channel_minor
             else [(128, 16, 4), (256, 16, 4), (64, 32, 4), (256, 32, 8)])
    return [dict(BLOCK_P=bp, BLOCK_C=bc, TILES=t, num_warps=w, num_stages=1)
            for bp, bc, w in tiles for t in (1, 4, 16)]


def _pool_tiles(N: int, C: int, HW: int, block_p: int, block_c: int) -> int:
    """Pixel tiles per program so that the grid has about 512 programs (enough to fill a GPU's
    SMs several times over) while each image keeps as few partial sums as that allows."""
    tiles = _cdiv(HW, block_p)
    per_image = max(1, min(tiles, _cdiv(512, max(1, N * _cdiv(C, block_c)))))
    return _cdiv(tiles, per_image)


def _pool_heuristic(N: int, C: int, HW: int, channel_minor: bool) -> dict:
    bp, bc = (32, 64) if channel_minor else (128, 16)
    return dict(BLOCK_P=bp, BLOCK_C=bc, TILES=_pool_tiles(N, C, HW, bp, bc), num_warps=4, num_stages=1)


def _launch_pool(x: Tensor):
    """``(psum, num_hb)``: ``psum[n * num_hb + hb]`` holds the fp32 channel sums of image ``n``
    over its ``hb``-th block of pixels (``x``: any strides, ``N * H * W > 0``)."""
    N, C, H, W = x.shape
    HW = H * W
    flat = x.stride(2) == W * x.stride(3)
    cm = _channel_minor(x)
    meta = dict(FLAT_HW=flat, IDX64=needs_int64(x))
    psum = None

    def launch(cfg) -> int:
        nonlocal psum
        hw_per_prog = cfg["BLOCK_P"] * cfg["TILES"]
        num_hb = _cdiv(HW, hw_per_prog)
        if psum is None or psum.shape[0] != N * num_hb:
            psum = torch.empty((N * num_hb, C), dtype=torch.float32, device=x.device)
        _se_pool_kernel[(N * num_hb, _cdiv(C, cfg["BLOCK_C"]))](
            x, psum, HW, W, C, num_hb, hw_per_prog, *x.stride(), **meta, BLOCK_P=cfg["BLOCK_P"],
            BLOCK_C=cfg["BLOCK_C"], num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1))
        return num_hb

    def candidates():
        p_cap, c_cap = max(16, _next_pow2(HW)), max(16, _next_pow2(C))
        every = _pool_configs(cm)
        kept = [c for c in every if c["BLOCK_P"] <= p_cap and c["BLOCK_C"] <= c_cap
                and (c["TILES"] == 1 or c["TILES"] * c["BLOCK_P"] < HW)] or every[:1]
        return kept

    num_hb = _conv.launch_tuned(
        x, launch, lambda: dict(BLOCK_P=_interpret_block(HW, 16, 64), BLOCK_C=_interpret_block(C, 16, 64), TILES=1),
        ("se_pool", tuning.bucket(N * HW), tuning.bucket(HW), C, x.dtype, cm, flat),
        lambda: _pool_heuristic(N, C, HW, cm), candidates)
    return psum, num_hb


def _excite_configs() -> List[dict]:
    """Tiles of ``_se_excite_kernel`` (samples x outputs, hidden chunk, input chunk), their
    broadcast products at most 8192 elements; ``SPLIT``: one launch per layer."""
    tiles = [(1, 128, 32, 128, 4), (1, 64, 32, 128, 4), (1, 32, 64, 64, 4), (1, 256, 16, 128, 4),
             (2, 64, 32, 64, 4), (4, 64, 32, 32, 4), (8, 32, 32, 32, 4), (8, 64, 16, 32, 4), (16, 32, 16, 32, 4)]
    every = [dict(BLOCK_N=bn, BLOCK_O=bo, BLOCK_R=br, BLOCK_K=bk, num_warps=w, num_stages=1)
             for bn, bo, br, bk, w in tiles]
    return every + [dict(c, SPLIT=True) for c in every]


def _excite_heuristic(N: int, C: int, R: int) -> dict:
    bn = min(8, _next_pow2(N))
    br = 32
    wide = max(16, min(128, 8192 // (bn * br)))
    cfg = dict(BLOCK_N=bn, BLOCK_O=wide, BLOCK_R=br, BLOCK_K=wide, num_warps=4, num_stages=1)
    # Every output block recomputes the hidden layer of its samples: with R * C weights read
    # once per output block, split into two launches once that re-reading outweighs a launch.
    if R and _cdiv(C, wide) > 1 and _cdiv(C, wide) * R * C > (1 << 20):
        cfg["SPLIT"] = True
    return cfg


def _launch_layer(inp, num_hb, in_scale, w, b, act, act_param, out, cfg) -> None:
    """One layer: ``out = act(v @ w.T + b)``, ``v`` the (partial-sum) rows of ``inp``."""
    N, O = out.shape
    K = w.shape[1]
    _se_excite_kernel[(_cdiv(N, cfg["BLOCK_N"]), _cdiv(O, cfg["BLOCK_O"]))](
        inp, w, w, w, b if b is not None else w, out, N, K, 0, O, num_hb, in_scale, 0, 0, w.stride(0), w.stride(1),
        0.0, float(act_param), TWO_LAYERS=False, HAS_B1=False, HAS_B2=b is not None, ACT1="identity", ACT2=act,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_O=cfg["BLOCK_O"], BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1))


def _launch_excite(x, psum, num_hb, rw, rb, ew, eb, act, act_param, gate, gate_param,
                   config: Optional[dict] = None) -> Tensor:
    """The gate ``[N, C]`` (fp32) from the pool's partial sums: one launch, or one per layer
    (``SPLIT``), as the tuner (or ``config``) chooses."""
    N, C, H, W = x.shape
    R = rw.shape[0] if rw is not None else 0
    inv_hw = 1.0 / (H * W)
    g = torch.empty((N, C), dtype=torch.float32, device=x.device)

    def launch(cfg) -> Tensor:
        if rw is None:
            _launch_layer(psum, num_hb, inv_hw, ew, eb, gate, gate_param, g, cfg)
        elif cfg.get("SPLIT"):
            h = torch.empty((N, R), dtype=torch.float32, device=x.device)
            _launch_layer(psum, num_hb, inv_hw, rw, rb, act, act_param, h, cfg)
            _launch_layer(h, 1, 1.0, ew, eb, gate, gate_param, g, cfg)
        else:
            _se_excite_kernel[(_cdiv(N, cfg["BLOCK_N"]), _cdiv(C, cfg["BLOCK_O"]))](
                psum, rw, rb if rb is not None else rw, ew, eb if eb is not None else ew, g,
                N, C, R, C, num_hb, inv_hw, rw.stride(0), rw.stride(1), ew.stride(0), ew.stride(1),
                float(act_param), float(gate_param), TWO_LAYERS=True, HAS_B1=rb is not None, HAS_B2=eb is not None,
                ACT1=act, ACT2=gate, BLOCK_N=cfg["BLOCK_N"], BLOCK_O=cfg["BLOCK_O"], BLOCK_R=cfg["BLOCK_R"],
                BLOCK_K=cfg["BLOCK_K"], num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1))
        return g

    if config is not None:
        with _conv._NULL_CTX if _conv._interpreting(x) else _conv._on_device(x.device):
            return launch(config)

    def candidates():
        every = _excite_configs()
        n_cap = _next_pow2(N)
        kept = [c for c in every if c["BLOCK_N"] <= n_cap and c["BLOCK_O"] <= max(32, _next_pow2(C))
                and (R or not c.get("SPLIT"))]
        return kept or every[:1]

    return _conv.launch_tuned(
        x, launch, lambda: dict(BLOCK_N=_interpret_block(N, 1, 4), BLOCK_O=_interpret_block(C, 16, 64),
                                BLOCK_R=_interpret_block(R, 16, 32), BLOCK_K=_interpret_block(C, 16, 64)),
        ("se_excite", tuning.bucket(N), C, R, num_hb, rb is not None, eb is not None, act, gate, ew.dtype),
        lambda: _excite_heuristic(N, C, R), candidates)


def _launch_apply(x: Tensor, gate: Tensor, residual: Optional[Tensor], out: Tensor, act: str, act_param) -> None:
    N, C, H, W = x.shape
    HW = H * W
    flat = all(t.stride(2) == W * t.stride(3) for t in (x, residual, out) if t is not None)
    meta = dict(HAS_RES=residual is not None, ACT=act, FLAT_HW=flat, IDX64=needs_int64(x, gate, residual, out))
    rs = residual.stride() if residual is not None else (0, 0, 0, 0)
    cm = _channel_minor(out)

    def launch(cfg):
        num_pb = _cdiv(HW, cfg["BLOCK_P"])
        _se_apply_kernel[(N * num_pb, _cdiv(C, cfg["BLOCK_C"]))](
            x, gate, residual if residual is not None else out, out, HW, W, C, num_pb,
            *x.stride(), *gate.stride(), *rs, *out.stride(), float(act_param), **meta,
            BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg.get("num_warps", 4),
            num_stages=cfg.get("num_stages", 1))

    def candidates():
        # The channel shuffle's [pixels x channels] streaming tiles: the same access pattern.
        c_cap, p_cap = max(16, _next_pow2(C)), max(64, _next_pow2(HW))
        every = _shuffle_configs(cm)
        return [c for c in every if c["BLOCK_C"] <= c_cap and c["BLOCK_P"] <= p_cap] or every[-1:]

    _conv.launch_tuned(
        x, launch, lambda: dict(BLOCK_P=_interpret_block(HW, 16, 64), BLOCK_C=_interpret_block(C, 16, 64)),
        ("se_apply", tuning.bucket(N * HW), tuning.bucket(HW), C, x.dtype, cm, _channel_minor(x), flat,
         residual is not None, act),
        lambda: _shuffle_heuristic(C, HW, cm), candidates)


# ----------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------
def _new_gate(x: Tensor, C: int) -> Tensor:
    return torch.empty((x.shape[0], C), dtype=_compute_dtype(x.dtype), device=x.device)


def _run_gate_triton(x, rw, rb, ew, eb, act, act_param, gate, gate_param, config: Optional[dict] = None) -> Tensor:
    """``config`` bypasses the excitation's tuning (tests: force the fused or the ``SPLIT`` form)."""
    N, C = x.shape[0], x.shape[1]
    if N == 0 or C == 0:
        return _new_gate(x, C)
    # The kernel reads biases as dense vectors (weights go by their strides).
    rb = rb if rb is None or rb.is_contiguous() else rb.contiguous()
    eb = eb if eb is None or eb.is_contiguous() else eb.contiguous()
    psum, num_hb = _launch_pool(x)
    return _launch_excite(x, psum, num_hb, rw, rb, ew, eb, act, act_param, gate, gate_param, config)


def _run_gate_reference(x, rw, rb, ew, eb, act, act_param, gate, gate_param) -> Tensor:
    return reference.se_gate(x, rw, rb, ew, eb, act, act_param, gate, gate_param).contiguous()


def _gate_triton_reasons(x, rw, rb, ew, eb, *rest) -> List[str]:
    why = _conv._triton_reasons(x, None, None, None, None, None)
    if max(_max_offset(rw), _max_offset(ew)) > _INT32_MAX:
        why.append("an excitation weight larger than 2**31 elements")
    return why


def _native_gate_reasons(x, *rest) -> List[str]:
    return _conv.native_reasons(x)


def _run_gate_native(x, rw, rb, ew, eb, act, act_param, gate, gate_param) -> Tensor:
    # csrc/se.cpp: an NHWC-vectorised fp32 pool, then both excitation layers, in one call.
    return _conv._native.module().se_gate(x, rw, rb, ew, eb, act, float(act_param), gate, float(gate_param))


dispatch.register("se_gate", "native", _native_gate_reasons)(_run_gate_native)
dispatch.register("se_gate", "triton", _gate_triton_reasons)(_run_gate_triton)
dispatch.register("se_gate", "reference")(_run_gate_reference)


def se_gate_from_sums(x: Tensor, psum: Tensor, num_hb: int, reduce_weight: Optional[Tensor],
                      reduce_bias: Optional[Tensor], expand_weight: Tensor, expand_bias: Optional[Tensor], *,
                      act: str = "relu", act_param: float = 0.0, gate: str = "sigmoid",
                      gate_param: float = 0.0) -> Tensor:
    """:func:`se_gate` of ``x`` with the squeeze already done: ``psum`` ``[N * num_hb, C]`` holds
    per-(image, pixel block) channel sums of ``x`` (row ``n * num_hb + hb``), e.g. written by the
    producing conv's epilogue (:func:`effops.ops.conv.conv_bn_act_with_channel_sums`); ``x`` is
    not read. Inference only (not a registered op).

    Equivalent PyTorch::

        s = psum.view(N, num_hb, C).sum(1) / (H * W)                         # the mean
        h = act(F.linear(s, reduce_weight.flatten(1), reduce_bias))          # skipped if reduce_weight is None
        return gate(F.linear(h, expand_weight.flatten(1), expand_bias))      # [N, C]

    The triton backend sums each sample's rows in a fixed order inside the excitation kernel
    (one launch, or one per layer), so the result is deterministic.
    """
    check_se_gate_inputs(x, reduce_weight, reduce_bias, expand_weight, expand_bias, act, gate)
    N, C, H, W = x.shape
    if not isinstance(psum, Tensor) or tuple(psum.shape) != (N * num_hb, C) or psum.device != x.device \
            or psum.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"expected psum: a float32 tensor of shape ({N * num_hb}, {C}) (N * num_hb, C) on "
                         f"{x.device}, got {_describe(psum)}")
    args = (x, reduce_weight, reduce_bias, expand_weight, expand_bias, act, float(act_param), gate, float(gate_param))
    if N == 0 or C == 0:
        return _new_gate(x, C)
    if dispatch.select("se_gate", *args).name == "triton" and psum.dtype == torch.float32 and psum.is_contiguous():
        rb = reduce_bias if reduce_bias is None or reduce_bias.is_contiguous() else reduce_bias.contiguous()
        eb = expand_bias if expand_bias is None or expand_bias.is_contiguous() else expand_bias.contiguous()
        return _launch_excite(x, psum, num_hb, reduce_weight, rb, expand_weight, eb, act, float(act_param), gate,
                              float(gate_param))
    cd = _compute_dtype(x.dtype)
    h = psum.to(cd).view(N, num_hb, C).sum(1) / (H * W)
    if reduce_weight is not None:
        h = torch.nn.functional.linear(h, reduce_weight.to(cd).flatten(1),
                                       None if reduce_bias is None else reduce_bias.to(cd))
        h = apply_activation(h, act, act_param)
    g = torch.nn.functional.linear(h, expand_weight.to(cd).flatten(1),
                                   None if expand_bias is None else expand_bias.to(cd))
    return apply_activation(g, gate, gate_param)


def _new_output(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_conv.output_format(x))


def _run_apply_triton(x, gate, residual, out, act, act_param) -> Tensor:
    if out is None:
        out = _new_output(x)
    if out.numel():
        _launch_apply(x, gate, residual, out, act, act_param)
    return out


def _run_apply_reference(x, gate, residual, out, act, act_param) -> Tensor:
    if x.dtype in (torch.float32, torch.float64) and act in _conv._INPLACE_ACT:
        # reference.se_apply's math in place after the multiply (no temporaries: the CPU path)
        y = torch.mul(x, gate.to(x.dtype)[:, :, None, None])
        y = reference.add_residual_around(y, _conv._INPLACE_ACT[act], residual, False, inplace=True)
    else:
        y = reference.se_apply(x, gate, residual, act, act_param)
    if out is None:
        return y.contiguous(memory_format=_conv.output_format(x))
    out.copy_(y)
    return out


def _apply_triton_reasons(x, gate, *rest) -> List[str]:
    return _conv._triton_reasons(x, None, None, None, None, None)


def _run_apply_native(x, gate, residual, out, act, act_param) -> Tensor:
    # csrc/se.cpp: act(x * gate + residual) in one pass, into out's strides when given.
    return _conv._native.module().se_apply(x, gate, residual, out, act, float(act_param))


dispatch.register("se_apply", "native", _native_gate_reasons)(_run_apply_native)
dispatch.register("se_apply", "triton", _apply_triton_reasons)(_run_apply_triton)
dispatch.register("se_apply", "reference")(_run_apply_reference)


# ----------------------------------------------------------------------------
# Registered ops
# ----------------------------------------------------------------------------
@torch.library.custom_op("effops::se_gate", mutates_args=())
def _se_gate_op(x: Tensor, reduce_weight: Optional[Tensor], reduce_bias: Optional[Tensor], expand_weight: Tensor,
                expand_bias: Optional[Tensor], act: str, act_param: float, gate: str, gate_param: float) -> Tensor:
    return dispatch.run("se_gate", x, reduce_weight, reduce_bias, expand_weight, expand_bias, act, act_param, gate,
                        gate_param)


@_se_gate_op.register_fake
def _(x, reduce_weight, reduce_bias, expand_weight, expand_bias, act, act_param, gate, gate_param):
    return _new_gate(x, expand_weight.shape[0])


def _gate_setup_context(ctx, inputs, output):
    x, rw, rb, ew, eb, act, act_param, gate, gate_param = inputs
    ctx.save_for_backward(x, rw, rb, ew, eb)
    ctx.acts = (act, act_param, gate, gate_param)


def _gate_backward(ctx, grad):
    # Recompute the small [N, C] / [N, R] intermediates in fp32 (fp64) and apply the chain rule:
    # no fused backward. d mean / dx is 1 / (H * W) at every pixel.
    x, rw, rb, ew, eb = ctx.saved_tensors
    act, act_param, gate, gate_param = ctx.acts
    cd = _compute_dtype(x.dtype)
    need = ctx.needs_input_grad
    m = x.mean((2, 3), dtype=cd)
    ew2 = ew.to(cd).flatten(1)
    h = m
    if rw is not None:
        rw2 = rw.to(cd).flatten(1)
        z1 = torch.nn.functional.linear(m, rw2, None if rb is None else rb.to(cd))
        h = apply_activation(z1, act, act_param)
    z2 = torch.nn.functional.linear(h, ew2, None if eb is None else eb.to(cd))
    gz2 = activation_grad(z2, grad.to(cd), gate, gate_param)
    gx = grw = grb = gew = geb = None
    if need[3]:
        gew = (gz2.t() @ h).reshape(ew.shape).to(ew.dtype)
    if eb is not None and need[4]:
        geb = gz2.sum(0).to(eb.dtype)
    gm = gz2 @ ew2
    if rw is not None:
        gz1 = activation_grad(z1, gm, act, act_param)
        if need[1]:
            grw = (gz1.t() @ m).reshape(rw.shape).to(rw.dtype)
        if rb is not None and need[2]:
            grb = gz1.sum(0).to(rb.dtype)
        gm = gz1 @ rw2
    if need[0]:
        gx = torch.empty_like(x).copy_((gm / (x.shape[2] * x.shape[3]))[:, :, None, None].expand(x.shape))
    return gx, grw, grb, gew, geb, None, None, None, None


_se_gate_op.register_autograd(_gate_backward, setup_context=_gate_setup_context)


@torch.library.custom_op("effops::se_apply", mutates_args=())
def _se_apply_op(x: Tensor, gate: Tensor, residual: Optional[Tensor], act: str, act_param: float) -> Tensor:
    return dispatch.run("se_apply", x, gate, residual, None, act, act_param)


@_se_apply_op.register_fake
def _(x, gate, residual, act, act_param):
    return _new_output(x)


def _apply_setup_context(ctx, inputs, output):
    x, gate, residual, act, act_param = inputs
    ctx.save_for_backward(x, gate, residual)
    ctx.acts = (act, act_param)


def _apply_backward(ctx, grad):
    x, gate, residual = ctx.saved_tensors
    act, act_param = ctx.acts
    cd = _compute_dtype(x.dtype)
    xc, g4 = x.to(cd), gate.to(cd)[:, :, None, None]
    gpre = grad.to(cd)
    if act != "identity":
        pre = xc * g4
        if residual is not None:
            pre = pre + residual.to(cd)
        gpre = activation_grad(pre, gpre, act, act_param)
    need = ctx.needs_input_grad
    gx = (gpre * g4).to(x.dtype) if need[0] else None
    gg = (gpre * xc).sum((2, 3)).to(gate.dtype) if need[1] else None
    gr = gpre.to(residual.dtype) if residual is not None and need[2] else None
    return gx, gg, gr, None, None


_se_apply_op.register_autograd(_apply_backward, setup_context=_apply_setup_context)


@torch.library.custom_op("effops::se_apply_out", mutates_args=("out",))
def _se_apply_out_op(x: Tensor, gate: Tensor, residual: Optional[Tensor], act: str, act_param: float,
                     out: Tensor) -> None:
    dispatch.run("se_apply", x, gate, residual, out, act, act_param)


@_se_apply_out_op.register_fake
def _(x, gate, residual, act, act_param, out):
    return None


# The OpOverloads themselves: calling them skips CustomOpDef.__call__'s Python layer.
GATE_OP = torch.ops.effops.se_gate.default
APPLY_OP = torch.ops.effops.se_apply.default


# Compile-only forms for CPU inference on the native backend, like ``effops::conv_bn_act_native``:
# C++ CPU and autograd kernels are registered in csrc/module.cpp, so a compiled graph calls into
# C++ with no Python layer (the generic ops above run a Python autograd kernel and effops'
# dispatcher on every call: about 10-18 us each). No backward: the modules use the ops above
# whenever a gradient is needed.
@torch.library.custom_op("effops::se_gate_native", mutates_args=())
def _se_gate_native_op(x: Tensor, reduce_weight: Optional[Tensor], reduce_bias: Optional[Tensor],
                       expand_weight: Tensor, expand_bias: Optional[Tensor], act: str, act_param: float, gate: str,
                       gate_param: float) -> Tensor:
    """``effops::se_gate`` on the native backend, inference only (its C++ kernel is the one that runs)."""
    return _run_gate_native(x, reduce_weight, reduce_bias, expand_weight, expand_bias, act, act_param, gate,
                            gate_param)


@_se_gate_native_op.register_fake
def _(x, reduce_weight, reduce_bias, expand_weight, expand_bias, act, act_param, gate, gate_param):
    return _new_gate(x, expand_weight.shape[0])


@torch.library.custom_op("effops::se_apply_native", mutates_args=())
def _se_apply_native_op(x: Tensor, gate: Tensor, residual: Optional[Tensor], act: str, act_param: float) -> Tensor:
    """``effops::se_apply`` on the native backend, inference only (its C++ kernel is the one that runs)."""
    return _run_apply_native(x, gate, residual, _new_output(x), act, act_param)


@_se_apply_native_op.register_fake
def _(x, gate, residual, act, act_param):
    return _new_output(x)


GATE_NATIVE_OP = torch.ops.effops.se_gate_native.default
APPLY_NATIVE_OP = torch.ops.effops.se_apply_native.default
APPLY_OUT_OP = torch.ops.effops.se_apply_out.default


# ----------------------------------------------------------------------------
# Public entry points with input checks
# ----------------------------------------------------------------------------
def _describe(t) -> str:
    return f"a {t.dim()}-D tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _check_x(x, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W) for {what}, got {_describe(x)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"expected a floating-point input (float16, bfloat16, float32 or float64) for {what}, "
                        f"got {x.dtype}")


def _check_fc(name: str, w, b, out_ch: int, in_ch: int, x: Tensor) -> None:
    if not isinstance(w, Tensor) or not (w.dim() == 2 or (w.dim() == 4 and tuple(w.shape[2:]) == (1, 1))) \
            or tuple(w.shape[:2]) != (out_ch, in_ch):
        raise ValueError(f"expected {name} of shape ({out_ch}, {in_ch}, 1, 1) or ({out_ch}, {in_ch}), "
                         f"got {_describe(w)}")
    for what, t in ((name, w), (name.replace("weight", "bias"), b)):
        if t is None:
            continue
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"expected a floating-point {what}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{what} is on {t.device} but the input is on {x.device}; expected the same device")
    if b is not None and tuple(b.shape) != (out_ch,):
        raise ValueError(f"expected {name.replace('weight', 'bias')} of shape ({out_ch},), got {tuple(b.shape)}")


def check_se_gate_inputs(x, reduce_weight, reduce_bias, expand_weight, expand_bias, act, gate) -> None:
    """Validate :func:`se_gate`'s arguments; errors name what was expected."""
    _check_x(x, "se_gate")
    N, C, H, W = x.shape
    if H * W == 0:
        raise ValueError(f"se_gate averages over H x W, which is empty in an input of shape {tuple(x.shape)}")
    check_activation(act)
    check_activation(gate)
    if reduce_weight is None:
        if reduce_bias is not None:
            raise ValueError("reduce_bias given without reduce_weight")
        _check_fc("expand_weight", expand_weight, expand_bias, C, C, x)
        return
    if not isinstance(reduce_weight, Tensor) or reduce_weight.dim() not in (2, 4):
        raise ValueError(f"expected reduce_weight of shape (R, {C}, 1, 1) or (R, {C}), got {_describe(reduce_weight)}")
    R = reduce_weight.shape[0]
    if reduce_weight.shape[1] != C:
        raise ValueError(f"expected input with {reduce_weight.shape[1]} channels (reduce_weight "
                         f"{tuple(reduce_weight.shape)}), got {C} channels (input shape {tuple(x.shape)})")
    _check_fc("reduce_weight", reduce_weight, reduce_bias, R, C, x)
    _check_fc("expand_weight", expand_weight, expand_bias, C, R, x)


def se_gate(
    x: Union[Tensor, ChannelView],
    reduce_weight: Optional[Tensor],
    reduce_bias: Optional[Tensor],
    expand_weight: Tensor,
    expand_bias: Optional[Tensor],
    *,
    act: str = "relu",
    act_param: float = 0.0,
    gate: str = "sigmoid",
    gate_param: float = 0.0,
) -> Tensor:
    """The squeeze-and-excitation gate of ``x`` (``[N, C, H, W]`` or a :class:`~effops.ChannelView`):
    a ``[N, C]`` tensor, float32 (float64 for a float64 ``x``).

    Equivalent PyTorch::

        s = x.mean((2, 3))                                                   # squeeze
        h = act(F.linear(s, reduce_weight.flatten(1), reduce_bias))          # skipped if reduce_weight is None
        return gate(F.linear(h, expand_weight.flatten(1), expand_bias))      # [N, C]

    ``reduce_weight`` ``[R, C(, 1, 1)]`` / ``expand_weight`` ``[C, R(, 1, 1)]``, as 1×1 convs or
    linear layers, any float dtype, read in fp32; biases optional. ``reduce_weight=None`` is
    effective SE (one ``C → C`` layer, ``expand_weight`` ``[C, C]``). ``act`` / ``gate``: any name
    of :data:`effops.activations.ACTIVATIONS` (``act_param`` / ``gate_param``: LeakyReLU's slope).
    The mean is accumulated in fp32 from per-pixel-block partial sums added in a fixed order, so
    the result is deterministic. On the triton backend: two launches (pool; excitation of every
    sample), or three when the tuner finds one launch per layer faster. Differentiable (an
    explicit backward in fp32); an empty batch gives an empty ``[0, C]`` gate.
    """
    if isinstance(x, ChannelView):
        x = x.as_tensor()
    check_se_gate_inputs(x, reduce_weight, reduce_bias, expand_weight, expand_bias, act, gate)
    return GATE_OP(x, reduce_weight, reduce_bias, expand_weight, expand_bias, act, float(act_param), gate,
                   float(gate_param))


def check_se_apply_inputs(x, gate, residual, act) -> None:
    """Validate :func:`se_apply`'s arguments (``x`` and ``residual`` already tensors)."""
    _check_x(x, "se_apply")
    N, C = x.shape[0], x.shape[1]
    if not isinstance(gate, Tensor) or tuple(gate.shape) != (N, C):
        raise ValueError(f"expected gate of shape (N, C) = ({N}, {C}), got {_describe(gate)}")
    if gate.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"expected a floating-point gate, got {gate.dtype}")
    if gate.device != x.device:
        raise ValueError(f"gate is on {gate.device} but the input is on {x.device}; expected the same device")
    if residual is not None:
        if not isinstance(residual, Tensor) or tuple(residual.shape) != tuple(x.shape):
            raise ValueError(f"expected residual of shape {tuple(x.shape)} (the input's), got {_describe(residual)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual is {residual.dtype} but the input is {x.dtype}; expected the same dtype")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but the input is on {x.device}; expected the same "
                             "device")
    check_activation(act)


def se_apply(
    x: Union[Tensor, ChannelView],
    gate: Tensor,
    residual: Union[Tensor, ChannelView, None] = None,
    *,
    act: str = "identity",
    act_param: float = 0.0,
    out: Union[ChannelView, Tensor, None] = None,
) -> Tensor:
    """``act(x * gate[:, :, None, None] + residual)`` in one pass: a squeeze-excitation gate applied,
    with the SE bottleneck's shortcut add and activation (SE-ResNet, ResNet-RS, RegNetY).

    Equivalent PyTorch::

        y = x * gate[:, :, None, None]
        if residual is not None:
            y = y + residual
        return act(y)

    Computed in fp32 (fp64 for float64 ``x``) and rounded once to ``x``'s dtype. ``x`` and
    ``residual`` (same shape and dtype): any strides, NCHW, NHWC or channel views; ``gate``:
    ``[N, C]``, any float dtype (float32 from :func:`se_gate`). The result is NHWC when ``x`` is
    NHWC (or a channel view of an NHWC buffer), else NCHW. With ``out`` (a tensor of ``x``'s
    shape and dtype, or a ChannelView) the result is written into it in place (inference only;
    ``out`` must not share memory with an input). Differentiable without ``out``.
    """
    if isinstance(x, ChannelView):
        x = x.as_tensor()
    if isinstance(residual, ChannelView):
        residual = residual.as_tensor()
    check_se_apply_inputs(x, gate, residual, act)
    if out is None:
        return APPLY_OP(x, gate, residual, act, float(act_param))
    dst = out.as_tensor() if isinstance(out, ChannelView) else out
    if not isinstance(dst, Tensor) or tuple(dst.shape) != tuple(x.shape):
        raise ValueError(f"expected out of shape {tuple(x.shape)} (the input's), got {_describe(dst)}")
    if dst.dtype != x.dtype or dst.device != x.device:
        raise TypeError(f"out is {dst.dtype} on {dst.device}; expected {x.dtype} on {x.device}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, gate, residual)):
        raise RuntimeError("se_apply(out=...) is inference-only; call it without out= to get gradients")
    if not torch.compiler.is_compiling():  # traced (fake) tensors have no addresses to compare
        name = first_overlap(dst, (("x", x), ("gate", gate), ("residual", residual)))
        if name is not None:
            raise ValueError(f"out overlaps {name}: se_apply(out=...) writes out while reading {name}, so they must "
                             "not share memory; disjoint channel ranges of one buffer are fine")
    APPLY_OUT_OP(x, gate, residual, act, float(act_param), dst)
    return dst
