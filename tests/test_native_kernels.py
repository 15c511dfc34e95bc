"""The native CPU kernels of csrc/ (depthwise conv, squeeze-excitation, channel shuffle) against
the float64 PyTorch references of effops/ops/reference.py, called through the extension's
bindings directly: every layout, activation, residual mode and tail the kernels special-case."""
import math

import pytest
import torch
import torch.nn.functional as F

from effops.activations import ACTIVATIONS, apply_activation
from effops.ops import reference

from helpers import assert_matches

ACT_PARAM = {"leaky_relu": 0.1}


@pytest.fixture(scope="module")
def m():
    from effops import native

    mod = native.module()
    if mod is None:
        pytest.skip(f"native CPU extension unavailable: {native.status(load=False)[1]}")
    return mod


def nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def channel_view(shape, dtype, fill=float("nan"), lo=3, extra=4):
    """A [N, C, H, W] view ``buf[:, lo:lo+C]`` of a wider NHWC buffer (channel stride 1, pixel
    stride C + lo + extra), and the buffer; the buffer starts filled with ``fill``."""
    n, c, h, w = shape
    buf = nhwc(torch.full((n, c + lo + extra, h, w), fill, dtype=dtype)) if dtype.is_floating_point else \
        nhwc(torch.zeros((n, c + lo + extra, h, w), dtype=dtype))
    return buf[:, lo:lo + c], buf


def assert_outside_untouched(buf, lo, c):
    rest = torch.cat([buf[:, :lo], buf[:, lo + c:]], dim=1)
    assert torch.isnan(rest).all(), "the kernel wrote outside its channel view"


def out_size(i, k, s, p, d):
    return (i + 2 * p - d * (k - 1) - 1) // s + 1


# ---- depthwise -------------------------------------------------------------------------------

def dw_case(c, kh, kw, dtype, n=2, h=9, w=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    weight = torch.randn(c, 1, kh, kw, generator=g) / math.sqrt(kh * kw)
    bias = torch.randn(c, generator=g) * 0.5
    taps = weight.reshape(c, kh * kw).t().contiguous()  # [kh*kw, C], tap-major
    return x, weight, taps, bias


def depthwise64(x, weight, stride, padding, dilation):
    """Depthwise conv in float64 as a sum of strided slices: PyTorch's float64 grouped conv runs
    one slow group at a time (seconds at C=300); test_depthwise_oracle ties this to the reference."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c, h, w = x.shape
    kh, kw = weight.shape[2:]
    oh, ow = out_size(h, kh, sh, ph, dh), out_size(w, kw, sw, pw, dw)
    xp = F.pad(x.double(), (pw, pw, ph, ph))
    wd = weight.double()
    y = torch.zeros(n, c, oh, ow, dtype=torch.float64)
    for i in range(kh):
        for j in range(kw):
            win = xp[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
            y += win * wd[:, 0, i, j].view(1, c, 1, 1)
    return y


def dw_ref(x, weight, bias, residual, after, stride, padding, dilation, act, p):
    """float64 oracle (the reference's epilogue on depthwise64) and PyTorch's own computation in
    x's dtype (for the bf16 rule)."""
    c = x.shape[1]
    y = depthwise64(x, weight, stride, padding, dilation) + bias.double().view(1, c, 1, 1)
    ref64 = reference.add_residual_around(y, lambda t: apply_activation(t, act, p),
                                          None if residual is None else residual.double(), after)
    y = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), stride, padding, dilation, c)
    same = reference.add_residual_around(y, lambda t: apply_activation(t, act, p), residual, after)
    return ref64, same


def run_dw(m, x, taps, bias, residual, after, out, kh, kw, stride, padding, dilation, act="identity", p=0.0):
    m.depthwise_nhwc(x, taps, bias, residual, after, out, kh, kw, list(stride), list(padding), list(dilation), act, p)
    return out


# (kh, kw), stride, padding, dilation: the hot MobileNet/EfficientNet shapes, dilation 2, a
# non-square kernel with unequal strides, and a 1x1 (no interior/border split to speak of).
DW_SHAPES = [
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((5, 5), (1, 1), (2, 2), (1, 1)),
    ((5, 5), (2, 2), (2, 2), (1, 1)),
    ((3, 3), (1, 1), (2, 2), (2, 2)),
    ((3, 3), (2, 2), (0, 0), (1, 1)),
    ((3, 5), (2, 1), (1, 2), (1, 2)),
    ((1, 1), (1, 1), (0, 0), (1, 1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("c", [16, 37], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("shape", DW_SHAPES, ids=lambda s: f"k{s[0][0]}x{s[0][1]}s{s[1][0]}{s[1][1]}p{s[2][0]}{s[2][1]}d{s[3][0]}{s[3][1]}")
def test_depthwise_shapes(m, shape, c, dtype):
    (kh, kw), stride, padding, dilation = shape
    x, weight, taps, bias = dw_case(c, kh, kw, dtype)
    x = nhwc(x)
    oh, ow = out_size(9, kh, stride[0], padding[0], dilation[0]), out_size(21, kw, stride[1], padding[1], dilation[1])
    out = nhwc(torch.full((2, c, oh, ow), float("nan"), dtype=dtype))
    run_dw(m, x, taps, bias, None, False, out, kh, kw, stride, padding, dilation, "relu")
    ref64, same = dw_ref(x, weight, bias, None, False, stride, padding, dilation, "relu", 0.0)
    assert_matches(out, ref64, same)


@pytest.mark.parametrize("residual", ["none", "before", "after"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_depthwise_activations(m, act, residual):
    c, p = 21, ACT_PARAM.get(act, 0.0)
    x, weight, taps, bias = dw_case(c, 3, 3, torch.float32, h=7, w=13)
    x = nhwc(x * 2)  # spread over every activation's bends (hardswish's +-3, relu6's 6)
    out = nhwc(torch.empty(2, c, 7, 13))
    res = nhwc(torch.randn(2, c, 7, 13)) if residual != "none" else None
    after = residual == "after"
    run_dw(m, x, taps, bias, res, after, out, 3, 3, (1, 1), (1, 1), (1, 1), act, p)
    ref64, _ = dw_ref(x, weight, bias, res, after, (1, 1), (1, 1), (1, 1), act, p)
    assert_matches(out, ref64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_depthwise_channel_views(m, dtype):
    """x, residual and out as channel slices of wider NHWC buffers; nothing else is written."""
    c, n = 19, 2
    x0, weight, taps, bias = dw_case(c, 5, 5, dtype, n=n, h=11, w=20)
    x, _ = channel_view(x0.shape, dtype, lo=5, extra=2)
    x.copy_(x0)
    oh, ow = out_size(11, 5, 2, 2, 1), out_size(20, 5, 2, 2, 1)
    res, _ = channel_view((n, c, oh, ow), dtype, lo=1, extra=6)
    res.copy_(torch.randn(n, c, oh, ow))
    out, obuf = channel_view((n, c, oh, ow), dtype)
    run_dw(m, x, taps, bias, res, True, out, 5, 5, (2, 2), (2, 2), (1, 1), "hardswish")
    ref64, same = dw_ref(x0, weight, bias, res, True, (2, 2), (2, 2), (1, 1), "hardswish", 0.0)
    assert_matches(out, ref64, same)
    assert_outside_untouched(obuf, 3, c)


def test_depthwise_oracle():
    """The float64 oracle above is reference.conv_scale_bias_act's depthwise conv."""
    x, weight, _, bias = dw_case(4, 3, 5, torch.float64, h=8, w=11)
    res = torch.randn(2, 4, 4, 7, dtype=torch.float64)
    for after in (False, True):
        got, _ = dw_ref(x, weight, bias, res, after, (2, 1), (1, 2), (1, 2), "gelu", 0.0)
        want = reference.conv_scale_bias_act(x, weight, None, bias, res, (2, 1), (1, 2), (1, 2), 4, "gelu", 0.0, after)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_depthwise_wide_and_mixed_dtypes(m):
    """More channels than one task's chunk, no bias, a bf16 residual into an fp32 output."""
    c = 300
    x, weight, taps, _ = dw_case(c, 3, 3, torch.float32, n=1, h=6, w=19)
    x = nhwc(x)
    res = nhwc(torch.randn(1, c, 6, 19)).bfloat16()
    out = nhwc(torch.full((1, c, 6, 19), float("nan")))
    run_dw(m, x, taps, None, res, False, out, 3, 3, (1, 1), (1, 1), (1, 1), "silu")
    ref64, _ = dw_ref(x, weight, torch.zeros(c), res, False, (1, 1), (1, 1), (1, 1), "silu", 0.0)
    assert_matches(out, ref64)


def test_depthwise_batch0(m):
    x = nhwc(torch.randn(0, 8, 5, 5))
    taps = torch.randn(9, 8)
    out = nhwc(torch.empty(0, 8, 5, 5))
    run_dw(m, x, taps, None, None, False, out, 3, 3, (1, 1), (1, 1), (1, 1))


def test_depthwise_bad_inputs(m):
    x, _, taps, bias = dw_case(8, 3, 3, torch.float32)
    out = nhwc(torch.empty(2, 8, 9, 21))
    with pytest.raises(RuntimeError, match="channel stride 1"):
        run_dw(m, x.contiguous(), taps, bias, None, False, out, 3, 3, (1, 1), (1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="channel stride 1"):
        run_dw(m, nhwc(x), taps, bias, None, False, out.contiguous(), 3, 3, (1, 1), (1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="out must be"):
        run_dw(m, nhwc(x), taps, bias, None, False, nhwc(torch.empty(2, 8, 9, 20)), 3, 3, (1, 1), (1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="taps must be"):
        run_dw(m, nhwc(x), taps[:4], bias, None, False, out, 3, 3, (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="unknown activation"):
        run_dw(m, nhwc(x), taps, bias, None, False, out, 3, 3, (1, 1), (1, 1), (1, 1), "swish")


# ---- squeeze-excitation ------------------------------------------------------------------------

def se_weights(c, r, wdtype, conv_shape, biases, seed=1):
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(r, c, generator=g) / math.sqrt(c)).to(wdtype)
    w2 = (torch.randn(c, r, generator=g) / math.sqrt(r)).to(wdtype)
    b1 = (torch.randn(r, generator=g) * 0.3).to(wdtype) if biases else None
    b2 = (torch.randn(c, generator=g) * 0.3).to(wdtype) if biases else None
    if conv_shape:
        w1, w2 = w1[:, :, None, None], w2[:, :, None, None]
    return w1, b1, w2, b2


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw", "view"])
@pytest.mark.parametrize("config", [
    # weight dtype, [out,in,1,1]?, biases, act, gate, eSE (no reduce layer)
    (torch.float32, True, True, "relu", "sigmoid", False),
    (torch.bfloat16, False, False, "silu", "hardsigmoid", False),
    (torch.float64, True, True, "gelu", "sigmoid", False),
    (torch.float32, True, True, "relu", "hardsigmoid", True),
], ids=["f32w-conv-relu-sigmoid", "bf16w-linear-nobias-silu-hsig", "f64w-gelu", "ese"])
def test_se_gate(m, config, layout, xdtype):
    wdtype, conv_shape, biases, act, gate, ese = config
    n, c, h, w = 2, 45, 20, 17  # > 256 pixels: several pooling blocks; C not a multiple of 16
    x0 = (torch.randn(n, c, h, w) + torch.randn(1, c, 1, 1)).to(xdtype)  # nonzero channel means
    if layout == "nhwc":
        x = nhwc(x0)
    elif layout == "nchw":
        x = x0.contiguous()
    else:
        x, _ = channel_view(x0.shape, xdtype)
        x.copy_(x0)
    w1, b1, w2, b2 = se_weights(c, 12, wdtype, conv_shape, biases)
    if ese:
        w1 = b1 = None
        w2, b2 = se_weights(c, c, wdtype, conv_shape, biases)[2:]
    got = m.se_gate(x, w1, b1, w2, b2, act, 0.0, gate, 0.0)
    assert got.dtype == torch.float32 and got.shape == (n, c)
    ref64 = reference.se_gate(x0.double(), w1, b1, w2, b2, act, 0.0, gate, 0.0)
    assert_matches(got, ref64)


def test_se_gate_batch0_and_errors(m):
    w1, b1, w2, b2 = se_weights(16, 4, torch.float32, True, True)
    assert m.se_gate(nhwc(torch.randn(0, 16, 4, 4)), w1, b1, w2, b2, "relu", 0.0, "sigmoid", 0.0).shape == (0, 16)
    with pytest.raises(RuntimeError, match="reduce_weight takes"):
        m.se_gate(nhwc(torch.randn(1, 12, 4, 4)), w1, b1, w2, b2, "relu", 0.0, "sigmoid", 0.0)


def se_apply_ref(x, gate, res, act, p):
    ref64 = reference.se_apply(x.double(), gate.double(), None if res is None else res.double(), act, p)
    y = x * gate.to(x.dtype)[:, :, None, None]
    if res is not None:
        y = y + res
    return ref64, apply_activation(y, act, p)


@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_se_apply_activations(m, act, residual):
    n, c, h, w = 2, 35, 5, 6
    p = ACT_PARAM.get(act, 0.0)
    x = nhwc(torch.randn(n, c, h, w) * 3)
    gate = torch.rand(n, c) * 1.5
    res = nhwc(torch.randn(n, c, h, w)) if residual else None
    got = m.se_apply(x, gate, res, None, act, p)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_matches(got, se_apply_ref(x, gate, res, act, p)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw", "view", "mixed"])
def test_se_apply_layouts(m, layout, dtype):
    """NHWC fast path, NCHW / mixed-stride fallback, channel views in and out."""
    n, c, h, w = 2, 37, 6, 7
    x0 = torch.randn(n, c, h, w).to(dtype)
    r0 = torch.randn(n, c, h, w).to(dtype)
    gate = torch.rand(n, c)
    if layout == "nhwc":
        x, res, out, obuf = nhwc(x0), nhwc(r0), None, None
    elif layout == "nchw":
        x, res, out, obuf = x0.contiguous(), r0.contiguous(), None, None
    elif layout == "view":
        x, _ = channel_view(x0.shape, dtype)
        x.copy_(x0)
        res, _ = channel_view(r0.shape, dtype, lo=2)
        res.copy_(r0)
        out, obuf = channel_view(x0.shape, dtype)
    else:  # NHWC x into an NCHW out with an NCHW residual: the strided fallback
        x, res = nhwc(x0), r0.contiguous()
        out, obuf = torch.full((n, c, h, w), float("nan"), dtype=dtype), None
    got = m.se_apply(x, gate, res, out, "relu", 0.0)
    if out is not None:
        assert got.data_ptr() == out.data_ptr()
    else:
        assert got.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    ref64, same = se_apply_ref(x0, gate, r0, "relu", 0.0)
    assert_matches(got, ref64, same)
    if obuf is not None:
        assert_outside_untouched(obuf, 3, c)


def test_se_apply_batch0(m):
    x = nhwc(torch.randn(0, 8, 3, 3))
    assert m.se_apply(x, torch.rand(0, 8), None, None, "identity", 0.0).shape == x.shape


# ---- channel shuffle ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8], ids=str)
@pytest.mark.parametrize("groups,c", [(2, 34), (2, 64), (3, 27), (4, 64), (1, 8)], ids=lambda v: str(v))
@pytest.mark.parametrize("layout", ["nhwc", "nchw", "view"])
def test_channel_shuffle(m, layout, groups, c, dtype):
    x0 = (torch.randn(2, c, 3, 5) * 50).to(dtype)
    want = reference.channel_shuffle(x0, groups)
    if layout == "nhwc":
        got = m.channel_shuffle(nhwc(x0), groups, None)
        assert got.is_contiguous(memory_format=torch.channels_last)
    elif layout == "nchw":
        got = m.channel_shuffle(x0.contiguous(), groups, None)
        assert got.is_contiguous()
    else:
        x, _ = channel_view(x0.shape, dtype, lo=1)
        x.copy_(x0)
        out, obuf = channel_view(x0.shape, dtype)
        got = m.channel_shuffle(x, groups, out)
        assert got.data_ptr() == out.data_ptr()
        if dtype.is_floating_point:
            assert_outside_untouched(obuf, 3, c)
    assert torch.equal(got, want)


def test_channel_shuffle_mixed_layouts_and_errors(m):
    x = torch.randn(1, 12, 4, 5)
    out = nhwc(torch.empty(1, 12, 4, 5))
    assert torch.equal(m.channel_shuffle(x, 3, out), reference.channel_shuffle(x, 3))
    assert m.channel_shuffle(nhwc(torch.randn(0, 12, 4, 5)), 3, None).shape == (0, 12, 4, 5)
    with pytest.raises(ValueError, match="not divisible into 5 groups"):
        m.channel_shuffle(x, 5, None)
    with pytest.raises(ValueError, match="not divisible"):
        m.channel_shuffle(x, 0, None)
    with pytest.raises(RuntimeError):
        m.channel_shuffle(x, 3, x)  # in place cannot be done in one pass


# ---- interleave (the ShuffleNetV2 unit's two halves) ----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8], ids=str)
@pytest.mark.parametrize("c", [1, 10, 16, 58, 64], ids=lambda v: f"c{v}")
@pytest.mark.parametrize("layout", ["nhwc", "views", "nchw"])
def test_interleave_channels(m, layout, c, dtype):
    """out[:, 0::2] = a, out[:, 1::2] = b, bit-exact: the vector loop (16 floats / 32 bf16 per
    step) and its scalar tail, channel views of wider buffers in and out, and the strided
    fallback for non-channel-minor tensors; only out's own channels are written."""
    a0, b0 = ((torch.randn(2, c, 3, 5) * 50).to(dtype) for _ in range(2))
    want = torch.stack((a0, b0), dim=2).flatten(1, 2)
    if layout == "nhwc":
        a, b = nhwc(a0), nhwc(b0)
        out = nhwc(torch.empty(2, 2 * c, 3, 5, dtype=dtype))
    elif layout == "nchw":
        a, b, out = a0.contiguous(), b0.contiguous(), torch.empty(2, 2 * c, 3, 5, dtype=dtype)
    else:
        a, _ = channel_view(a0.shape, dtype, lo=1)
        b, _ = channel_view(b0.shape, dtype, lo=5, extra=0)
        a.copy_(a0)
        b.copy_(b0)
        out, obuf = channel_view(want.shape, dtype)
    m.interleave_channels(a, b, out)
    assert torch.equal(out, want)
    if layout == "views" and dtype.is_floating_point:
        assert_outside_untouched(obuf, 3, 2 * c)


def test_interleave_channels_batch0_and_errors(m):
    a, b = nhwc(torch.randn(0, 4, 3, 3)), nhwc(torch.randn(0, 4, 3, 3))
    m.interleave_channels(a, b, nhwc(torch.empty(0, 8, 3, 3)))  # nothing to do, no error
    a, b = nhwc(torch.randn(1, 4, 3, 3)), nhwc(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="out must be 1x8x3x3"):
        m.interleave_channels(a, b, nhwc(torch.empty(1, 6, 3, 3)))
    with pytest.raises(ValueError, match="one shape"):
        m.interleave_channels(a, b[:, :3], nhwc(torch.empty(1, 8, 3, 3)))
    with pytest.raises(ValueError, match="one dtype"):
        m.interleave_channels(a, b.double(), nhwc(torch.empty(1, 8, 3, 3)))
    with pytest.raises(ValueError, match="4-D"):
        m.interleave_channels(a[0], b[0], torch.empty(8, 3, 3))
    t = torch.randn(72)  # out (1x8x3x3 NHWC) and a (1x4x3x3 NHWC) share their first 36 floats
    out, a = t.view(1, 3, 3, 8).permute(0, 3, 1, 2), t[:36].view(1, 3, 3, 4).permute(0, 3, 1, 2)
    with pytest.raises(RuntimeError, match="single memory location"):
        m.interleave_channels(a, b, out)  # out may not alias a half


# ---- max pooling (no indices) ---------------------------------------------------------------------

# (C, H, W, kernel, stride, padding, ceil_mode): VoVNet's stage pools (3x3 s2 ceil, odd and even
# maps), ResNet / ShuffleNetV2's stem pool (3x3 s2 p1), 2x2 s2, stride 1, a rectangular kernel, and
# channel counts around the 64-channel chunk and the 16-lane vector (tails of 1 and 48 lanes).
POOL_CASES = [(32, 13, 13, 3, 2, 0, True), (64, 14, 14, 3, 2, 0, True), (24, 15, 11, 3, 2, 1, False),
              (17, 8, 8, 2, 2, 0, False), (65, 7, 9, 3, 1, 1, False), (112, 9, 10, (3, 2), (2, 1), (1, 0), True),
              (1, 5, 5, 3, 2, 1, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nhwc", "view"])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_max_pool_nhwc(m, case, layout, dtype):
    """Bit-exact against F.max_pool2d (NaN and -inf included), NHWC out."""
    c, h, w, k, s, p, ceil = case
    pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]
    x0 = torch.randn(2, c, h, w).to(dtype)
    x0[0, 0, 0, 0], x0[1, -1, -1, -1], x0[1, 0, 1, 1] = float("nan"), float("-inf"), float("inf")
    if layout == "nhwc":
        x = nhwc(x0)
    else:
        x, _ = channel_view(x0.shape, dtype)
        x.copy_(x0)
    want = F.max_pool2d(x0, k, s, p, ceil_mode=ceil)
    y = m.max_pool_nhwc(x, pair(k), pair(s), pair(p), ceil)
    assert y.shape == want.shape and y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.nan_to_num(0.0), want.nan_to_num(0.0))


def test_max_pool_nhwc_batch0_and_errors(m):
    assert m.max_pool_nhwc(nhwc(torch.randn(0, 8, 5, 5)), [3, 3], [2, 2], [1, 1], False).shape == (0, 8, 3, 3)
    x = nhwc(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="at most half the kernel"):
        m.max_pool_nhwc(x, [3, 3], [2, 2], [2, 2], False)
    with pytest.raises(ValueError, match="channel stride 1"):
        m.max_pool_nhwc(x.contiguous(), [3, 3], [2, 2], [1, 1], False)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        m.max_pool_nhwc(x.double(), [3, 3], [2, 2], [1, 1], False)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        m.max_pool_nhwc(nhwc(torch.randn(1, 8, 2, 2)), [3, 3], [1, 1], [0, 0], False)
    with pytest.raises(ValueError, match="4-D"):
        m.max_pool_nhwc(torch.randn(8, 5, 5), [3, 3], [2, 2], [1, 1], False)
