"""The N-segment 1×1 aggregation (``effops.ops.aggregate``): concat -> 1×1 conv with no concat.

Segments as separate NCHW / NHWC tensors and as channel views of one buffer (a step-2
view included), 1 to 8 of them, odd channel counts; scale, bias, every activation,
residual, the eSE gate and its per-image partial sums; output into a channel view;
64-bit addressing; errors; torch.compile; the tile tuner's key. Expected values come from
PyTorch (``torch.cat`` + ``F.conv2d`` in fp64, and in the same dtype for fp16 / bf16).
"""
import pytest
import torch
import torch.nn.functional as F

import effops
from effops import ChannelView, tuning
from effops.activations import ACTIVATIONS, apply_activation
from effops.ops import aggregate, osa, reference

from helpers import DTYPES, KERNEL_DEVICE, assert_matches, device_branch, needs_triton

DEV = KERNEL_DEVICE
CHANS = (3, 5, 2, 7, 1, 4, 6, 3)  # odd channel counts; the first n make an n-segment problem


def _segments(layout, chans, n=2, h=3, w=5, dtype=torch.float32):
    """``layout``: "nchw" / "nhwc" separate tensors, "views" channel views of one NHWC
    buffer (segment 1 a step-2 view, gaps between the others), "mixed" all three kinds."""
    if layout in ("nchw", "nhwc"):
        segs = [torch.randn(n, c, h, w, device=DEV, dtype=dtype) for c in chans]
        return [s.contiguous(memory_format=torch.channels_last) for s in segs] if layout == "nhwc" else segs
    if layout == "views":
        steps = [2 if i == 1 else 1 for i in range(len(chans))]
        total = sum(c * st + 1 for c, st in zip(chans, steps))
        buf = torch.randn(n, total, h, w, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)
        segs, off = [], 0
        for c, st in zip(chans, steps):
            segs.append(ChannelView(buf, off, st, c).as_tensor())
            off += c * st + 1
        return segs
    assert layout == "mixed"
    buf = torch.randn(n, 2 * chans[1] + 3, h, w, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)
    kinds = [torch.randn(n, chans[0], h, w, device=DEV, dtype=dtype), buf[:, 1:1 + 2 * chans[1]:2]]
    kinds += [torch.randn(n, c, h, w, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)
              for c in chans[2:]]
    return kinds[:len(chans)]


def _params(k, c_out, dtype=torch.float32):
    w = torch.randn(c_out, k, 1, 1, device=DEV, dtype=dtype) / k ** 0.5
    return w, torch.rand(c_out, device=DEV) + 0.5, torch.randn(c_out, device=DEV) * 0.5


def _expected(segs, w, scale=None, bias=None, act="identity", act_param=0.0, residual=None, ese=None, dtype=None):
    """PyTorch's ``torch.cat`` + ``F.conv2d`` + epilogue, in fp64 (``dtype=None``) or in ``dtype``."""
    dt = dtype or torch.float64
    y = F.conv2d(torch.cat([s.to(dt) for s in segs], 1), w.to(dt))
    if scale is not None:
        y = y * scale.to(dt).view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.to(dt).view(1, -1, 1, 1)
    y = apply_activation(y, act, act_param)
    if ese is not None:
        y = y * F.hardsigmoid(F.conv2d(y.mean((2, 3), keepdim=True), ese[0].to(dt), ese[1].to(dt)))
    return y if residual is None else y + residual.to(dt)


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "views"])
@pytest.mark.parametrize("n_seg", [1, 2, 3, 5, 8])
def test_segment_counts_and_layouts(n_seg, layout):
    chans = CHANS[:n_seg]
    segs = _segments(layout, chans)
    w, s, b = _params(sum(chans), 6)
    with torch.no_grad(), effops.use_backend("triton"):
        y = aggregate(segs, w, s, b, act="relu")
    assert y.shape == (2, 6, 3, 5) and y.dtype == torch.float32
    # Output layout follows segment 0: NHWC for NHWC tensors and views of an NHWC buffer.
    assert y.is_contiguous(memory_format=torch.channels_last if layout != "nchw" else torch.contiguous_format)
    assert_matches(y, _expected(segs, w, s, b, "relu"), fp32_tol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_with_residual(dtype):
    chans = CHANS[:3]
    segs = _segments("mixed", chans, dtype=dtype)
    w, s, b = _params(sum(chans), 7, dtype)
    r = torch.randn(2, 7, 3, 5, device=DEV, dtype=dtype)
    with torch.no_grad(), effops.use_backend("triton"):
        y = aggregate(segs, w, s, b, act="silu", residual=r)
    assert y.dtype == dtype
    same = _expected(segs, w, s, b, "silu", residual=r, dtype=dtype) if dtype != torch.float32 else None
    assert_matches(y, _expected(segs, w, s, b, "silu", residual=r), same, fp32_tol=1e-5)


@needs_triton
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation(act):
    chans = (4, 3)
    segs = _segments("nhwc", chans)
    w, s, b = _params(7, 5)
    w = w * 3  # values across the activations' interesting ranges
    with torch.no_grad(), effops.use_backend("triton"):
        y = aggregate(segs, w, s, b, act=act, act_param=0.2)
    assert_matches(y, _expected(segs, w, s, b, act, 0.2), fp32_tol=1e-5)


@needs_triton
def test_without_scale_and_bias_with_an_nchw_residual():
    segs = _segments("views", (5, 4))
    w = torch.randn(6, 9, 1, 1, device=DEV)
    r = torch.randn(2, 6, 3, 5, device=DEV)  # NCHW while the segments are NHWC views
    with torch.no_grad(), effops.use_backend("triton"):
        y = aggregate(segs, w, residual=r)
    assert_matches(y, _expected(segs, w, residual=r), fp32_tol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_ese_gate_and_residual(dtype):
    chans = CHANS[:3]
    segs = _segments("mixed", chans, h=9, w=10, dtype=dtype)  # 90 pixels: two row tiles per image
    w, s, b = _params(sum(chans), 6, dtype)
    ese = (torch.randn(6, 6, 1, 1, device=DEV), torch.randn(6, device=DEV))
    r = torch.randn(2, 6, 9, 10, device=DEV, dtype=dtype)
    with torch.no_grad(), effops.use_backend("triton"):
        y = aggregate(segs, w, s, b, act="relu", residual=r, ese_weight=ese[0].to(dtype), ese_bias=ese[1])
    same = None
    if dtype != torch.float32:
        same = _expected(segs, w, s, b, "relu", residual=r, ese=(ese[0].to(dtype), ese[1].to(dtype)), dtype=dtype)
    assert_matches(y, _expected(segs, w, s, b, "relu", residual=r, ese=ese), same, fp32_tol=1e-5)


@needs_triton
@pytest.mark.parametrize("n_seg", [2, 5])
def test_per_image_partial_sums_give_the_mean(n_seg):
    """The eSE mode's per-(row tile, channel) fp32 sums add up, per image, to H*W times the
    mean of the activated output; the output itself is unchanged by that mode."""
    chans = CHANS[:n_seg]
    segs = _segments("views", chans, n=3, h=9, w=10)
    w, s, b = _params(sum(chans), 6)
    out = torch.empty(3, 6, 9, 10, device=DEV).contiguous(memory_format=torch.channels_last)
    psum, num_hb = osa._launch_aggregate(segs, w, s, b, None, out, "relu", 0.0, want_psum=True)
    assert num_hb >= 2 and psum.shape == (3 * num_hb, 6) and psum.dtype == torch.float32
    ref = _expected(segs, w, s, b, "relu")
    mean = psum.view(3, num_hb, 6).sum(1).double().cpu() / 90
    torch.testing.assert_close(mean, ref.mean((2, 3)).cpu(), rtol=1e-5, atol=1e-6)
    assert_matches(out, ref, fp32_tol=1e-5)


@needs_triton
@pytest.mark.parametrize("ese", [False, True])
def test_out_into_a_channel_view_writes_only_the_view(ese):
    segs = _segments("mixed", CHANS[:3])
    w, s, b = _params(sum(CHANS[:3]), 5)
    buf = torch.full((2, 14, 3, 5), float("nan"), device=DEV).contiguous(memory_format=torch.channels_last)
    gate = (torch.randn(5, 5, 1, 1, device=DEV), torch.randn(5, device=DEV)) if ese else (None, None)
    view = ChannelView(buf, 3, 2, 5)  # channels 3, 5, ..., 11
    with torch.no_grad(), effops.use_backend("triton"):
        got = aggregate(segs, w, s, b, act="hardswish", out=view, ese_weight=gate[0], ese_bias=gate[1])
    assert got.data_ptr() == view.as_tensor().data_ptr()
    assert_matches(view.as_tensor(), _expected(segs, w, s, b, "hardswish", ese=gate if ese else None), fp32_tol=1e-5)
    untouched = [c for c in range(14) if c not in range(3, 12, 2)]
    assert torch.isnan(buf[:, untouched]).all()


@needs_triton
def test_segments_and_out_share_one_buffer():
    """A concat buffer read in two channel ranges while a third, disjoint one is written."""
    buf = torch.randn(2, 16, 3, 5, device=DEV).contiguous(memory_format=torch.channels_last)
    segs = [buf[:, 0:4], ChannelView(buf, 4, 2, 3)]  # channels 0-3 and 4, 6, 8
    w, s, b = _params(7, 6)
    before = buf.clone()
    expected = _expected([buf[:, 0:4], buf[:, 4:10:2]], w, s, b, "relu")
    with torch.no_grad(), effops.use_backend("triton"):
        aggregate(segs, w, s, b, act="relu", out=buf[:, 10:16])
    assert_matches(buf[:, 10:16], expected, fp32_tol=1e-5)
    torch.testing.assert_close(buf[:, :10], before[:, :10], rtol=0, atol=0)


@needs_triton
def test_int64_addressing_on_a_huge_view(monkeypatch):
    """One segment, the residual and the output are views whose channel x stride products
    pass 2**31 (tests/test_int64.py's 2**32-element buffer); the others are small tensors."""
    from test_int64 import HugeViews, check, ints, spy

    k = spy(monkeypatch, osa, "_osa_agg_kernel")
    hv = HugeViews(3)
    small = [ints(2, 2, 2, 3), ints(2, 1, 2, 3).contiguous(memory_format=torch.channels_last)]
    huge = hv.filled(0, ints(2, 3, 2, 3))
    res = hv.filled(1, ints(2, 3, 2, 3))
    out = hv.poisoned(2, (2, 3, 2, 3))
    segs = [small[0], huge, small[1]]
    w = ints(3, 6, 1, 1)
    scale, bias = ints(3, dtype=torch.float32), ints(3, dtype=torch.float32)
    with torch.no_grad(), effops.use_backend("triton"):
        aggregate(segs, w, scale, bias, residual=res, out=out)
    assert [(m["NUM_SEG"], m["IDX64"]) for m in k.launches] == [(3, True)]
    check(out, _expected([t.cpu() for t in segs], w.cpu(), scale.cpu(), bias.cpu(), residual=res.cpu()))


def test_float64_runs_on_the_reference_backend():
    """The kernel takes fp16 / bf16 / fp32: float64 segments take the reference backend."""
    segs = [s.double() for s in _segments("mixed", CHANS[:3])]
    w, s, b = _params(sum(CHANS[:3]), 4, torch.float64)
    assert effops.dispatch.select("aggregate", segs, w, s, b, None, None, None, None, "gelu", 0.0).name == "reference"
    with torch.no_grad():
        y = aggregate(segs, w, s, b, act="gelu")
    torch.testing.assert_close(y, _expected(segs, w, s, b, "gelu"), rtol=1e-12, atol=1e-12)


@needs_triton
def test_backends_agree():
    segs = _segments("mixed", CHANS[:4])
    w, s, b = _params(sum(CHANS[:4]), 5)
    with torch.no_grad():
        with effops.use_backend("triton"):
            y = aggregate(segs, w, s, b, act="leaky_relu", act_param=0.1)
        with effops.use_backend("reference"):
            y_ref = aggregate(segs, w, s, b, act="leaky_relu", act_param=0.1)
    assert y_ref.is_contiguous() == y.is_contiguous() and y_ref.stride() == y.stride()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_empty_batch_and_empty_segment():
    segs = [torch.randn(0, 3, 4, 4), torch.randn(0, 2, 4, 4)]
    w, s, b = _params(5, 4)
    with torch.no_grad():
        assert aggregate(segs, w.cpu(), s.cpu(), b.cpu()).shape == (0, 4, 4, 4)
    # A segment with no channels contributes nothing (as in torch.cat).
    segs = _segments("nhwc", (3, 4))
    segs.insert(1, torch.empty(2, 0, 3, 5, device=DEV))
    w, s, b = _params(7, 4)
    with torch.no_grad():
        y = aggregate(segs, w, s, b, act="relu")
    assert_matches(y, _expected(segs, w, s, b, "relu"), fp32_tol=1e-5)


def test_bad_inputs_are_clear_errors():
    segs = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)]
    w = torch.randn(6, 8, 1, 1)
    cases = [
        (dict(segments=[]), ValueError, "at least one input segment"),
        (dict(segments=segs[0]), TypeError, "list or tuple"),
        (dict(segments=[segs[0]] * (osa.MAX_SEGMENTS + 1), weight=torch.randn(6, 3 * 17, 1, 1)), ValueError,
         "at most 16 segments, got 17"),
        (dict(segments=[segs[0], torch.randn(2, 5, 4)]), ValueError, "segment 1 to be a 4-D"),
        (dict(segments=[segs[0], torch.randn(2, 5, 4, 3)]), ValueError, r"same batch size and spatial size"),
        (dict(segments=[segs[0], torch.randn(3, 5, 4, 4)]), ValueError, r"segment 1 has shape \(3, 5, 4, 4\)"),
        (dict(segments=[segs[0], segs[1].half()]), TypeError, "segment 1 is torch.float16"),
        (dict(segments=[segs[0].int(), segs[1]]), TypeError, "floating-point"),
        (dict(weight=torch.randn(6, 9, 1, 1)), ValueError, r"\(C_out, 8, 1, 1\).*3 \+ 5 = 8 channels"),
        (dict(weight=torch.randn(6, 8, 3, 3)), ValueError, "1x1 conv weight"),
        (dict(weight=w.half()), TypeError, "weight is torch.float16"),
        (dict(scale=torch.ones(5)), ValueError, r"scale of shape \(6,\)"),
        (dict(bias=torch.ones(6, 1)), ValueError, r"bias of shape \(6,\)"),
        (dict(residual=torch.randn(2, 6, 4, 3)), ValueError, r"residual of shape \(2, 6, 4, 4\)"),
        (dict(residual=torch.randn(2, 6, 4, 4).half()), TypeError, "residual is torch.float16"),
        (dict(ese_weight=torch.randn(6, 5, 1, 1)), ValueError, "eSE weight of shape"),
        (dict(ese_bias=torch.randn(6)), ValueError, "ese_bias given without ese_weight"),
        (dict(act="tanh"), ValueError, "unknown activation"),
        (dict(out=torch.empty(2, 5, 4, 4)), ValueError, r"out of shape \(2, 6, 4, 4\)"),
        (dict(out=torch.empty(2, 6, 4, 4, dtype=torch.float64)), TypeError, "out is torch.float64"),
        (dict(segments=[torch.randn(2, 0, 4, 4)], weight=torch.randn(6, 0, 1, 1)), ValueError, "no channels"),
    ]
    for kw, err, match in cases:
        args = dict(segments=segs, weight=w)
        args.update(kw)
        with pytest.raises(err, match=match):
            aggregate(args.pop("segments"), args.pop("weight"), **args)
    with pytest.raises(ValueError, match="is on meta but the segments are on cpu"):
        aggregate(segs, w.to("meta"))
    # out sharing memory with what the op reads
    buf = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="out overlaps segment 1"):
        aggregate([buf[:, :3], buf[:, 3:8]], w, out=buf[:, 6:12])
    with pytest.raises(ValueError, match="out overlaps segment 0"):
        aggregate([buf[:, 0:6:2], buf[:, 8:13]], w, out=buf[:, 0:12:2])
    r = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="out overlaps residual"):
        aggregate(segs, w, residual=r, out=r)
    with pytest.raises(RuntimeError, match="inference-only"):
        aggregate(segs, w.requires_grad_())


@needs_triton
def test_torch_compile_fullgraph():
    """The registered ops trace as single nodes (a List[Tensor] argument) with no graph break."""
    torch._dynamo.reset()
    chans = (3, 4, 2)
    w, s, b = _params(sum(chans), 5)

    def f(a, c, d):
        y = aggregate([a, c, d], w, s, b, act="relu")
        return aggregate([y, a], torch.ones(2, 8, 1, 1, device=DEV), act="identity", out=torch.empty_like(y[:, :2]))

    segs = _segments("nhwc", chans)
    with torch.no_grad(), effops.use_backend("triton"):
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(*segs)
        want = f(*segs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    y = _expected(segs, w, s, b, "relu")
    assert_matches(got, _expected([y, segs[0].double()], torch.ones(2, 8, 1, 1, device=DEV)), fp32_tol=1e-5)


@needs_triton
def test_opcheck():
    segs = _segments("views", (3, 2))
    w, s, b = _params(5, 4)
    r = torch.randn(2, 4, 3, 5, device=DEV)
    args = (segs, w, s, b, r, None, None, "relu", 0.0)
    torch.library.opcheck(torch.ops.effops.aggregate.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    out = torch.empty(2, 4, 3, 5, device=DEV)
    torch.library.opcheck(torch.ops.effops.aggregate_out.default, (*args, out),
                          test_utils=("test_schema", "test_faketensor"))


@needs_triton
def test_tuner_key_holds_the_segment_count(monkeypatch):
    """Device path under the interpreter with the tile tuner: one tuned entry per problem, its
    key naming the kernel, the segment count, bucketed pixel counts and every channel count."""
    import triton.testing

    from effops.ops import conv

    device_branch(monkeypatch, autotune=True)
    small = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=3)
    monkeypatch.setattr(conv, "_candidates", lambda ci, co, tma=0: [small, dict(small, BLOCK_M=16)])
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: (fn(), 1.0)[1])
    chans = (3, 5, 2)
    segs = _segments("views", chans, h=6, w=7)
    w, s, b = _params(10, 6)
    with torch.no_grad(), effops.use_backend("triton"):
        y = aggregate(segs, w, s, b, act="relu")
    assert_matches(y, _expected(segs, w, s, b, "relu"), fp32_tol=1e-5)
    keys = [k for _, k in tuning._CACHE]
    assert keys == [("osa_agg", 3, tuning.bucket(84), 0, chans, 6, torch.float32, False, True, False, "relu")]


@pytest.mark.parametrize("cout,hw,n", [(64, (7, 9), 2), (72, (5, 5), 3), (12, (6, 4), 2), (40, (1, 1), 4)],
                         ids=["block", "tail", "narrow", "pixel"])
def test_native_aggregate_pools_the_output(cout, hw, n):
    """The pool argument of the native aggregation: each image's channel means of the result (the eSE
    squeeze), from the register-blocked GEMM's stores (16+ outputs; tails and images that share a
    row chunk) or one pass after it (fewer outputs)."""
    from effops import native
    from effops.ops.conv import native_fast

    if not native_fast(torch.empty(1)):
        pytest.skip("the native backend is not the CPU backend in this run (EFFOPS_CPU_BACKEND=triton)")
    mod = native.module()
    segs = [torch.randn(n, c, *hw).contiguous(memory_format=torch.channels_last) for c in (8, 13, 16)]
    w, scale, bias = torch.randn(cout, 37, 1, 1) * 0.2, torch.rand(cout) + 0.5, torch.randn(cout)
    means = torch.full((n, cout), float("nan"))
    with torch.no_grad():
        y = mod.conv_scale_bias_act_segments(segs, w, scale, bias, None, None, "relu", 0.0, True, means)
    ref = torch.relu(F.conv2d(torch.cat(segs, 1).double(), w.double()) * scale.double()[:, None, None]
                     + bias.double()[:, None, None])
    assert_matches(y, ref)
    assert_matches(means, ref.mean((2, 3)))
    with pytest.raises(ValueError, match="pool must be a contiguous float32"):
        mod.conv_scale_bias_act_segments(segs, w, scale, bias, None, None, "relu", 0.0, True, means[:, :3])
