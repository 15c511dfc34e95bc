"""The native CPU backend (csrc/): its conv path against float64 references, the packed-weight
cache (what it sees, what it needs effops.refresh() for), dispatch, and the build itself
(a clean just-in-time build; no compiler: a warning, and the reference runs).

The depthwise, squeeze-excitation and channel-shuffle kernels: tests/test_native_kernels.py.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effops
from effops import FusedConvBNAct, native, use_backend
from effops.activations import ACTIVATIONS, apply_activation
from effops.ops import conv_bn_act
from effops.ops.conv import native_bf16

from helpers import assert_matches, randomize_bn

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native backend unavailable: {native.status()[1]}")


def _ref(x, w, scale, bias, residual, stride, padding, dilation, groups, act, param, res_after, gate=None):
    x64 = x.double() if gate is None else x.double() * gate.double()[:, :, None, None]
    y = F.conv2d(x64, w.double(), None, stride, padding, dilation, groups)
    y = y * scale.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    if residual is not None and not res_after:
        y = y + residual.double()
    y = apply_activation(y, act, param)
    if residual is not None and res_after:
        y = y + residual.double()
    return y


def _problem(cin, cout, k, stride, groups, hw=(7, 9), n=2, dtype=torch.float32, layout="nhwc"):
    x = torch.randn(n, cin, *hw, dtype=dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin // groups, k, k, dtype=dtype) / (cin // groups * k * k) ** 0.5
    scale, bias = torch.rand(cout) + 0.5, torch.randn(cout)
    oh = (hw[0] + 2 * (k // 2) - k) // stride + 1
    ow = (hw[1] + 2 * (k // 2) - k) // stride + 1
    return x, w, scale, bias, (n, cout, oh, ow)


SHAPES = [(16, 24, 3, 1, 1), (16, 24, 1, 1, 1), (24, 24, 3, 2, 24), (24, 24, 5, 1, 24), (16, 32, 3, 1, 4),
          (3, 8, 3, 2, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_conv_every_activation_and_residual(shape, act):
    cin, cout, k, stride, groups = shape
    x, w, scale, bias, oshape = _problem(cin, cout, k, stride, groups)
    pad = [k // 2] * 2
    for res_after in (None, True, False):
        r = None if res_after is None else torch.randn(oshape).contiguous(memory_format=torch.channels_last)
        with use_backend("native"):
            y = conv_bn_act(x, w, scale, bias, r, stride=stride, padding=pad, groups=groups, act=act, act_param=0.1,
                                residual_after_act=bool(res_after))
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert_matches(y, _ref(x, w, scale, bias, r, stride, pad, 1, groups, act, 0.1, bool(res_after)))


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "view"])
def test_conv_layouts_views_gate_shuffle_and_out(layout):
    x, w, scale, bias, oshape = _problem(8, 12, 3, 1, 1, layout="nchw" if layout == "nchw" else "nhwc")
    if layout == "view":  # a channel view of a wider NHWC buffer, as an OSA stage reads it
        buf = torch.randn(2, 20, 7, 9).contiguous(memory_format=torch.channels_last)
        x = buf[:, 5:13]
    gate = torch.rand(2, 8)
    out_buf = torch.full((2, 30, 7, 9), float("nan")).contiguous(memory_format=torch.channels_last)
    out = out_buf[:, 10:22]
    with use_backend("native"):
        y = conv_bn_act(x, w, scale, bias, padding=1, act="relu", gate=gate, out=out, out_shuffle_groups=3)
    assert y.data_ptr() == out.data_ptr()
    ref = _ref(x, w, scale, bias, None, 1, [1, 1], 1, 1, "relu", 0.0, True, gate)
    from effops.ops import reference
    assert_matches(out, reference.channel_shuffle(ref, 3))
    assert torch.isnan(out_buf[:, :10]).all() and torch.isnan(out_buf[:, 22:]).all()  # nothing else written


def test_conv_dilation_and_empty_batch():
    x, w, scale, bias, _ = _problem(8, 8, 3, 1, 1, hw=(9, 9))
    with use_backend("native"):
        y = conv_bn_act(x, w, scale, bias, padding=2, dilation=2, act="silu")
    assert_matches(y, _ref(x, w, scale, bias, None, 1, [2, 2], 2, 1, "silu", 0.0, True))
    e = x[:0]
    with use_backend("native"):
        assert conv_bn_act(e, w, scale, bias, padding=1, act="relu").shape == (0, 8, 9, 9)


def _policy(name):
    """The setter of the native ``<name>`` policy, for a fixture; the policy is restored afterwards."""
    mod = native.module()
    before = getattr(mod, f"{name}_policy")()
    yield getattr(mod, f"set_{name}_policy")
    getattr(mod, f"set_{name}_policy")(before)


# 1x1 convs with at least 64 outputs, which run effops' register-blocked GEMM (csrc/conv.cpp,
# small_gemm_rows): whole 64-column blocks, then tails of 1, 2 (AVX2: the last) and 3 partial
# vectors (72, 100, 120 = 64 + 8 / 36 / 56) and of 1, 2, 3 whole vectors (80, 96, 112: taller
# tiles); one-pixel maps; row counts that leave partial row tiles and uneven row chunks;
# contracting convs, and weights too large for one group of column blocks (700 -> 160: two
# groups of two blocks, the second one short; 1600 -> 256: four groups).
GEMM_SHAPES = [(8, 64, 5, 7, 2), (16, 72, 3, 3, 1), (20, 100, 9, 9, 1), (12, 120, 1, 1, 3), (48, 192, 6, 6, 1),
               (200, 80, 7, 7, 1), (96, 96, 11, 13, 1), (130, 112, 5, 5, 2), (700, 160, 7, 7, 1),
               (1600, 256, 7, 7, 1),
               # fewer outputs than one column block: one vector, a partial one, whole vectors, and
               # fewer than one vector (MKL's sgemm)
               (24, 16, 4, 5, 1), (40, 20, 5, 5, 1), (58, 58, 6, 7, 1), (116, 48, 3, 3, 2), (16, 8, 3, 3, 1)]


@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ["relu6", "hardswish", "silu"])
def test_pointwise_gemm_kernel_matches_float64(shape, act, pointwise_policy):
    cin, cout, h, w_, n = shape
    pointwise_policy(1)
    x, w, scale, bias, oshape = _problem(cin, cout, 1, 1, 1, hw=(h, w_), n=n)
    buf = torch.randn(n, cin + 9, h, w_).contiguous(memory_format=torch.channels_last)
    buf[:, 4:4 + cin] = x
    out_buf = torch.full((n, cout + 7, h, w_), float("nan")).contiguous(memory_format=torch.channels_last)
    for xin in (x, buf[:, 4:4 + cin]):  # dense rows, and a channel view's rows (a stride wider than C)
        for res_after in (None, True, False):
            r = None if res_after is None else torch.randn(oshape).contiguous(memory_format=torch.channels_last)
            ref = _ref(x, w, scale, bias, r, 1, [0, 0], 1, 1, act, 0.0, bool(res_after))
            with use_backend("native"):
                y = _runs("gemm", lambda: conv_bn_act(xin, w, scale, bias, r, act=act,
                                                      residual_after_act=bool(res_after)))
                assert_matches(y, ref)
                out = out_buf[:, 3:3 + cout]
                _runs("gemm", lambda: conv_bn_act(xin, w, scale, bias, r, act=act, out=out,
                                                  residual_after_act=bool(res_after)))
            assert_matches(out, ref)
            assert torch.isnan(out_buf[:, :3]).all() and torch.isnan(out_buf[:, 3 + cout:]).all()


# OSA aggregations (concat -> 1x1 conv) as one register-blocked GEMM over the segments where they
# lie: (segment channels, C_out, H, W, N). Every segment's rows accumulate into the same tile, so a
# wrong segment offset into the weight, or a segment skipped, is an O(1) error.
AGG_SHAPES = [((64, 128, 128, 128), 256, 9, 9, 1), ((5, 17, 3), 70, 4, 6, 2), ((256, 160, 160, 160), 512, 7, 7, 1),
              ((33, 20), 96, 1, 1, 3), ((24, 16, 16), 40, 5, 3, 1), ((8, 8), 12, 3, 3, 1)]


@pytest.mark.parametrize("shape", AGG_SHAPES, ids=lambda s: f"{'+'.join(map(str, s[0]))}to{s[1]}")
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_aggregation_gemm_matches_float64(shape, act, pointwise_policy):
    chans, cout, h, w_, n = shape
    pointwise_policy(1)  # the concat-free GEMM, not the measured choice
    k = sum(chans)
    w = torch.randn(cout, k, 1, 1) / k ** 0.5
    bn_w, bn_b, rm, rv = torch.rand(cout) + 0.5, torch.randn(cout), torch.randn(cout), torch.rand(cout) + 0.5
    scale = bn_w / torch.sqrt(rv + 1e-5)
    bias = bn_b - rm * scale
    dense = [torch.randn(n, c, h, w_).contiguous(memory_format=torch.channels_last) for c in chans]
    buf = torch.randn(n, k + 2 * len(chans), h, w_).contiguous(memory_format=torch.channels_last)
    views, off = [], 1
    for c, d in zip(chans, dense):  # the segments as channel views of one buffer, with gaps
        buf[:, off:off + c] = d
        views.append(buf[:, off:off + c])
        off += c + 2
    out_buf = torch.full((n, cout + 5, h, w_), float("nan")).contiguous(memory_format=torch.channels_last)
    mod = native.module()
    cat = torch.cat(dense, 1)
    for segs in (dense, views):
        for res_after in (None, True, False):
            r = None if res_after is None else torch.randn(n, cout, h, w_).contiguous(memory_format=torch.channels_last)
            ref = _ref(cat, w, scale, bias, r, 1, [0, 0], 1, 1, act, 0.0, bool(res_after))
            y = _runs("gemm", lambda: mod.conv_bn_act_segments(segs, w, None, bn_w, bn_b, rm, rv, 1e-5, r, None, act,
                                                               0.0, bool(res_after)))
            assert_matches(y, ref)
            out = out_buf[:, 2:2 + cout]
            _runs("gemm", lambda: mod.conv_bn_act_segments(segs, w, None, bn_w, bn_b, rm, rv, 1e-5, r, out, act, 0.0,
                                                           bool(res_after)))
            assert_matches(out, ref)
            assert torch.isnan(out_buf[:, :2]).all() and torch.isnan(out_buf[:, 2 + cout:]).all()


@pytest.fixture
def pointwise_policy():
    """Sets the native 1x1 policy for the test (0 oneDNN, 1 GEMM, 2 measured)."""
    yield from _policy("pointwise")


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bfloat16 (oneDNN: no AVX512-BF16/AMX)")
def test_conv_bfloat16():
    x, w, scale, bias, oshape = _problem(16, 24, 3, 1, 1, dtype=torch.bfloat16)
    with use_backend("native"):
        y = conv_bn_act(x, w, scale, bias, padding=1, act="relu")
    assert y.dtype == torch.bfloat16
    torch_bf16 = F.relu(F.conv2d(x, (w.float() * scale.view(-1, 1, 1, 1)).bfloat16(), bias.bfloat16(), 1, 1))
    assert_matches(y, _ref(x, w, scale, bias, None, 1, [1, 1], 1, 1, "relu", 0.0, True), torch_bf16)


def test_bad_input_gets_the_same_error_on_every_backend():
    x, w, scale, bias, _ = _problem(8, 12, 3, 1, 1)
    msgs = []
    for backend in ("native", "reference"):
        with use_backend(backend), pytest.raises(ValueError) as e:
            conv_bn_act(x[:, :6], w, scale, bias, padding=1, act="relu")
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "channels" in msgs[0]
    with use_backend("native"), pytest.raises(effops.BackendUnavailable, match="float16"):
        conv_bn_act(x.half(), w.half(), scale, bias, padding=1, act="relu")


# -- direct conv for at most 4 input channels (csrc/direct.cpp) ---------------------------------

@pytest.fixture
def direct_policy():
    """Sets the native small-channel policy for the test (0 oneDNN, 1 direct, 2 measured)."""
    yield from _policy("direct")


# (C_in, C_out, k, stride, padding, dilation, (H, W), N): the stems' 3 -> 64 / 24 / 48 (whole
# 4-vector tiles, a masked last vector, 3-vector tiles), 7x7 with two edge columns a side and two
# column blocks (80 = 64 + 16), two input channels, 5x5 at stride 1 (24-pixel tiles, then 4- and
# 1-pixel tails), four channels with dilation 2 and no padding (fewer outputs than a vector),
# stride 3 with padding 2, a one-pixel image (every tap checked), a batch of 2.
DIRECT_SHAPES = [(3, 64, 3, 2, 1, 1, (15, 17), 2), (3, 24, 3, 2, 1, 1, (9, 11), 1), (3, 48, 3, 2, 1, 1, (10, 10), 1),
                 (3, 80, 7, 2, 3, 1, (23, 19), 1), (2, 16, 5, 1, 2, 1, (6, 30), 2), (4, 5, 5, 1, 0, 2, (13, 12), 1),
                 (2, 33, 3, 3, 2, 1, (8, 8), 1), (3, 16, 3, 2, 1, 1, (1, 1), 1)]


@pytest.mark.parametrize("shape", DIRECT_SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_direct_small_channel_conv_matches_float64(shape, direct_policy):
    cin, cout, k, stride, pad, dil, hw, n = shape
    direct_policy(1)
    x = torch.randn(n, cin, *hw).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5
    scale, bias = torch.rand(cout) + 0.5, torch.randn(cout)
    for act, param in (("relu", 0.0), ("hardswish", 0.0), ("leaky_relu", 0.1), ("identity", 0.0)):
        with use_backend("native"):
            y = _runs("direct", lambda: conv_bn_act(x, w, scale, bias, stride=stride, padding=pad, dilation=dil,
                                                     act=act, act_param=param))
        ref = _ref(x, w, scale, bias, None, stride, [pad, pad], dil, 1, act, param, True)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert_matches(y, ref)


def test_direct_conv_writes_a_channel_view(direct_policy):
    """A stem conv writing into a channel slice of a block buffer: nothing around it touched."""
    direct_policy(1)
    x = torch.randn(1, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    w, scale, bias = torch.randn(40, 3, 3, 3) / 5, torch.rand(40) + 0.5, torch.randn(40)
    out_buf = torch.full((1, 64, 6, 6), float("nan")).contiguous(memory_format=torch.channels_last)
    out = out_buf[:, 8:48]
    with use_backend("native"):
        y = _runs("direct", lambda: conv_bn_act(x, w, scale, bias, stride=2, padding=1, act="relu", out=out))
    assert y.data_ptr() == out.data_ptr()
    assert_matches(out, _ref(x, w, scale, bias, None, 2, [1, 1], 1, 1, "relu", 0.0, True))
    assert torch.isnan(out_buf[:, :8]).all() and torch.isnan(out_buf[:, 48:]).all()


def test_direct_conv_only_where_it_applies(direct_policy):
    """Not for 5 input channels, an NCHW input, a residual, groups or bfloat16 (those run oneDNN);
    policy 0 never runs it; measured (2), it runs one of the two and matches."""
    direct_policy(1)
    w, scale, bias = torch.randn(16, 3, 3, 3) / 5, torch.rand(16) + 0.5, torch.randn(16)
    x = torch.randn(1, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    r = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    cases = [(torch.randn(1, 5, 9, 9).contiguous(memory_format=torch.channels_last), torch.randn(16, 5, 3, 3), None, 1),
             (x.contiguous(), w, None, 1), (x, w, r, 1), (torch.randn(1, 4, 9, 9).contiguous(
                 memory_format=torch.channels_last), torch.randn(16, 2, 3, 3), None, 2)]
    with use_backend("native"):
        for xi, wi, ri, g in cases:
            y = _runs("onednn", lambda: conv_bn_act(xi, wi, scale, bias, ri, stride=2, padding=1, groups=g, act="relu"))
            assert_matches(y, _ref(xi, wi, scale, bias, ri, 2, [1, 1], 1, g, "relu", 0.0, False))
        direct_policy(0)
        _runs("onednn", lambda: conv_bn_act(x, w, scale, bias, stride=2, padding=1, act="relu"))
        direct_policy(2)
        mod = native.module()
        mod.conv_impl_counts(reset=True)
        y = conv_bn_act(x, w, scale, bias, stride=2, padding=1, act="relu")
        assert sum(v for k, v in mod.conv_impl_counts(reset=True).items() if k in ("direct", "onednn")) >= 1
        assert_matches(y, _ref(x, w, scale, bias, None, 2, [1, 1], 1, 1, "relu", 0.0, True))
    with pytest.raises(ValueError, match="direct policy"):
        direct_policy(3)


# -- Winograd F(4x4, 3x3) (csrc/winograd.cpp) ---------------------------------------------------

@pytest.fixture
def winograd_policy():
    """Sets the native 3x3 policy for the test (0 oneDNN, 1 Winograd, 2 measured)."""
    yield from _policy("winograd")


@pytest.mark.parametrize("policy", [1, 2], ids=["gemm", "measured"])
def test_channel_view_input_to_a_1x1_conv_is_read_in_place(policy, pointwise_policy):
    """A 1x1 conv reading a channel view (ShuffleNetV2's split) runs on the view's rows: after the
    first call (which may measure GEMM against oneDNN on a dense copy), no call copies the input,
    whichever way the choice went for oneDNN's dense-copy cost included."""
    from torch.profiler import profile

    pointwise_policy(policy)
    buf = torch.randn(1, 232, 14, 14).contiguous(memory_format=torch.channels_last)
    x = buf[:, 116:]
    w, scale, bias = torch.randn(116, 116, 1, 1) / 11, torch.rand(116) + 0.5, torch.randn(116)
    mod = native.module()
    with use_backend("native"):
        conv_bn_act(x, w, scale, bias, act="relu")
        mod.conv_impl_counts(reset=True)
        with profile() as prof:
            y = conv_bn_act(x, w, scale, bias, act="relu")
    ran = [k for k, v in mod.conv_impl_counts(reset=True).items() if v]
    copies = [e.name for e in prof.events() if e.name == "aten::copy_"]
    assert ran == ["gemm"] if policy == 1 else ran in (["gemm"], ["onednn"])
    assert len(copies) == (0 if ran == ["gemm"] else 1), (ran, copies)  # oneDNN reads a dense copy
    assert_matches(y, _ref(x, w, scale, bias, None, 1, [0, 0], 1, 1, "relu", 0.0, True))


def _runs(impl, fn):
    """fn()'s result, after checking that its convs ran the implementation `impl` and no other."""
    mod = native.module()
    mod.conv_impl_counts(reset=True)
    y = fn()
    counts = {k: v for k, v in mod.conv_impl_counts(reset=True).items() if v}
    assert set(counts) == {impl}, counts
    return y


# (C_in, C_out, H, W, padding, N): channel tails of both vector widths (C_out 33, 17, 5 are not
# multiples of the 32-column panels; C_in 5, 20 not of 16 lanes), outputs that are not multiples
# of the 4x4 tile, padding 0 and 2, one-pixel and one-tile outputs, a batch of 3.
WINOGRAD_SHAPES = [(16, 24, 9, 7, 1, 2), (20, 33, 5, 6, 1, 1), (5, 17, 8, 8, 0, 1), (64, 64, 13, 13, 2, 1),
                   (17, 5, 4, 4, 1, 3), (8, 40, 3, 3, 0, 1), (48, 96, 14, 14, 1, 1)]


@pytest.mark.parametrize("shape", WINOGRAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_winograd_matches_float64(shape, winograd_policy):
    cin, cout, h, w_, pad, n = shape
    winograd_policy(1)
    x, w, scale, bias, _ = _problem(cin, cout, 3, 1, 1, hw=(h, w_), n=n)
    oshape = (n, cout, h + 2 * pad - 2, w_ + 2 * pad - 2)
    for act, res_after in (("relu", None), ("silu", True), ("relu6", False), ("identity", False)):
        r = None if res_after is None else torch.randn(oshape).contiguous(memory_format=torch.channels_last)
        with use_backend("native"):
            y = _runs("winograd", lambda: conv_bn_act(x, w, scale, bias, r, padding=pad, act=act,
                                                       residual_after_act=bool(res_after)))
        assert y.shape == oshape and y.is_contiguous(memory_format=torch.channels_last)
        assert_matches(y, _ref(x, w, scale, bias, r, 1, [pad, pad], 1, 1, act, 0.0, bool(res_after)))


# (C_in, C_out, groups, H, W, padding): RegNet's group width 24 (C_out per group not a multiple of
# the 32-column panels), groups of 40 output channels (one whole and one partial panel), groups
# of 8 (the narrowest taken), C_in per group not a multiple of 16 lanes.
WINOGRAD_GROUPED = [(48, 48, 2, 9, 7, 1), (120, 200, 5, 8, 8, 1), (16, 32, 2, 6, 5, 0), (36, 54, 2, 7, 7, 1)]


@pytest.mark.parametrize("shape", WINOGRAD_GROUPED, ids=lambda s: "x".join(map(str, s)))
def test_winograd_grouped_matches_float64(shape, winograd_policy):
    cin, cout, groups, h, w_, pad = shape
    winograd_policy(1)
    x, w, scale, bias, _ = _problem(cin, cout, 3, 1, groups, hw=(h, w_), n=2)
    oshape = (2, cout, h + 2 * pad - 2, w_ + 2 * pad - 2)
    for act, res_after in (("relu", None), ("silu", True)):
        r = None if res_after is None else torch.randn(oshape).contiguous(memory_format=torch.channels_last)
        with use_backend("native"):
            y = _runs("winograd", lambda: conv_bn_act(x, w, scale, bias, r, padding=pad, groups=groups, act=act,
                                                       residual_after_act=bool(res_after)))
        assert y.shape == oshape
        assert_matches(y, _ref(x, w, scale, bias, r, 1, [pad, pad], 1, groups, act, 0.0, bool(res_after)))


def test_winograd_grouped_channel_views(winograd_policy):
    """A grouped conv reading a channel slice and writing into one: each group's GEMMs stay inside
    the output view's own channels."""
    winograd_policy(1)
    _, w, scale, bias, _ = _problem(48, 48, 3, 1, 2)
    x = torch.randn(1, 60, 9, 9).contiguous(memory_format=torch.channels_last)[:, 5:53]
    out_buf = torch.full((1, 64, 9, 9), float("nan")).contiguous(memory_format=torch.channels_last)
    out = out_buf[:, 8:56]
    with use_backend("native"):
        _runs("winograd", lambda: conv_bn_act(x, w, scale, bias, padding=1, groups=2, act="relu", out=out))
    assert_matches(out, _ref(x, w, scale, bias, None, 1, [1, 1], 1, 2, "relu", 0.0, True))
    assert torch.isnan(out_buf[:, :8]).all() and torch.isnan(out_buf[:, 56:]).all()


def test_winograd_reads_and_writes_channel_views(winograd_policy):
    """An OSA stage conv: input a channel slice of one block buffer, output written in place into
    a channel slice of another, nothing around it touched."""
    winograd_policy(1)
    _, w, scale, bias, _ = _problem(16, 24, 3, 1, 1)
    buf = torch.randn(2, 40, 11, 10).contiguous(memory_format=torch.channels_last)
    x = buf[:, 7:23]
    out_buf = torch.full((2, 64, 11, 10), float("nan")).contiguous(memory_format=torch.channels_last)
    out = out_buf[:, 20:44]
    r = torch.randn(2, 30, 11, 10).contiguous(memory_format=torch.channels_last)[:, 6:]  # a view as well
    with use_backend("native"):
        y = _runs("winograd", lambda: conv_bn_act(x, w, scale, bias, r, padding=1, act="relu", out=out))
    assert y.data_ptr() == out.data_ptr()
    assert_matches(out, _ref(x, w, scale, bias, r, 1, [1, 1], 1, 1, "relu", 0.0, False))
    assert torch.isnan(out_buf[:, :20]).all() and torch.isnan(out_buf[:, 44:]).all()


def test_winograd_only_where_it_applies(winograd_policy):
    """Stride 2, dilation, groups narrower than 8 channels, NCHW input and bfloat16 run oneDNN (or
    the depthwise kernel), with policy 1 as well; policy 0 never runs Winograd."""
    winograd_policy(1)
    x, w, scale, bias, _ = _problem(16, 16, 3, 1, 1, hw=(9, 9))
    cases = [dict(stride=2, padding=1), dict(padding=2, dilation=2), dict(padding=1, groups=4)]
    for kw in cases:
        wk = w[:, : 16 // kw.get("groups", 1)].contiguous()
        with use_backend("native"):
            y = _runs("onednn", lambda: conv_bn_act(x, wk, scale, bias, act="relu", **kw))
        assert_matches(y, _ref(x, wk, scale, bias, None, kw.get("stride", 1), [kw["padding"]] * 2,
                               kw.get("dilation", 1), kw.get("groups", 1), "relu", 0.0, True))
    with use_backend("native"):
        y = _runs("onednn", lambda: conv_bn_act(x.contiguous(), w, scale, bias, padding=1, act="relu"))
    assert_matches(y, _ref(x, w, scale, bias, None, 1, [1, 1], 1, 1, "relu", 0.0, True))
    winograd_policy(0)
    with use_backend("native"):
        _runs("onednn", lambda: conv_bn_act(x, w, scale, bias, padding=1, act="relu"))
    with pytest.raises(ValueError, match="winograd policy"):
        winograd_policy(3)


def test_winograd_measured_choice_is_correct(winograd_policy):
    """Policy 2 (the default) times Winograd against oneDNN once per problem (with the caches
    evicted) and runs the faster: either way, the same numbers."""
    winograd_policy(2)
    x, w, scale, bias, _ = _problem(64, 64, 3, 1, 1, hw=(28, 28), n=1)
    with use_backend("native"):
        native.module().conv_impl_counts(reset=True)
        ys = [conv_bn_act(x, w, scale, bias, padding=1, act="relu") for _ in range(2)]
    counts = {k: v for k, v in native.module().conv_impl_counts(reset=True).items() if v}
    assert len(counts) == 1 and set(counts) <= {"winograd", "onednn"} and sum(counts.values()) == 2, counts
    for y in ys:
        assert_matches(y, _ref(x, w, scale, bias, None, 1, [1, 1], 1, 1, "relu", 0.0, True))


@pytest.mark.parametrize("name", ["repvgg_a0", "resnet18", "regnetx_002"])
def test_winograd_whole_model(name, winograd_policy):
    """Every 3x3 stride-1 conv of a timm model through Winograd: float64-reference accuracy of the
    whole network within the float32 rule."""
    timm = pytest.importorskip("timm")
    winograd_policy(1)
    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    fast = effops.optimize(model)
    with torch.no_grad():
        native.module().conv_impl_counts(reset=True)
        y = fast(x)
        assert native.module().conv_impl_counts(reset=True)["winograd"] >= 6
        assert_matches(y, copy.deepcopy(model).double()(x.double()))


# -- expand 1x1 -> depthwise pairs, banded (pointwise_depthwise_bn_act) -----------------------

@pytest.fixture
def pair_policy():
    """Sets the native pair policy for the test (0 the two convs, 1 banded, 2 banded up to 128 input
    channels)."""
    yield from _policy("pair")


def _pair(cin, ce, k, stride, dilation=1):
    pw = randomize_bn(nn.Sequential(nn.Conv2d(cin, ce, 1, bias=False), nn.BatchNorm2d(ce))).eval()
    dw = randomize_bn(nn.Sequential(nn.Conv2d(ce, ce, k, stride, dilation * (k // 2), dilation, groups=ce),
                                    nn.BatchNorm2d(ce))).eval()
    return pw, dw


def _pair_call(x, pw, dw, act1, act2):
    (c1, b1), (c2, b2) = pw, dw
    bn = lambda c, b: (c.bias, b.weight, b.bias, b.running_mean, b.running_var, b.eps, b.num_batches_tracked)
    return native.module().pointwise_depthwise_bn_act(x, c1.weight, *bn(c1, b1), act1, 0.0, c2.weight, *bn(c2, b2),
                                                     list(c2.stride), list(c2.padding), list(c2.dilation), act2, 0.0)


def _pair_ref(x, pw, dw, act1, act2):
    y = apply_activation(copy.deepcopy(pw).double()(x.double()), act1, 0.0)
    return apply_activation(copy.deepcopy(dw).double()(y), act2, 0.0)


# (C_in, C_exp, k, stride, dilation, H, W, N): 16-lane and 64-column tails (C_exp 20, 72, 100),
# stride 2 on odd and even sizes, 5x5, dilation 2, one-row images, a batch of 3, and maps tall
# enough for several bands per thread with rows shared between a thread's bands.
PAIR_SHAPES = [(16, 96, 3, 2, 1, 24, 24, 1), (8, 20, 3, 1, 1, 9, 7, 3), (24, 72, 5, 2, 1, 13, 11, 1),
               (5, 100, 3, 1, 2, 10, 10, 2), (4, 24, 3, 1, 1, 1, 6, 2), (16, 64, 5, 1, 1, 40, 40, 1),
               (3, 40, 3, 2, 1, 57, 33, 1)]


@pytest.mark.parametrize("shape", PAIR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("acts", [("relu6", "relu6"), ("hardswish", "identity"), ("silu", "silu")])
def test_pointwise_depthwise_matches_float64(shape, acts, pair_policy):
    cin, ce, k, s, d, h, w, n = shape
    pw, dw = _pair(cin, ce, k, s, d)
    x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    ref = _pair_ref(x, pw, dw, *acts)
    with torch.no_grad():
        for policy in (1, 0, 2):  # banded, the two convs one after the other, the default rule
            pair_policy(policy)
            y = _pair_call(x, pw, dw, *acts)
            assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
            assert_matches(y, ref)


def test_pointwise_depthwise_runs_banded_on_channel_views(pair_policy):
    pair_policy(1)
    pw, dw = _pair(12, 48, 3, 1)
    buf = torch.randn(2, 20, 15, 15).contiguous(memory_format=torch.channels_last)
    x = buf[:, 4:16]  # a channel view: rows with a stride larger than their width
    with torch.no_grad():
        y = _runs_pair(lambda: _pair_call(x, pw, dw, "relu", "relu6"))
    assert_matches(y, _pair_ref(x, pw, dw, "relu", "relu6"))


def _runs_pair(fn):
    """fn()'s result, after checking that it ran as one banded pair (one GEMM and one depthwise count)."""
    mod = native.module()
    mod.conv_impl_counts(reset=True)
    y = fn()
    counts = {k: v for k, v in mod.conv_impl_counts(reset=True).items() if v}
    assert counts == {"gemm": 1, "depthwise": 1}, counts
    return y


def test_pointwise_depthwise_bad_input():
    pw, dw = _pair(8, 16, 3, 1)
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with pytest.raises(ValueError, match="1x1 weight"):
            _pair_call(x[:, :6], pw, dw, "relu", "relu")
        with pytest.raises(ValueError, match="float32"):
            _pair_call(x.double(), pw, dw, "relu", "relu")
        with pytest.raises(ValueError, match="unknown activation"):
            _pair_call(x, pw, dw, "relu", "mish")
        with pytest.raises(ValueError, match="pair policy"):
            native.module().set_pair_policy(3)
        y = _pair_call(x[:0], pw, dw, "relu", "relu")  # an empty batch: an empty result
    assert y.shape == (0, 16, 6, 6)


@pytest.mark.parametrize("name", ["tv:mobilenet_v2", "mobilenetv3_large_100", "efficientnet_b0"])
def test_inverted_residual_models_run_pairs(name, pair_policy):
    """Every expand → depthwise pair of the model runs as one banded call in the steady state, and the
    whole model matches float64; a hook on an expand conv runs the pair's convs as modules again."""
    pair_policy(1)
    if name.startswith("tv:"):
        import torchvision

        model = getattr(torchvision.models, name[3:])(num_classes=10)
    else:
        model = pytest.importorskip("timm").create_model(name, pretrained=False, num_classes=10)
    model = randomize_bn(model).eval()
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    fast = effops.optimize(copy.deepcopy(model))
    mod = native.module()
    calls = []
    real = mod.pointwise_depthwise_bn_act
    with torch.no_grad():
        fast(x)  # plans each conv
        try:
            import effops.nn.conv_bn_act as cba

            cba.native_module = lambda: _Counting(mod, calls)
            y = fast(x)
        finally:
            cba.native_module = native.module
        expands = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                   and any(d.groups == d.in_channels == m.out_channels and d.groups > 1 for d in model.modules()
                           if isinstance(d, nn.Conv2d))]
        assert len(calls) >= 5 and len(calls) <= len(expands), (len(calls), len(expands))
        assert_matches(y, copy.deepcopy(model).double()(x.double()))
        seen = []
        conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                    and m.out_channels > m.in_channels)
        handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        calls.clear()
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()))
        handle.remove()
    assert len(seen) == 1
    assert real is mod.pointwise_depthwise_bn_act


class _Counting:
    """A native module whose pointwise_depthwise_bn_act calls are recorded."""

    def __init__(self, mod, calls):
        self._mod, self._calls = mod, calls

    def __getattr__(self, name):
        f = getattr(self._mod, name)
        if name != "pointwise_depthwise_bn_act":
            return f
        return lambda *a, **k: self._calls.append(a[0].shape) or f(*a, **k)


# -- depthwise -> 1x1 pairs, banded (depthwise_pointwise_bn_act) --------------------------------

@pytest.fixture
def dw_pair_policy():
    """Sets the native depthwise -> 1x1 pair policy for the test (0 the two convs, 1 banded, 2
    measured per problem)."""
    yield from _policy("dw_pair")


def _dw_pair(c, cout, k, stride, dw_bn=True, dilation=1):
    dw = [nn.Conv2d(c, c, k, stride, dilation * (k // 2), dilation, groups=c, bias=not dw_bn)]
    if dw_bn:
        dw.append(nn.BatchNorm2d(c))
    pw = randomize_bn(nn.Sequential(nn.Conv2d(c, cout, 1, bias=False), nn.BatchNorm2d(cout))).eval()
    return randomize_bn(nn.Sequential(*dw)).eval(), pw


def _dw_pair_call(x, dw, pw, act1, act2, residual=None):
    bn = lambda c, b: (c.bias, b.weight, b.bias, b.running_mean, b.running_var, b.eps, b.num_batches_tracked)
    c1 = dw[0]
    a1 = bn(c1, dw[1]) if len(dw) > 1 else (c1.bias, None, None, None, None, 0.0, None)
    return native.module().depthwise_pointwise_bn_act(x, c1.weight, *a1, list(c1.stride), list(c1.padding),
                                                     list(c1.dilation), act1, 0.0, pw[0].weight, *bn(*pw), act2, 0.0,
                                                     residual)


def _dw_pair_ref(x, dw, pw, act1, act2, residual=None):
    y = apply_activation(copy.deepcopy(dw).double()(x.double()), act1, 0.0)
    y = apply_activation(copy.deepcopy(pw).double()(y), act2, 0.0)
    return y if residual is None else y + residual.double()


# (C, C_out, k, stride, dilation, H, W, N, dw BN): 16-lane tails on both sides (C 20 / 40,
# C_out 24 / 72), stride 2 on odd and even sizes, 5x5, dilation 2, one-row images, a batch of 3,
# maps tall enough for several bands per thread, and a bias-only depthwise conv (VoVNet-dw's).
DW_PAIR_SHAPES = [(16, 16, 3, 1, 1, 12, 12, 1, True), (20, 24, 3, 2, 1, 9, 7, 3, True),
                  (40, 72, 5, 2, 1, 13, 11, 1, True), (32, 64, 3, 1, 2, 10, 10, 2, False),
                  (24, 16, 3, 1, 1, 1, 6, 2, True), (64, 64, 3, 1, 1, 40, 40, 1, False),
                  (48, 128, 3, 2, 1, 33, 57, 1, True)]


@pytest.mark.parametrize("shape", DW_PAIR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("acts", [("relu6", "identity"), ("identity", "relu"), ("hardswish", "silu")])
def test_depthwise_pointwise_matches_float64(shape, acts, dw_pair_policy):
    c, cout, k, s, d, h, w, n, dw_bn = shape
    dw, pw = _dw_pair(c, cout, k, s, dw_bn, d)
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    ref = _dw_pair_ref(x, dw, pw, *acts)
    with torch.no_grad():
        for policy in (1, 0, 2):  # banded, the two convs one after the other, measured
            dw_pair_policy(policy)
            y = _dw_pair_call(x, dw, pw, *acts)
            assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
            assert_matches(y, ref)


def test_depthwise_pointwise_residual_and_channel_views(dw_pair_policy):
    """A channel view in, a residual (itself a channel view) added after the 1×1 conv's activation,
    banded: one GEMM and one depthwise count."""
    dw_pair_policy(1)
    dw, pw = _dw_pair(12, 32, 3, 1)
    buf = torch.randn(2, 20, 15, 15).contiguous(memory_format=torch.channels_last)
    x = buf[:, 4:16]
    rbuf = torch.randn(2, 40, 15, 15).contiguous(memory_format=torch.channels_last)
    r = rbuf[:, 3:35]
    with torch.no_grad():
        y = _runs_pair(lambda: _dw_pair_call(x, dw, pw, "relu", "relu6", r))
    assert_matches(y, _dw_pair_ref(x, dw, pw, "relu", "relu6", r))
    with torch.no_grad():  # an NCHW input is read through an NHWC copy
        assert_matches(_dw_pair_call(x.contiguous(), dw, pw, "relu", "relu6", r),
                       _dw_pair_ref(x, dw, pw, "relu", "relu6", r))


def test_depthwise_pointwise_bad_input():
    dw, pw = _dw_pair(8, 16, 3, 1)
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with pytest.raises(ValueError, match="depthwise weight"):
            _dw_pair_call(x[:, :6], dw, pw, "relu", "relu")
        with pytest.raises(ValueError, match="float32"):
            _dw_pair_call(x.double(), dw, pw, "relu", "relu")
        with pytest.raises(ValueError, match="unknown activation"):
            _dw_pair_call(x, dw, pw, "mish", "relu")
        with pytest.raises(ValueError, match="residual of the output's shape"):
            _dw_pair_call(x, dw, pw, "relu", "relu", torch.randn(1, 16, 5, 5))
        with pytest.raises(ValueError, match="pair policy"):
            native.module().set_dw_pair_policy(3)
        y = _dw_pair_call(x[:0], dw, pw, "relu", "relu")  # an empty batch: an empty result
    assert y.shape == (0, 16, 6, 6)
    bad = nn.Conv2d(16, 16, 3, padding=1, bias=False)  # a 3x3 "pointwise" weight
    with torch.no_grad(), pytest.raises(ValueError, match="1x1 weight"):
        native.module().depthwise_pointwise_bn_act(x, dw[0].weight, None, *[None] * 4, 0.0, None, [1, 1], [1, 1],
                                                   [1, 1], "identity", 0.0, bad.weight, None, *[None] * 4, 0.0, None,
                                                   "identity", 0.0)


class _SeparableConv(nn.Module):
    """timm's SeparableConvNormAct: a bare depthwise conv, then 1x1 conv -> BN -> ReLU."""

    def __init__(self, c, cout, stride=1):
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False)
        self.conv_pw = nn.Conv2d(c, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv_pw(self.conv_dw(x))))


class _DsBlock(nn.Module):
    """timm's DepthwiseSeparableConv without SE: dw -> BN -> ReLU6 -> 1x1 -> BN (+ shortcut)."""

    def __init__(self, c, cout):
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = nn.ReLU6()
        self.conv_pw = nn.Conv2d(c, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = c == cout

    def forward(self, x):
        y = self.bn2(self.conv_pw(self.act1(self.bn1(self.conv_dw(x)))))
        return y + x if self.skip else y


@pytest.mark.parametrize("kind", ["sequential", "separable_s2", "ds_skip", "ds"])
def test_depthwise_pointwise_pairs_in_models(kind, dw_pair_policy):
    """A bare depthwise conv before a fused 1x1 unit (a Sequential, timm's SeparableConvNormAct as a
    FusedSequential), and a traced dw -> BN -> act -> 1x1 -> BN (+ shortcut), run as one banded call
    in the steady state and match float64; a hook on the depthwise conv runs it as a module again."""
    dw_pair_policy(1)
    if kind == "sequential":
        model = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.Conv2d(16, 32, 1, bias=False),
                              nn.BatchNorm2d(32), nn.ReLU())
    elif kind == "separable_s2":
        model = _SeparableConv(24, 40, stride=2)
    else:
        model = _DsBlock(24, 24 if kind == "ds_skip" else 32)
    model = randomize_bn(model).eval()
    c_in = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(2, c_in, 14, 14).contiguous(memory_format=torch.channels_last)
    fast = effops.optimize(copy.deepcopy(model), check_speed=False)
    ref = copy.deepcopy(model).double()(x.double())
    with torch.no_grad():
        fast(x)  # plans each conv
        y = _runs_pair(lambda: fast(x))
        assert_matches(y, ref)
        dw = next(m for m in fast.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
        seen = []
        handle = dw.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert_matches(fast(x), ref)
        handle.remove()
        assert len(seen) == 1
        assert_matches(_runs_pair(lambda: fast(x)), ref)


# -- the packed-weight cache ------------------------------------------------------------------

def _module(act=nn.ReLU):
    ref = randomize_bn(nn.Sequential(nn.Conv2d(6, 10, 3, padding=1), nn.BatchNorm2d(10), act())).eval()
    return ref, FusedConvBNAct.from_modules(*copy.deepcopy(list(ref))).eval()


def _x(c=6):
    return torch.randn(2, c, 8, 8).contiguous(memory_format=torch.channels_last)


def test_module_packs_once_and_sees_what_pytorch_counts():
    ref, fused = _module()
    x = _x()
    mod = native.module()
    with torch.no_grad():
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        size = mod.weight_cache_size()
        with torch.profiler.profile() as prof:
            fused(x)
        assert not [e for e in prof.events() if "reorder" in e.name]  # packed once, reused
        assert mod.weight_cache_size() == size
        for change in (lambda m: m[0].weight.mul_(2), lambda m: m[1].running_mean.add_(1),
                       lambda m: setattr(m[0].weight, "data", m[0].weight.data * 0.5),
                       lambda m: m[1].bias.sub_(0.3)):
            change(ref), change(nn.Sequential(fused.conv, fused.bn))
            assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
    # A train-mode forward updates the running statistics without moving their version counters
    # (num_batches_tracked moves, and is part of the key).
    ref.train(), fused.train()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-6)
    ref.eval(), fused.eval()
    with torch.no_grad():
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))


def test_steady_state_reuses_its_arguments_only_while_the_slots_hold():
    """After a full check, a FusedConvBNAct's native calls reuse the tensors it read while every dict
    slot they came from holds the same object (no gradient mode): a weight written straight into
    ``_parameters``, a BN's eps, the BN in train mode, a hook, a weight given another dtype
    through ``.data`` all take effect as in a module that never cached."""
    ref, fused = _module()
    x = _x()
    with torch.no_grad():
        fused(x)
        fused(x)
        plan = fused._native_plan
        assert plan is not None and plan.fast is not None
        w = torch.randn_like(ref[0].weight)
        fused.conv._parameters["weight"] = nn.Parameter(w.clone())
        ref[0]._parameters["weight"] = nn.Parameter(w.clone())
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        fused.bn.eps = ref[1].eps = 0.3
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        fused.bn.train(), ref[1].train()
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-6)
        fused.bn.eval(), ref[1].eval()
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        seen = []
        h = fused.conv.register_forward_hook(lambda m, i, o: seen.append(1))
        fused(x)
        h.remove()
        assert seen == [1]
        fused(x)
        fused.conv.weight.data = fused.conv.weight.data.double()
        twin = copy.deepcopy(fused)
        try:
            y = fused(x)
        except (RuntimeError, TypeError, ValueError) as e:  # the same error as the twin's
            with pytest.raises(type(e), match="dtype"):
                twin(x)
        else:
            torch.testing.assert_close(y, twin(x), rtol=0, atol=0)


def test_writes_pytorch_cannot_see_need_refresh():
    ref, fused = _module()
    x = _x()
    with torch.no_grad():
        before = fused(x).clone()
        for m in (ref[0], fused.conv):
            m.weight.data.mul_(-1)  # .data in place: no version counter moves
        torch.testing.assert_close(fused(x), before)  # documented: the packed weight is still used
        effops.refresh()
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))


def test_inference_tensor_weights_are_packed_per_call():
    with torch.inference_mode():
        ref, fused = _module()  # parameters created in inference mode: no version counters
        x = _x()
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        fused.conv.weight.mul_(2), ref[0].weight.mul_(2)
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))


def test_autograd_and_compile_paths_still_match():
    ref, fused = _module(nn.SiLU)
    x = _x().requires_grad_()
    y = fused(x)  # a gradient is needed: the registered op (native forward, PyTorch backward)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    copy.deepcopy(ref)(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


# -- the build ---------------------------------------------------------------------------------

def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, **{k: v for k, v in env.items() if v is not None})
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                          timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


PREBUILT = any(f.startswith("_native") for f in os.listdir(os.path.dirname(effops.__file__)))


@pytest.mark.skipif(PREBUILT, reason="a prebuilt effops._native is installed: it is loaded instead of a build")
def test_clean_just_in_time_build(tmp_path):
    r = _python("""
        import effops, torch
        ok, detail = effops.native.status()
        print(ok, detail)
        assert ok, detail
        assert "just-in-time" in detail
        """, EFFOPS_NATIVE_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert any(tmp_path.rglob("build.ninja"))  # built with ninja


@pytest.mark.skipif(PREBUILT, reason="a prebuilt effops._native is installed: it is loaded instead of a build")
def test_no_compiler_warns_once_and_runs_the_reference(tmp_path):
    r = _python("""
        import warnings, torch, effops
        from torch import nn
        warnings.simplefilter("always")
        m = effops.FusedConvBNAct(4, 8, 3).eval()
        x = torch.randn(1, 4, 6, 6)
        with warnings.catch_warnings(record=True) as w:
            with torch.no_grad():
                y1, y2 = m(x), m(x)
        msgs = [str(i.message) for i in w if "native CPU backend is unavailable" in str(i.message)]
        assert len(msgs) == 1, [str(i.message) for i in w]
        print(msgs[0])
        ok, why = effops.native.status()
        assert not ok and "building csrc/ failed" in why, why
        ref = m.bn(m.conv(x)).relu()
        torch.testing.assert_close(y1, ref, rtol=1e-5, atol=1e-5)
        assert effops.dispatch.select("conv_bn_act", x, m.conv.weight, None, None, None, None,
                                      [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, True).name == "reference"
        """, EFFOPS_NATIVE_CACHE=str(tmp_path), CXX="/nonexistent/c++", EFFOPS_CPU_BACKEND="native")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "building csrc/ failed" in r.stdout


def test_disabled_by_environment():
    r = _python("""
        import effops
        print(effops.native.status())
        assert effops.native.status() == (False, "disabled by EFFOPS_NATIVE=0")
        """, EFFOPS_NATIVE="0")
    assert r.returncode == 0, r.stdout + r.stderr


def test_winograd_environment_knob():
    r = _python("""
        import effops
        m = effops.native.module()
        assert m is not None and m.winograd_policy() == 0, m
        """, EFFOPS_WINOGRAD="0")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _python("""
        import effops
        effops.native.module()
        """, EFFOPS_WINOGRAD="yes")
    assert r.returncode != 0 and "EFFOPS_WINOGRAD must be 0" in r.stderr, r.stdout + r.stderr


def test_measured_choices_round_trip_as_rows():
    """The per-problem choices leave the extension as (table, flattened key, faster) rows and come
    back: a row taken skips the measurement, a choice measured here is never overwritten, a row
    whose key has the wrong shape or table is ignored."""
    mod = native.module()
    before = mod.measured_choices()
    x = torch.randn(1, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    w = torch.randn(24, 16, 3, 3)
    try:
        mod.clear_measured_choices()
        with torch.no_grad():  # a 3x3 stride-1 conv: Winograd against oneDNN, measured once
            mod.conv_bn_act(x, w, None, None, None, None, None, 1e-5, None, None, [1, 1], [1, 1], [1, 1], 1, "relu",
                            0.0, True, None, 1, None)
        rows = mod.measured_choices()
        assert [(t, f[:1], len(f)) for t, f, _ in rows] == [("alt", [3], 14)]  # Impl::Winograd, 14 integers
        table, flat, faster = rows[0]
        mod.clear_measured_choices()
        bad = [("alt", flat[:-1], True), ("alt", flat + [0], True), ("nope", flat, True), ("alt", [9] + flat[1:], True)]
        assert mod.add_measured_choices(bad + [(table, flat, not faster)]) == 1
        assert mod.measured_choices() == [(table, flat, not faster)]
        assert mod.add_measured_choices([(table, flat, faster)]) == 1  # taken, but the choice held stays
        assert mod.measured_choices() == [(table, flat, not faster)]
        counts = mod.conv_impl_counts(reset=True)
        with torch.no_grad():  # the imported choice decides, nothing is timed
            y = mod.conv_bn_act(x, w, None, None, None, None, None, 1e-5, None, None, [1, 1], [1, 1], [1, 1], 1,
                                "relu", 0.0, True, None, 1, None)
        counts = {k: v for k, v in mod.conv_impl_counts(reset=True).items() if v}
        assert counts == ({"onednn": 1} if faster else {"winograd": 1})
        assert_matches(y, torch.relu(F.conv2d(x.double(), w.double(), padding=1)), fp32_tol=1e-4)
    finally:
        mod.clear_measured_choices()
        mod.add_measured_choices(before)


_CHOICES_SCRIPT = textwrap.dedent("""
    import sys, torch, effops
    from effops import native
    rows = native.module().measured_choices()  # before any call: what the tuning file gave it
    print("AT_LOAD", len(rows))
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16),
                                torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 1, bias=False), torch.nn.BatchNorm2d(16))
    x = torch.randn(1, 8, 20, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        effops.optimize(model.eval(), example_inputs=(x,), check_speed=True)
    print("AFTER", sorted(map(repr, native.module().measured_choices())))
""")


def test_measured_choices_reach_the_next_process_through_the_tuning_file(tmp_path):
    """``effops.optimize`` stores the native convs' choices in the CPU tuning file; the next process
    takes them when the extension loads (no first-call measurements, the same kernels); with
    ``EFFOPS_AUTOTUNE=0`` nothing is read or written."""
    env = dict(os.environ, EFFOPS_CACHE_DIR=str(tmp_path), EFFOPS_AUTOTUNE="1", EFFOPS_TUNING_CACHE="1",
               EFFOPS_CPU_BACKEND="native", EFFOPS_CHECK_SPEED="1")

    def run(**extra):
        proc = subprocess.run([sys.executable, "-c", _CHOICES_SCRIPT], capture_output=True, text=True,
                              env=dict(env, **extra), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("AT_LOAD", "AFTER")))
        return int(lines["AT_LOAD"]), lines["AFTER"]

    loaded, first = run()
    assert loaded == 0 and first != "[]"  # the first process measured (and stored) its choices
    files = list(tmp_path.glob("tuning-cpu-*.json"))
    assert len(files) == 1 and "native-choice" in files[0].read_text()
    loaded, second = run()
    assert loaded == len(eval(first)) and second == first  # taken at load: the same choices, none new
    loaded, _ = run(EFFOPS_AUTOTUNE="0")
    assert loaded == 0
