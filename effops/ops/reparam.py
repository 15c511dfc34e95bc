"""Structural re-parameterisation (RepVGG, MobileOne, GhostNetV3) as one inference op.

Several eval-mode conv → BatchNorm branches over one input, plus an optional identity
BatchNorm, equal one conv with bias. ``effops.nn.repvgg.merge_branches`` (differentiable)
defines the result; this op computes the same weight and bias for inference, from the live
parameters on every call, without the intermediate tensors:

1. the Triton kernel ``_reparam_kernel``: one pass over the merged weight. Each program takes
   ``BLOCK_CO`` output channels x ``BLOCK_K`` of their ``C_in/groups * kh * kw`` elements,
   computes every branch's BN scale and bias for its channels in float64 in registers, loads
   the k x k weights, adds the 1x1 weight at the centre tap and the identity scale on the
   diagonal of each group's centre tap, and stores in the run dtype straight into the layout
   the conv kernels read (OHWI = channels_last for the GPU GEMM kernels, OIHW otherwise);
2. the two backends: ``triton`` (same-size branches + at most one 1x1 + identity, affine BNs,
   no conv bias) and ``reference`` (:func:`_run_reference`: any centred branch set, few
   full-size PyTorch passes; what runs on a CPU);
3. the registered op ``effops::reparam_merge`` with a fake implementation (no autograd: the
   differentiable path is ``merge_branches``);
4. :func:`reparam_merge`, the checked entry point.

Equivalent PyTorch (``s``, ``t``: each branch's BN as scale and bias, in float64)::

    s = bn.weight * (1 / sqrt(bn.running_var + bn.eps)); t = bn.bias - bn.running_mean * s
    W = sum(w_b * s_b[:, None, None, None] for the k x k branches)        # float64
    W[:, :, kh // 2, kw // 2] += w_1x1[:, :, 0, 0] * s_1x1[:, None]       # smaller kernels centred
    W[c, c % (C_in // groups), kh // 2, kw // 2] += s_id[c]               # identity, every c
    b = sum(t_b for every branch, identity included)
    return W.to(dtype, memory_format), b.to(float32 or float64)

Both backends give ``merge_branches``' bits on a CPU (float64 operations in its order, no fused
multiply-add, float64 -> float32 -> dtype as PyTorch casts), the kernel under the interpreter
included; on CUDA the kernel is within 1 ulp of the output dtype of ``merge_branches`` run
there (CUDA's float64 rsqrt is not correctly rounded; the kernel's 1 / sqrt is).
"""
from __future__ import annotations

import struct
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import diagnostics, dispatch, tuning
from . import conv as _conv
from . import reference
from .conv import _cdiv, _interpret_block, _next_pow2, needs_int64, triton

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Elements of the float64 scratch of one chunk of the reference merge on a CPU (4 MiB). Timed on
# repvgg_a2's blocks (2-core EPYC, 1 MiB L2 a core) from 32 K to 8 M elements: smaller chunks pay
# more per-chunk op launches, larger ones page-fault (a fresh multi-MB buffer every call).
_CPU_CHUNK = 1 << 19

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _bn_scale_bias(g_ptr, b_ptr, m_ptr, v_ptr, eps_bits, co, c_ok):
        # BatchNorm as scale and bias in float64: s = g * (1 / sqrt(var + eps)), t = b - mean * s,
        # each step rounded once (sqrt.rn, div.rn): bn_scale_bias_many's steps, whose CPU rsqrt is
        # 1 / an IEEE sqrt (CUDA's float64 rsqrt is within 1 ulp instead). Computed here rather than
        # read from bn_scale_bias_many: that is ~17 small PyTorch ops (launches on a GPU) per block.
        # eps arrives as the int64 bit pattern of the Python float: a float kernel argument is fp32.
        eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
        var = tl.load(v_ptr + co, mask=c_ok, other=1.0).to(tl.float64)
        s = (1.0 / tl.sqrt(var + eps)) * tl.load(g_ptr + co, mask=c_ok, other=0.0).to(tl.float64)
        t = tl.load(b_ptr + co, mask=c_ok, other=0.0).to(tl.float64) - tl.load(m_ptr + co, mask=c_ok, other=0.0).to(
            tl.float64) * s
        return s, t

    @triton.jit
    def _reparam_kernel(
        w_ptrs, w1_ptr, out_ptr, bias_ptr,
        g_ptrs, b_ptrs, m_ptrs, v_ptrs, eps_bits,
        C_out, C_in_g, K,
        sw_o, sw_i, sw_h, sw_w,
        s1_o, s1_i,
        NUM_FULL: tl.constexpr, HAS_1X1: tl.constexpr, HAS_ID: tl.constexpr,
        KH: tl.constexpr, KW: tl.constexpr, OUT_CL: tl.constexpr, BF16_RNE: tl.constexpr,
        IDX64: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # out[co, k] (row co of the merged weight, K = C_in_g * KH * KW elements, dense in both
        # layouts) over a [BLOCK_CO, BLOCK_K] tile. k walks memory order: (kh, kw, ci) for an
        # OHWI (channels_last) output, (ci, kh, kw) for OIHW. The branches' weights (w_ptrs[b]:
        # the NUM_FULL k x k ones, w1_ptr: the 1x1) are read through their own strides.
        # BN tuples hold NUM_FULL + HAS_1X1 + HAS_ID entries in that order.
        pid_c = tl.program_id(0)
        pid_k = tl.program_id(1)
        co = pid_c * BLOCK_CO + tl.arange(0, BLOCK_CO)
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        c_ok = co < C_out
        k_ok = k < K
        if OUT_CL:
            tap = k // C_in_g
            ci = k % C_in_g
        else:
            ci = k // (KH * KW)
            tap = k % (KH * KW)
        kh = tap // KW
        kw = tap % KW
        if IDX64:  # every index int64 before its product with a stride
            co = co.to(tl.int64)
            k = k.to(tl.int64)
            ci = ci.to(tl.int64)
            kh = kh.to(tl.int64)
            kw = kw.to(tl.int64)
        mask = c_ok[:, None] & k_ok[None, :]
        # Same operations in the same order as merge_branches (first branch's product, then
        # each further product added), every one rounded in float64: no fused multiply-add
        # (the launcher turns fp fusion off), so the float64 result is merge_branches' own.
        s, bias = _bn_scale_bias(g_ptrs[0], b_ptrs[0], m_ptrs[0], v_ptrs[0], eps_bits[0], co, c_ok)
        w = tl.load(w_ptrs[0] + co[:, None] * sw_o[0] + (ci * sw_i[0] + kh * sw_h[0] + kw * sw_w[0])[None, :],
                    mask=mask, other=0.0)
        acc = w.to(tl.float64) * s[:, None]
        for b in tl.static_range(1, NUM_FULL):
            s, t = _bn_scale_bias(g_ptrs[b], b_ptrs[b], m_ptrs[b], v_ptrs[b], eps_bits[b], co, c_ok)
            w = tl.load(w_ptrs[b] + co[:, None] * sw_o[b] + (ci * sw_i[b] + kh * sw_h[b] + kw * sw_w[b])[None, :],
                        mask=mask, other=0.0)
            acc = acc + w.to(tl.float64) * s[:, None]
            bias = bias + t
        centre = (kh == KH // 2) & (kw == KW // 2)
        if HAS_1X1:
            s, t = _bn_scale_bias(g_ptrs[NUM_FULL], b_ptrs[NUM_FULL], m_ptrs[NUM_FULL], v_ptrs[NUM_FULL],
                                  eps_bits[NUM_FULL], co, c_ok)
            w = tl.load(w1_ptr + co[:, None] * s1_o + (ci * s1_i)[None, :], mask=mask & centre[None, :], other=0.0)
            # where, not "+ 0": adding zero would turn a -0.0 weight elsewhere into +0.0.
            acc = tl.where(centre[None, :], acc + w.to(tl.float64) * s[:, None], acc)
            bias = bias + t
        if HAS_ID:
            s, t = _bn_scale_bias(g_ptrs[NUM_FULL + HAS_1X1], b_ptrs[NUM_FULL + HAS_1X1], m_ptrs[NUM_FULL + HAS_1X1],
                                  v_ptrs[NUM_FULL + HAS_1X1], eps_bits[NUM_FULL + HAS_1X1], co, c_ok)
            # Output channel co reads input co % C_in_g of its group: the diagonal of the centre taps.
            diag = centre[None, :] & (ci[None, :] == (co % C_in_g)[:, None])
            acc = tl.where(diag, acc + s[:, None], acc)
            bias = bias + t
        if out_ptr.dtype.element_ty == tl.float64:
            val = acc
        else:
            # Through float32, as PyTorch casts float64 to float16 / bfloat16 (c10::Half and
            # c10::BFloat16 convert from float): the same bits as merge_branches' .to(dtype).
            val = acc.to(tl.float32)
            if out_ptr.dtype.element_ty == tl.bfloat16:
                if BF16_RNE:
                    # Round to nearest even by hand: Triton's interpreter truncates float32 ->
                    # bfloat16 casts (a GPU's cvt.rn rounds). NaN stays NaN.
                    u = val.to(tl.uint32, bitcast=True)
                    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16)
                    r = tl.where(val != val, 0x7FC0, r).to(tl.uint16)
                    val = r.to(tl.bfloat16, bitcast=True)
                else:
                    val = val.to(tl.bfloat16)
            else:
                val = val.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + co[:, None] * K + k[None, :], val, mask=mask)
        tl.store(bias_ptr + co, bias.to(bias_ptr.dtype.element_ty), mask=c_ok & (pid_k == 0))


def _eps_bits(eps: float) -> int:
    """The int64 whose bits are the float64 ``eps`` (the kernel bitcasts it back)."""
    return struct.unpack("<q", struct.pack("<d", float(eps)))[0]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _new_outputs(weights: List[Tensor], dtype: torch.dtype, channels_last: bool) -> Tuple[Tensor, Tensor]:
    w0 = weights[0]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return (torch.empty(w0.shape, dtype=dtype, device=w0.device, memory_format=fmt),
            torch.empty(w0.shape[0], dtype=_compute_dtype(dtype), device=w0.device))


def _full_count(weights: List[Tensor]) -> int:
    """How many leading branches have the largest (the first) kernel."""
    kh, kw = weights[0].shape[2], weights[0].shape[3]
    n = 1
    while n < len(weights) and weights[n].shape[2] == kh and weights[n].shape[3] == kw:
        n += 1
    return n


def _merge_heuristic(C_out: int, K: int) -> dict:
    bk = min(512, max(16, _next_pow2(K)))
    return dict(BLOCK_CO=max(1, 4096 // bk), BLOCK_K=bk, num_warps=4, num_stages=1)


def _merge_configs(K: int) -> List[dict]:
    """Tiles (output channels x weight elements) for a memory-bound pass: ~2-8 K elements a program."""
    cap = max(16, _next_pow2(K))
    tiles = [(8, 512, 4), (16, 256, 4), (4, 1024, 4), (32, 128, 4), (16, 512, 8), (64, 64, 4), (4, 256, 2)]
    return [dict(BLOCK_CO=c, BLOCK_K=k, num_warps=w, num_stages=1) for c, k, w in tiles if k <= cap] or \
        [_merge_heuristic(1, K)]


def _run_triton(weights, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, identity, groups, dtype,
                channels_last) -> Tuple[Tensor, Tensor]:
    out, bias = _new_outputs(weights, dtype, channels_last)
    C_out, C_in_g, KH, KW = out.shape
    K = C_in_g * KH * KW
    if out.numel() == 0:  # nothing to launch; the bias may still have channels
        return _run_reference(weights, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, identity,
                              groups, dtype, channels_last)
    nf = _full_count(weights)
    full, w1 = weights[:nf], (weights[nf] if len(weights) > nf else None)
    interpreting = _conv._interpreting(out)
    meta = dict(NUM_FULL=nf, HAS_1X1=w1 is not None, HAS_ID=bool(identity), KH=KH, KW=KW, OUT_CL=channels_last,
                BF16_RNE=interpreting and dtype == torch.bfloat16, IDX64=needs_int64(out, w1, *full))
    args = (tuple(full), w1 if w1 is not None else out, out, bias,
            tuple(bn_weight), tuple(bn_bias), tuple(running_mean), tuple(running_var),
            tuple(_eps_bits(e) for e in eps), C_out, C_in_g, K,
            tuple(w.stride(0) for w in full), tuple(w.stride(1) for w in full),
            tuple(w.stride(2) for w in full), tuple(w.stride(3) for w in full),
            w1.stride(0) if w1 is not None else 0, w1.stride(1) if w1 is not None else 0)

    def launch(cfg):
        grid = (_cdiv(C_out, cfg["BLOCK_CO"]), _cdiv(K, cfg["BLOCK_K"]))
        # enable_fp_fusion=False: a fused multiply-add would round differently from merge_branches.
        _reparam_kernel[grid](*args, **meta, BLOCK_CO=cfg["BLOCK_CO"], BLOCK_K=cfg["BLOCK_K"],
                              num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1),
                              enable_fp_fusion=False)

    _conv.launch_tuned(
        out, launch, lambda: dict(BLOCK_CO=_interpret_block(C_out, 4, 32), BLOCK_K=_interpret_block(K, 16, 256)),
        ("reparam_merge", tuning.bucket(C_out), K, KH, KW, nf, w1 is not None, bool(identity), full[0].dtype, dtype,
         channels_last),
        lambda: _merge_heuristic(C_out, K), lambda: _merge_configs(K))
    return out, bias


def _run_reference(weights, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, identity, groups, dtype,
                   channels_last) -> Tuple[Tensor, Tensor]:
    """``merge_branches`` bit for bit (same BN math, same float64 operations in the same order),
    in as few full-size passes as PyTorch allows: multiply by the scale in float64 (converting
    the input on the way), add the other branches and the identity where they land, and cast
    once into the output dtype *and* layout (one copy). On a CPU a weight of more than
    ``_CPU_CHUNK`` elements is merged one chunk of output channels at a time in a float64
    scratch of that size (convert, multiply, add: cache-resident), each chunk cast into the
    output: no full-size float64 tensor is allocated, since a fresh multi-MB allocation
    page-faults on every call and costs more than the arithmetic. A float64 output is merged in
    place."""
    sb = _bn_scale_bias_fp64(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)
    bias = sb[0][1]  # a new tensor: summed into in place, in merge_branches' order
    for _, t in sb[1:]:
        bias.add_(t)
    bias = bias.view(-1).to(_compute_dtype(dtype))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    C_out, C_in_g, KH, KW = weights[0].shape
    scales = [s for s, _ in sb[:len(weights)]]
    s_id = sb[-1][0].view(-1) if identity else None
    if dtype == torch.float64:
        w_out = torch.empty(weights[0].shape, dtype=dtype, device=weights[0].device, memory_format=fmt)
        return _merge_chunk(weights, scales, s_id, 0, C_in_g, w_out), bias
    rows = C_out
    if weights[0].device.type == "cpu":
        rows = max(1, _CPU_CHUNK // max(1, C_in_g * KH * KW))
        if identity and C_in_g <= rows < C_out:
            rows -= rows % C_in_g  # whole groups: the identity is one diagonal view per chunk
    if rows >= C_out:  # one chunk: merge_branches' own passes (no slicing: µs of host time each)
        return _merge_chunk(weights, scales, s_id, 0, C_in_g, None).to(dtype, memory_format=fmt), bias
    w_out = torch.empty(weights[0].shape, dtype=dtype, device=weights[0].device, memory_format=fmt)
    scratch = torch.empty((rows, C_in_g, KH, KW), dtype=torch.float64, device=w_out.device)
    for r0 in range(0, C_out, rows):
        r1 = min(C_out, r0 + rows)
        acc = _merge_chunk([w[r0:r1] for w in weights], [s[r0:r1] for s in scales], s_id, r0, C_in_g,
                           scratch[:r1 - r0])
        w_out[r0:r1].copy_(acc)
    return w_out, bias


def _bn_scale_bias_fp64(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps) -> List[Tuple[Tensor, Tensor]]:
    """``reference.bn_scale_bias_many(states, torch.float64)`` (what merge_branches computes) as new
    ``[C, 1, 1, 1]`` tensors: the same foreach operations on the same per-BN vectors, so the same
    bits, but with the float32 -> float64 conversions of all BN vectors as one ``cat`` and one cast
    instead of one cast each (12 for a RepVGG block: a third of a small block's merge on a CPU)."""
    n = len(running_var)
    if n < 2 or any(cb is not None for cb in conv_bias) or any(t is None for t in bn_weight) or any(
            t is None for t in bn_bias):
        states = list(zip(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps))
        return [(s.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1)) for s, b in
                reference.bn_scale_bias_many(states, torch.float64)]
    flat = torch.cat([*running_var, *bn_weight, *running_mean, *bn_bias]).to(torch.float64)
    parts = flat.view(-1, 1, 1, 1).split([t.shape[0] for t in running_var] * 4)
    s = torch._foreach_add(list(parts[:n]), [float(e) for e in eps])
    torch._foreach_rsqrt_(s)
    torch._foreach_mul_(s, list(parts[n:2 * n]))
    b = torch._foreach_mul(list(parts[2 * n:3 * n]), s)
    b = torch._foreach_sub(list(parts[3 * n:]), b)
    return list(zip(s, b))


def _merge_chunk(weights: List[Tensor], scales: List[Tensor], s_id: Optional[Tensor], r0: int, C_in_g: int,
                 acc: Optional[Tensor]) -> Tensor:
    """merge_branches' float64 operations for output channels ``r0 ..`` (those of ``weights``), into
    ``acc`` (a float64 tensor of their shape) or a new tensor."""
    w0 = weights[0]
    if w0.dtype == torch.float64:
        acc = torch.mul(w0, scales[0], out=acc) if acc is not None else torch.mul(w0, scales[0])
    else:
        # Type promotion (torch.mul(w0, s) or out=) would first convert w0 into a new float64
        # tensor and multiply in a second pass: convert straight into acc and multiply in place.
        if acc is None:
            acc = torch.empty(w0.shape, dtype=torch.float64, device=w0.device)
        acc.copy_(w0)
        acc.mul_(scales[0])
    KH, KW = acc.shape[2], acc.shape[3]
    for wi, si in zip(weights[1:], scales[1:]):
        kh, kw = wi.shape[2], wi.shape[3]
        if kh == KH and kw == KW:
            acc.add_(torch.mul(wi, si))
        else:
            ph, pw = (KH - kh) // 2, (KW - kw) // 2
            acc[:, :, ph:ph + kh, pw:pw + kw].add_(torch.mul(wi, si))
    if s_id is not None:
        _add_identity(acc[:, :, KH // 2, KW // 2], r0, s_id, C_in_g)
    return acc


def _add_identity(centre: Tensor, r0: int, s_id: Tensor, C_in_g: int) -> None:
    """``centre[j, (r0 + j) % C_in_g] += s_id[r0 + j]`` for the output channels ``r0 ..`` of a chunk
    (``centre``: its ``[n, C_in_g]`` centre taps): one diagonal view per run of channels in one group."""
    n = centre.shape[0]
    if r0 == 0 and n == s_id.shape[0]:
        centre.view(n // C_in_g, C_in_g, C_in_g).diagonal(0, 1, 2).add_(s_id.view(n // C_in_g, C_in_g))
        return
    if r0 % C_in_g == 0 and n % C_in_g == 0:
        centre.view(n // C_in_g, C_in_g, C_in_g).diagonal(0, 1, 2).add_(s_id[r0:r0 + n].view(n // C_in_g, C_in_g))
        return
    j = 0
    while j < n:  # a chunk smaller than a group: at most two runs
        c = (r0 + j) % C_in_g
        m = min(n - j, C_in_g - c)
        centre[j:j + m, c:c + m].diagonal().add_(s_id[r0 + j:r0 + j + m])
        j += m


def _device_reasons(t: Tensor) -> List[str]:
    if triton is None:
        return ["triton is not installed"]
    dev = t.device.type
    if dev == "cpu":
        if not _conv.INTERPRETED:
            return ["CPU tensors run only under Triton's interpreter: set TRITON_INTERPRET=1 before importing effops"]
    elif dev != "cuda":
        return [f"the triton backend runs on cuda tensors (or cpu under TRITON_INTERPRET=1), got {dev}"]
    elif _conv.INTERPRETED:
        return ["TRITON_INTERPRET=1 is set: the interpreter runs cpu tensors only"]
    return []


def _triton_reasons(weights, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, identity, groups, dtype,
                    channels_last) -> List[str]:
    why = _device_reasons(weights[0])
    if why:  # the rest is moot (and this runs on every call of the reference backend)
        return why
    nf = _full_count(weights)
    rest = weights[nf:]
    if len(rest) > 1 or (rest and tuple(rest[0].shape[2:]) != (1, 1)):
        why.append("the kernel merges branches of the largest kernel, at most one 1x1 branch and the identity; "
                   f"got kernels {[tuple(w.shape[2:]) for w in weights]}")
    if any(cb is not None for cb in conv_bias):
        why.append("a branch conv has a bias (the kernel reads BN parameters only)")
    if any(g is None or b is None for g, b in zip(bn_weight, bn_bias)):
        why.append("a BatchNorm without affine weight and bias")
    if any(t is not None and t.stride(0) != 1 for ts in (bn_weight, bn_bias, running_mean, running_var) for t in ts):
        why.append("a BN vector with a stride other than 1")
    return why


dispatch.register("reparam_merge", "triton", _triton_reasons)(_run_triton)
dispatch.register("reparam_merge", "reference")(_run_reference)


def _probe(x: Tensor) -> tuple:
    """``effops.info()``'s probe: a RepVGG block's 3x3 + 1x1 + identity merge for ``x``'s channels."""
    c = x.shape[1]
    w3 = torch.randn(c, c, 3, 3, device=x.device, dtype=x.dtype)
    w1 = torch.randn(c, c, 1, 1, device=x.device, dtype=x.dtype)
    ones, zeros = torch.ones(c, device=x.device), torch.zeros(c, device=x.device)
    return ([w3, w1], [None] * 3, [ones] * 3, [zeros] * 3, [zeros] * 3, [ones] * 3, [1e-5] * 3, True, 1, x.dtype,
            x.is_cuda)


diagnostics.PROBES["reparam_merge"] = _probe


@torch.library.custom_op("effops::reparam_merge", mutates_args=())
def _reparam_merge_op(weights: List[Tensor], conv_bias: List[Optional[Tensor]], bn_weight: List[Optional[Tensor]],
                      bn_bias: List[Optional[Tensor]], running_mean: List[Tensor], running_var: List[Tensor],
                      eps: List[float], identity: bool, groups: int, dtype: torch.dtype,
                      channels_last: bool) -> Tuple[Tensor, Tensor]:
    return dispatch.run("reparam_merge", weights, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps,
                        identity, groups, dtype, channels_last)


@_reparam_merge_op.register_fake
def _(weights, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, identity, groups, dtype, channels_last):
    return _new_outputs(weights, dtype, channels_last)


_OP = torch.ops.effops.reparam_merge.default


def _op_args(branches: Sequence[Tuple[Tensor, tuple]], identity_bn: Optional[tuple], groups: int,
             dtype: torch.dtype, memory_format: torch.memory_format) -> tuple:
    states = [st for _, st in branches] + ([identity_bn] if identity_bn is not None else [])
    return ([w for w, _ in branches], [st[0] for st in states], [st[1] for st in states], [st[2] for st in states],
            [st[3] for st in states], [st[4] for st in states], [float(st[5]) for st in states],
            identity_bn is not None, groups, dtype, memory_format == torch.channels_last)


def merge_unchecked(branches: Sequence[Tuple[Tensor, tuple]], identity_bn: Optional[tuple], groups: int,
                    dtype: torch.dtype, memory_format: torch.memory_format) -> Tuple[Tensor, Tensor]:
    """:func:`reparam_merge` without the argument checks, for callers that validated the structure
    once (``effops.nn.repvgg.MergedBranches``); branches sorted largest kernel first."""
    args = _op_args(branches, identity_bn, groups, dtype, memory_format)
    if torch.compiler.is_compiling():
        return _OP(*args)
    return dispatch.run("reparam_merge", *args)  # eager: the op's implementation without the torch.library layers


def check_merge_inputs(branches, identity_bn, groups, dtype, memory_format) -> None:
    """Validate :func:`reparam_merge`'s arguments; errors name what was expected."""
    if not branches:
        raise ValueError("reparam_merge needs at least one (conv weight, BN state) branch")
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"reparam_merge writes torch.contiguous_format or torch.channels_last, got {memory_format}")
    if dtype not in _FLOATS:
        raise TypeError(f"reparam_merge: dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    w0 = branches[0][0]
    if not isinstance(w0, Tensor) or w0.dim() != 4:
        raise ValueError(f"reparam_merge: branch weights must be 4-D [C_out, C_in/groups, kh, kw], got "
                         f"{tuple(w0.shape) if isinstance(w0, Tensor) else type(w0).__name__}")
    C_out, C_in_g, KH, KW = w0.shape
    for i, (w, st) in enumerate(branches):
        if not isinstance(w, Tensor) or w.dim() != 4 or tuple(w.shape[:2]) != (C_out, C_in_g):
            raise ValueError(f"reparam_merge: branch {i}'s weight must be [{C_out}, {C_in_g}, kh, kw] like the "
                             f"first's, got {tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
        kh, kw = w.shape[2], w.shape[3]
        if kh > KH or kw > KW or (KH - kh) % 2 or (KW - kw) % 2:
            raise ValueError(f"reparam_merge: branch {i}'s {kh}x{kw} kernel can't be centred in the first branch's "
                             f"{KH}x{KW} (the first branch must have the largest kernel)")
    states = [st for _, st in branches] + ([identity_bn] if identity_bn is not None else [])
    for i, st in enumerate(states):
        if not isinstance(st, tuple) or len(st) != 6 or st[3] is None or st[4] is None:
            raise ValueError(f"reparam_merge: BN state {i} must be (conv_bias, weight, bias, running_mean, "
                             "running_var, eps) with running statistics")
        for t in st[:5]:
            if t is not None and (t.dim() != 1 or t.shape[0] != C_out):
                raise ValueError(f"reparam_merge: BN state {i} holds a tensor of shape {tuple(t.shape)}; expected "
                                 f"[{C_out}] (one per output channel)")
    tensors = [w for w, _ in branches] + [t for st in states for t in st[:5] if t is not None]
    for t in tensors:
        if t.device != w0.device:
            raise ValueError(f"reparam_merge: every tensor must be on {w0.device}, got one on {t.device}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"reparam_merge takes floating-point weights and BN state, got {t.dtype}")
    if identity_bn is not None and (groups < 1 or C_out % groups or C_out // groups != C_in_g):
        raise ValueError(f"reparam_merge: an identity branch needs C_in == C_out; the weight is {tuple(w0.shape)} "
                         f"with groups={groups}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError("reparam_merge has no autograd formula: use effops.nn.repvgg.merge_branches when "
                           "gradients are needed, or call it under torch.no_grad()")


def reparam_merge(
    branches: Sequence[Tuple[Tensor, tuple]],
    identity_bn: Optional[tuple] = None,
    groups: int = 1,
    dtype: Optional[torch.dtype] = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tuple[Tensor, Tensor]:
    """The one conv (weight, bias) equal to the sum of eval-mode conv → BN branches over one
    input plus an optional identity BN, for inference: ``effops.nn.repvgg.merge_branches``'
    result (float64 math, weight cast once to ``dtype`` (default: the first branch's) in
    ``memory_format``, bias float32, float64 for a float64 ``dtype``) without its intermediate
    tensors. Arguments as ``merge_branches``: ``branches`` are ``(conv weight, BN state)`` pairs,
    the first with the largest kernel, smaller kernels centred; a BN state is ``(conv_bias,
    weight, bias, running_mean, running_var, eps)``.

    Equivalent PyTorch (see the module docstring for the full merge)::

        effops.nn.repvgg.merge_branches(branches, identity_bn, groups, dtype, memory_format)

    The Triton kernel (CUDA; CPU under ``TRITON_INTERPRET=1``) takes k x k branches of one size,
    at most one 1x1 branch and the identity, with affine BNs and no conv bias; anything else takes
    the reference backend, as CPU tensors do. Not differentiable (RuntimeError when a gradient is
    needed: use ``merge_branches``)."""
    dtype = dtype or (branches[0][0].dtype if branches else None)
    check_merge_inputs(branches, identity_bn, groups, dtype, memory_format)
    return merge_unchecked(branches, identity_bn, groups, dtype, memory_format)
