"""The Triton conv+BN+act kernel against the fp64 reference (interpreter on CPU, CUDA when present)."""
import pytest
import torch
import torch.nn.functional as F

from effops import use_backend
from effops.activations import ACTIVATIONS, apply_activation
from effops.ops import conv_bn_act, reference
from effops.ops.conv import _run_triton, needs_int64

from helpers import DTYPES, KERNEL_DEVICE, assert_matches, device_branch, needs_triton

pytestmark = needs_triton

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (1, 5, 7, 7, 6, 1, 1, 0, 1, 1),
    (3, 5, 7, 7, 6, 3, 1, 1, 1, 1),
    (1, 13, 13, 13, 9, 3, 2, 1, 1, 1),
    (2, 6, 13, 11, 10, 5, 1, 2, 1, 1),
    (1, 6, 13, 13, 7, 5, 2, 2, 1, 1),
    (1, 3, 15, 15, 5, 7, 2, 3, 1, 1),
    (1, 4, 11, 11, 4, 7, 1, 3, 1, 1),
    (2, 8, 9, 9, 8, 3, 1, 2, 2, 1),      # dilation 2
    (1, 8, 9, 9, 12, 3, 1, 1, 1, 4),     # groups 4
    (1, 6, 9, 9, 6, 3, 2, 1, 1, 6),      # depthwise, stride 2
    (1, 5, 1, 1, 7, 1, 1, 0, 1, 1),      # one pixel
    (3, 5, 1, 1, 7, 3, 1, 1, 1, 1),      # one pixel, 3x3 all padding but the centre
    (1, 70, 8, 8, 33, 1, 2, 0, 1, 1),    # K and N larger than one block
    (1, 4, 6, 8, 5, (1, 3), 1, (0, 1), 1, 1),  # non-square kernel
]


def _make(geom, dtype, layout, dev=KERNEL_DEVICE):
    n, cin, h, w, cout, k, s, p, d, g = geom
    k = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, h, w)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(cout, cin // g, *k) / (cin // g * k[0] * k[1]) ** 0.5
    scale = torch.rand(cout) + 0.5
    bias = torch.randn(cout)
    to = lambda t: t.to(dev, dtype)
    kw = dict(stride=s, padding=p, dilation=d, groups=g)
    return to(x), to(wt), scale.to(dev), bias.to(dev), kw


def _torch_same_dtype(x, w, scale, bias, kw, act, residual=None, after=False):
    """What PyTorch itself computes in the input dtype (every step rounded)."""
    y = F.conv2d(x, w, None, **kw)
    y = y * scale.to(x.dtype).view(1, -1, 1, 1) + bias.to(x.dtype).view(1, -1, 1, 1)
    if residual is not None and not after:
        y = y + residual
    y = apply_activation(y, act)
    return y + residual if (residual is not None and after) else y


def _ref64(x, w, scale, bias, kw, act, residual=None, after=False, act_param=0.0):
    p = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    return reference.conv_scale_bias_act(
        x.double(), w.double(), scale.double(), bias.double(), None if residual is None else residual.double(),
        p(kw["stride"]), p(kw["padding"]), p(kw["dilation"]), kw["groups"], act, act_param, after,
    )


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g)).replace(" ", ""))
def test_geometry_fp32(geom, layout):
    x, w, scale, bias, kw = _make(geom, torch.float32, layout)
    with use_backend("triton"):
        out = conv_bn_act(x, w, scale, bias, act="relu", **kw)
    ref = _ref64(x, w, scale, bias, kw, "relu")
    assert out.shape == ref.shape
    # Output memory format follows the input, as nn.Conv2d's does.
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert_matches(out, ref)


@pytest.mark.parametrize("residual", [None, "before", "after"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activations_and_residual(act, residual):
    x, w, scale, bias, kw = _make((2, 6, 5, 7, 10, 3, 1, 1, 1, 1), torch.float32, "nhwc")
    x = x * 2  # reach the saturating / negative regions of every activation
    res = None if residual is None else torch.randn(2, 10, 5, 7, device=x.device).contiguous(memory_format=torch.channels_last)
    after = residual == "after"
    act_param = 0.1 if act == "leaky_relu" else 0.0
    with use_backend("triton"):
        out = conv_bn_act(x, w, scale, bias, res, act=act, act_param=act_param, residual_after_act=after, **kw)
    assert_matches(out, _ref64(x, w, scale, bias, kw, act, res, after, act_param))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "geom, act, residual",
    [
        ((1, 16, 9, 9, 24, 1, 1, 0, 1, 1), "relu", None),
        ((3, 13, 7, 7, 10, 3, 2, 1, 1, 1), "silu", "after"),
        ((1, 12, 8, 8, 12, 3, 1, 2, 2, 3), "hardswish", "before"),
    ],
)
def test_dtypes(dtype, geom, act, residual):
    x, w, scale, bias, kw = _make(geom, dtype, "nhwc")
    ref_shape = _ref64(x, w, scale, bias, kw, act).shape
    res = None if residual is None else torch.randn(ref_shape, device=x.device).to(dtype)
    after = residual == "after"
    with use_backend("triton"):
        out = conv_bn_act(x, w, scale, bias, res, act=act, residual_after_act=after, **kw)
    assert out.dtype == dtype
    assert_matches(out, _ref64(x, w, scale, bias, kw, act, res, after), _torch_same_dtype(x, w, scale, bias, kw, act, res, after))


def test_int64_indexing_path():
    """Force the int64 address path on a small problem: same result as int32."""
    x, w, scale, bias, kw = _make((2, 6, 9, 9, 10, 3, 2, 1, 1, 1), torch.float32, "nhwc")
    out = torch.full((2, 10, 5, 5), float("nan"), device=x.device).contiguous(memory_format=torch.channels_last)
    _run_triton(x, w, scale, bias, None, out, [2, 2], [1, 1], [1, 1], 1, "relu", 0.0, False, force_int64=True)
    assert_matches(out, _ref64(x, w, scale, bias, kw, "relu"))


def test_int64_selected_past_2_31_elements():

    small = torch.empty((2, 4, 8, 8), device="meta")
    assert not needs_int64(small)
    assert needs_int64(torch.empty_strided((3, 1, 1, 1), (2**30, 1, 1, 1), device="meta"))


def test_every_output_element_written():
    """Poison the output; the kernel must overwrite all of it (odd M and N tails)."""
    x, w, scale, bias, kw = _make((3, 7, 11, 13, 19, 3, 1, 1, 1, 1), torch.float32, "nhwc")
    out = torch.full((3, 19, 11, 13), float("nan"), device=x.device).contiguous(memory_format=torch.channels_last)
    _run_triton(x, w, scale, bias, None, out, [1, 1], [1, 1], [1, 1], 1, "identity", 0.0, False)
    assert not torch.isnan(out).any()
    assert_matches(out, _ref64(x, w, scale, bias, kw, "identity"))


def test_empty_batch_returns_empty():
    x, w, scale, bias, kw = _make((1, 4, 5, 5, 6, 3, 1, 1, 1, 1), torch.float32, "nhwc")
    with use_backend("triton"):
        out = conv_bn_act(x[:0], w, scale, bias, act="relu", **kw)
    assert out.shape == (0, 6, 5, 5)


@pytest.mark.parametrize("k, stride", [(1, 1), (3, 2)])
def test_non_contiguous_input(k, stride):
    """A spatially strided slice (every other row, a column window) is read through its strides."""
    base = torch.randn(2, 6, 14, 11, device=KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)
    x = base[:, :, ::2, 1:10]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 6, k, k, device=KERNEL_DEVICE) / (6 * k * k) ** 0.5
    b = torch.randn(5, device=KERNEL_DEVICE)
    with use_backend("triton"):
        out = conv_bn_act(x, w, None, b, stride=stride, padding=k // 2, act="silu")
    ref = reference.conv_scale_bias_act(x.double(), w.double(), None, b.double(), None, (stride,) * 2, (k // 2,) * 2,
                                        (1, 1), 1, "silu")
    assert_matches(out, ref)


# The tile tuner's rules (autotune off, graph capture, caching, buckets, threads): tests/test_tuning.py.


# Depthwise (groups == C_in == C_out) runs its own kernel: (N, C, H, W, kernel, stride, padding, dilation)
DEPTHWISE = [
    (2, 6, 9, 9, 3, 1, 1, 1),
    (1, 13, 11, 7, 3, 2, 1, 1),     # stride 2, odd sizes, C not a multiple of 8
    (1, 70, 8, 8, 5, 1, 2, 1),      # C larger than one channel block
    (2, 8, 13, 13, 7, 2, 3, 1),
    (1, 9, 9, 10, 3, 1, 2, 2),      # dilation 2
    (3, 4, 1, 1, 3, 1, 1, 1),       # one pixel: all taps but the centre are padding
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", DEPTHWISE, ids=lambda g: "x".join(map(str, g)))
def test_depthwise_kernel(geom, dtype):
    n, c, h, w, k, s, p, d = geom
    x, wt, scale, bias, kw = _make((n, c, h, w, c, k, s, p, d, c), dtype, "nhwc")
    with use_backend("triton"):
        out = conv_bn_act(x, wt, scale, bias, act="relu6", **kw)
    ref = _ref64(x, wt, scale, bias, kw, "relu6")
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert_matches(out, ref, _torch_same_dtype(x, wt, scale, bias, kw, "relu6") if dtype != torch.float32 else None)


@pytest.mark.parametrize("residual", ["before", "after"])
def test_depthwise_residual_nchw_and_channel_view_output(residual):
    x, wt, scale, bias, kw = _make((2, 10, 7, 6, 10, 3, 1, 1, 1, 10), torch.float32, "nchw")
    res = torch.randn(2, 10, 7, 6, device=x.device)
    buf = torch.full((2, 24, 7, 6), float("nan"), device=x.device).contiguous(memory_format=torch.channels_last)
    after = residual == "after"
    with use_backend("triton"):
        conv_bn_act(x, wt, scale, bias, res, act="hardswish", residual_after_act=after, out=buf[:, 4:24:2], **kw)
    assert_matches(buf[:, 4:24:2], _ref64(x, wt, scale, bias, kw, "hardswish", res, after))
    untouched = torch.cat([buf[:, :4], buf[:, 5:24:2]], 1)
    assert torch.isnan(untouched).all()  # nothing written outside the view


def test_depthwise_uses_its_own_kernel_and_int64_path(monkeypatch):
    from effops.ops import conv

    calls = []
    real = conv._run_depthwise
    monkeypatch.setattr(conv, "_run_depthwise", lambda *a: calls.append(a[-1]) or real(*a))  # last arg: force_int64
    x, wt, scale, bias, kw = _make((1, 8, 6, 6, 8, 3, 1, 1, 1, 8), torch.float32, "nhwc")
    ref = _ref64(x, wt, scale, bias, kw, "silu")
    for force in (False, True):
        out = conv._new_output(x, wt, [1, 1], [1, 1], [1, 1])
        _run_triton(x, wt, scale, bias, None, out, [1, 1], [1, 1], [1, 1], 8, "silu", 0.0, False, force_int64=force)
        assert_matches(out, ref)
    assert calls == [False, True]
    # A channel multiplier > 1 (C_out = 2 * C_in) still takes the GEMM kernel.
    x2, w2, s2, b2, kw2 = _make((1, 4, 6, 6, 8, 3, 1, 1, 1, 4), torch.float32, "nhwc")
    with use_backend("triton"):
        assert_matches(conv_bn_act(x2, w2, s2, b2, act="relu", **kw2), _ref64(x2, w2, s2, b2, kw2, "relu"))
    assert len(calls) == 2


# The TMA kernel (stride-1 "same" convs; Hopper on GPUs, emulated by the interpreter):
# (N, C_in, H, W, C_out, kernel, padding, dilation)
TMA_CASES = [
    (2, 16, 5, 7, 24, 3, 1, 1),           # shifted rows cross row and image borders
    (1, 24, 6, 5, 8, 3, 1, 1),            # C_in 24, BLOCK_K 16: a K chunk runs into the next tap's weights
    (2, 8, 7, 6, 16, 1, 0, 1),            # 1x1
    (1, 8, 9, 9, 8, 3, 2, 2),             # dilation 2
    (1, 16, 5, 6, 8, (1, 5), (0, 2), 1),  # non-square
]
TMA_TILE = dict(TMA=True, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=3)


def _ohwi(w):
    return w.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: "x".join(map(str, c)).replace(" ", ""))
def test_tma_kernel(case, dtype):
    from effops.ops.conv import tma_eligible

    n, cin, h, w, cout, k, p, d = case
    x, wt, scale, bias, kw = _make((n, cin, h, w, cout, k, 1, p, d, 1), dtype, "nhwc")
    wt = _ohwi(wt)
    res = torch.randn(n, cout, h, w, device=x.device).to(dtype).contiguous(memory_format=torch.channels_last)
    out = torch.full((n, cout, h, w), float("nan"), device=x.device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    assert tma_eligible(x, wt, out, [1, 1], pair(d), 1)
    _run_triton(x, wt, scale, bias, res, out, [1, 1], pair(p), pair(d), 1, "silu", 0.0, True, config=TMA_TILE)
    assert_matches(out, _ref64(x, wt, scale, bias, kw, "silu", res, True),
                   _torch_same_dtype(x, wt, scale, bias, kw, "silu", res, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_tma_kernel_reads_and_writes_channel_views(dtype):
    """Input channels 8..24 of a 32-channel NHWC buffer; output into channels 16..32 of
    another (NaN-poisoned: nothing else may be written)."""
    n, h, w = 2, 5, 6
    src = torch.randn(n, 32, h, w, device=KERNEL_DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x = src[:, 8:24]
    wt = _ohwi(torch.randn(16, 16, 3, 3, device=KERNEL_DEVICE, dtype=dtype) / 12)
    bias = torch.randn(16, device=KERNEL_DEVICE)
    buf = torch.full((n, 40, h, w), float("nan"), device=KERNEL_DEVICE, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    out = buf[:, 16:32]
    _run_triton(x, wt, None, bias, None, out, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, False, config=TMA_TILE)
    kw = dict(stride=1, padding=1, dilation=1, groups=1)
    ones = torch.ones(16, device=KERNEL_DEVICE)
    assert_matches(out, _ref64(x, wt, ones, bias, kw, "relu"), _torch_same_dtype(x, wt, ones, bias, kw, "relu"))
    assert torch.isnan(buf[:, :16]).all() and torch.isnan(buf[:, 32:]).all()


def test_tma_eligibility():
    from effops.ops.conv import tma_eligible

    dev = KERNEL_DEVICE
    if dev == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("this GPU has no TMA (sm_90+)")
    x = torch.randn(1, 16, 6, 6, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = _ohwi(torch.randn(8, 16, 3, 3, device=dev, dtype=torch.float16))
    out = torch.empty(1, 8, 6, 6, device=dev, dtype=torch.float16)
    ok = lambda *a, **k: tma_eligible(*a, **k)  # noqa: E731
    assert ok(x, w, out, [1, 1], [1, 1], 1)
    assert not ok(x, w, out[:, :, 1:-1, 1:-1], [1, 1], [1, 1], 1)                      # output smaller than input
    assert not ok(x, w, out[:, :, ::2, ::2], [2, 2], [1, 1], 1)                        # stride 2
    assert not ok(x, w[:, :8].contiguous(memory_format=torch.channels_last), out, [1, 1], [1, 1], 2)  # groups
    assert not ok(x.contiguous(), w, out, [1, 1], [1, 1], 1)                           # NCHW input
    assert not ok(x, w.contiguous(), out, [1, 1], [1, 1], 1)                           # OIHW weight
    big = torch.randn(1, 24, 6, 6, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert ok(big[:, 8:], w, out, [1, 1], [1, 1], 1)                                   # channel view, 16 B aligned
    assert not ok(big[:, 3:19], w, out, [1, 1], [1, 1], 1)                             # 6-byte offset
    odd = torch.randn(1, 12, 6, 6, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert not ok(odd, _ohwi(torch.randn(8, 12, 3, 3, device=dev, dtype=torch.float16)), out, [1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="TMA kernel"):
        _run_triton(x.contiguous(), w, None, None, None, out, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, False,
                    config=TMA_TILE)
    with pytest.raises(ValueError, match="TMA kernel"):  # int64 addressing (some tensor > 2**31 elements)
        _run_triton(x, w, None, None, None, out, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, False,
                    config=TMA_TILE, force_int64=True)


def test_tuning_can_pick_the_tma_kernel_and_falls_back_when_a_call_cannot_use_it(monkeypatch):
    """The device path's tuner times pointer and TMA tiles; a TMA winner keeps the best pointer
    tile for calls with the same shapes but strides or alignment TMA can't take."""
    import triton.testing

    from effops import tuning
    from effops.ops import conv

    device_branch(monkeypatch, autotune=True)
    pointer = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=3)
    offered = []
    monkeypatch.setattr(conv, "_candidates", lambda ci, co, tma=0: offered.append(tma) or (
        [pointer, TMA_TILE] if tma else [pointer]))
    times = iter([2.0, 1.0])  # pointer, then TMA: the TMA tile wins
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: (fn(), next(times))[1])
    launched = []
    real_tma = conv._launch_tma
    monkeypatch.setattr(conv, "_launch_tma", lambda *a: launched.append("tma") or real_tma(*a))

    kw = dict(stride=1, padding=1, dilation=1, groups=1)
    x, w, scale, bias, _ = _make((2, 16, 5, 7, 8, 3, 1, 1, 1, 1), torch.float32, "nhwc")
    w = _ohwi(w)
    with use_backend("triton"):
        y = conv_bn_act(x, w, scale, bias, act="relu", **kw)
    assert offered == [4] and launched == ["tma", "tma"]  # timed once, then the real launch
    (cfg,) = tuning._CACHE.values()
    assert cfg["TMA"] and cfg["FALLBACK"] == pointer
    assert_matches(y, _ref64(x, w, scale, bias, kw, "relu"))
    # Same shapes, but a 4-byte channel offset: the tuned TMA tile can't run it.
    buf = torch.randn(2, 17, 5, 7).contiguous(memory_format=torch.channels_last)
    x2 = buf[:, 1:]
    with use_backend("triton"):
        y2 = conv_bn_act(x2, w, scale, bias, act="relu", **kw)
    assert launched == ["tma", "tma"] and len(tuning._CACHE) == 1
    assert_matches(y2, _ref64(x2, w, scale, bias, kw, "relu"))
