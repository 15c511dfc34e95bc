"""Shuffled writes (ShuffleNet V1 / E-ELAN): ``conv_bn_act(..., out_shuffle_groups=g)`` equals
``channel_shuffle(conv_bn_act(...), g)``, the kernel storing each output channel at its
shuffled position (no extra pass), and ``FusedConvBNAct.forward(..., out_shuffle_groups=g)``."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effops import use_backend
from effops.nn.conv_bn_act import FusedConvBNAct
from effops.ops import conv, reference
from effops.ops.conv import _run_triton, conv_bn_act
from effops.views import ChannelView

from helpers import DTYPES, KERNEL_DEVICE, assert_matches, count_dispatch, needs_triton, randomize_bn

DEV = KERNEL_DEVICE
NHWC = torch.channels_last

# name: (N, C_in, H, W, C_out, kernel, stride, padding, groups, shuffle groups)
CASES = {
    "1x1_g2": (3, 6, 7, 7, 8, 1, 1, 0, 1, 2),
    "3x3_g3": (1, 5, 13, 13, 12, 3, 2, 1, 1, 3),
    "grouped_g4": (3, 8, 7, 7, 16, 1, 1, 0, 4, 4),    # ShuffleNet V1's grouped 1x1, then the shuffle
    "depthwise_g8": (1, 16, 7, 7, 16, 3, 1, 1, 16, 8),
    "1px_g2": (3, 5, 1, 1, 6, 3, 1, 1, 1, 2),
}


def _problem(name, dtype=torch.float32, layout="nhwc"):
    n, cin, h, w, cout, k, s, p, g, sg = CASES[name]
    x = torch.randn(n, cin, h, w)
    if layout == "nhwc":
        x = x.contiguous(memory_format=NHWC)
    wt = torch.randn(cout, cin // g, k, k) / (cin // g * k * k) ** 0.5
    scale, bias = torch.rand(cout) + 0.5, torch.randn(cout)
    kw = dict(stride=s, padding=p, groups=g)
    return x.to(DEV, dtype), wt.to(DEV, dtype), scale.to(DEV), bias.to(DEV), kw, sg


def _ref64(x, w, scale, bias, kw, sg, act="identity", residual=None, after=False):
    pair = lambda v: (v, v)  # noqa: E731
    y = reference.conv_scale_bias_act(
        x.double(), w.double(), scale.double(), bias.double(), None if residual is None else residual.double(),
        pair(kw["stride"]), pair(kw["padding"]), (1, 1), kw["groups"], act, 0.0, after)
    return reference.channel_shuffle(y, sg)


def _torch_same_dtype(x, w, scale, bias, kw, sg, act):
    y = F.conv2d(x, w, None, **kw) * scale.to(x.dtype).view(1, -1, 1, 1) + bias.to(x.dtype).view(1, -1, 1, 1)
    return reference.channel_shuffle(getattr(F, act)(y), sg)


def test_reference_is_channel_shuffle_after_the_conv():
    x, w, scale, bias, kw, sg = _problem("3x3_g3")
    y = reference.conv_scale_bias_act(x, w, scale, bias, None, (2, 2), (1, 1), (1, 1), 1, "relu", 0.0, False,
                                      out_shuffle_groups=sg)
    plain = reference.conv_scale_bias_act(x, w, scale, bias, None, (2, 2), (1, 1), (1, 1), 1, "relu")
    # Output channel j * g + i is conv channel i * (C // g) + j.
    cpg = 12 // sg
    for co in range(12):
        torch.testing.assert_close(y[:, (co % cpg) * sg + co // cpg], plain[:, co], rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_shuffled_write_matches_reference(name, dtype):
    layout = "nchw" if name in ("3x3_g3", "1px_g2") else "nhwc"
    x, w, scale, bias, kw, sg = _problem(name, dtype, layout)
    with use_backend("triton"):
        y = conv_bn_act(x, w, scale, bias, act="relu", out_shuffle_groups=sg, **kw)
    assert y.dtype == dtype and y.is_contiguous(memory_format=NHWC if layout == "nhwc" else torch.contiguous_format)
    assert_matches(y, _ref64(x, w, scale, bias, kw, sg, "relu"),
                   None if dtype == torch.float32 else _torch_same_dtype(x, w, scale, bias, kw, sg, "relu"))


@needs_triton
@pytest.mark.parametrize("name, residual", [("1x1_g2", "before"), ("grouped_g4", "after"),
                                            ("depthwise_g8", "after")])
def test_residual_is_in_conv_order_and_the_write_lands_in_a_strided_view(name, residual):
    """ShuffleNet V2's pattern: the branch writes its shuffled result into every second channel
    of the unit's output buffer (NaN-poisoned: nothing else is written). The residual is added
    in the conv's channel order, before the shuffle."""
    x, w, scale, bias, kw, sg = _problem(name)
    ref_shape = _ref64(x, w, scale, bias, kw, 1).shape
    res = torch.randn(ref_shape, device=DEV)
    after = residual == "after"
    n, c, h, wd = ref_shape
    buf = torch.full((n, 2 * c, h, wd), float("nan"), device=DEV).contiguous(memory_format=NHWC)
    with use_backend("triton"):
        conv_bn_act(x, w, scale, bias, res, act="silu", residual_after_act=after, out_shuffle_groups=sg,
                    out=ChannelView(buf, 1, 2), **kw)
    assert_matches(buf[:, 1::2], _ref64(x, w, scale, bias, kw, sg, "silu", res, after))
    assert torch.isnan(buf[:, 0::2]).all()


@needs_triton
@pytest.mark.parametrize("name", ["1x1_g2", "3x3_g3", "depthwise_g8"])
def test_shuffled_int64_addressing_path(name):
    x, w, scale, bias, kw, sg = _problem(name)
    ref = _ref64(x, w, scale, bias, kw, sg, "relu")
    out = torch.full(ref.shape, float("nan"), device=DEV).contiguous(memory_format=NHWC)
    pair = lambda v: [v, v]  # noqa: E731
    _run_triton(x, w, scale, bias, None, out, pair(kw["stride"]), pair(kw["padding"]), [1, 1], kw["groups"], "relu",
                0.0, False, None, sg, force_int64=True)
    assert_matches(out, ref)


@needs_triton
def test_shuffled_write_into_views_past_2_31_elements(monkeypatch):
    """The shuffled channel index times a huge channel stride (tests/test_int64.py's views)."""
    from test_int64 import HugeViews, check, ints, spy

    k = spy(monkeypatch, conv, "_conv_bn_act_kernel")
    hv = HugeViews(4)
    x = hv.filled(0, ints(1, 4, 2, 3))
    out = hv.poisoned(1, (1, 4, 2, 3))
    w = ints(4, 4, 1, 1)
    scale, bias = ints(4, dtype=torch.float32), ints(4, dtype=torch.float32)
    with use_backend("triton"):  # the Triton kernel's IDX64 path is what is tested
        conv_bn_act(x, w, scale, bias, out=out, out_shuffle_groups=2)
    assert [(m["IDX64"], m["SHUFFLE_G"]) for m in k.launches] == [(True, 2)]
    y = F.conv2d(x.double().cpu(), w.double().cpu()) * scale.double().cpu().view(1, -1, 1, 1)
    check(out, reference.channel_shuffle(y + bias.double().cpu().view(1, -1, 1, 1), 2))


@needs_triton
def test_tma_kernel_writes_shuffled():
    """The TMA kernel shares the epilogue: a forced TMA tile honours the shuffle too."""
    x = torch.randn(2, 16, 5, 6, device=DEV).contiguous(memory_format=NHWC)
    w = (torch.randn(8, 16, 3, 3, device=DEV) / 12).contiguous(memory_format=NHWC)
    scale, bias = torch.rand(8, device=DEV) + 0.5, torch.randn(8, device=DEV)
    out = torch.full((2, 8, 5, 6), float("nan"), device=DEV).contiguous(memory_format=NHWC)
    tile = dict(TMA=True, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=3)
    if DEV == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("this GPU has no TMA (sm_90+)")
    _run_triton(x, w, scale, bias, None, out, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, False, None, 4, config=tile)
    assert_matches(out, _ref64(x, w, scale, bias, dict(stride=1, padding=1, groups=1), 4, "relu"))


@needs_triton
def test_empty_batch():
    x, w, scale, bias, kw, sg = _problem("1x1_g2")
    with use_backend("triton"):
        assert conv_bn_act(x[:0], w, scale, bias, out_shuffle_groups=sg, **kw).shape == (0, 8, 7, 7)


def test_vendor_configs_refuse_a_shuffled_write(monkeypatch):
    x, w, scale, bias, kw, sg = _problem("1x1_g2")
    monkeypatch.setattr(conv, "_cudnn_usable", lambda t: True)
    assert conv._vendor_candidates(x, None, "relu", False, None, 2) == []
    with pytest.raises(ValueError, match="shuffled write"):
        _run_triton(x, w, scale, bias, None, None, [1, 1], [0, 0], [1, 1], 1, "relu", 0.0, False, None, 2,
                    config={"VENDOR": "cudnn"})


@pytest.mark.parametrize("sg", [0, 3, -2, 2.0, True])
def test_bad_shuffle_groups(sg):
    x, w, scale, bias, kw, _ = _problem("1x1_g2")
    with pytest.raises(ValueError, match="out_shuffle_groups must be an int >= 1 dividing the 8 output channels"):
        conv_bn_act(x, w, scale, bias, out_shuffle_groups=sg, **kw)


# --- autograd, the registered ops -----------------------------------------------------------------

@pytest.mark.parametrize("name, after", [("3x3_g3", False), ("grouped_g4", True)])
def test_gradcheck_fp64(name, after):
    """The backward un-shuffles the incoming gradient (a shuffle with C // g groups)."""
    x, w, scale, bias, kw, sg = _problem(name, torch.float64)
    x = x[:2, :, :5, :5]
    res = torch.randn(_ref64(x, w, scale, bias, kw, 1).shape, dtype=torch.float64, device=DEV)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, scale, bias, res)]

    def f(x, w, s, b, r):
        return conv_bn_act(x, w, s, b, r, act="silu", residual_after_act=after, out_shuffle_groups=sg, **kw)

    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)  # random projections of the Jacobian
    if after:  # the residual's gradient is the output's, un-shuffled (a shuffle with C // g groups)
        y = f(*leaves)
        g_out = torch.randn_like(y)
        (g_res,) = torch.autograd.grad(y, leaves[4], g_out)
        torch.testing.assert_close(g_res, reference.channel_shuffle(g_out, y.shape[1] // sg), rtol=0, atol=0)


@needs_triton
def test_opcheck_with_shuffle():
    x, w, scale, bias, kw, sg = _problem("1x1_g2")
    x = x[:2, :, :3, :3]  # tiny: opcheck launches the kernel many times
    args = (x, w.requires_grad_(), scale, bias, None, [1, 1], [0, 0], [1, 1], 1, "relu", 0.0, False, None, sg)
    torch.library.opcheck(torch.ops.effops.conv_bn_act.default, args)
    out = torch.empty(2, 8, 3, 3, device=DEV)
    torch.library.opcheck(torch.ops.effops.conv_bn_act_out.default, (x, w.detach(), *args[2:12], out, None, sg))


# --- FusedConvBNAct(out_shuffle_groups=) ----------------------------------------------------------

def _module():
    torch.manual_seed(1)
    m = randomize_bn(FusedConvBNAct(6, 12, 1, groups=3, act="relu")).to(DEV)
    return m, nn.Sequential(m.conv, m.bn, m.act)


@needs_triton
def test_module_eval_runs_one_fused_call_into_a_view(monkeypatch):
    m, eager = _module()
    m.eval()
    x = torch.randn(2, 6, 5, 5, device=DEV).contiguous(memory_format=NHWC)
    buf = torch.full((2, 24, 5, 5), float("nan"), device=DEV).contiguous(memory_format=NHWC)
    calls = count_dispatch(monkeypatch)
    with torch.no_grad(), use_backend("triton"):
        y = m(x, out_shuffle_groups=3)
        got = m(x, out=buf[:, 1::2], out_shuffle_groups=4)
        ref = eager(x)
    assert calls == ["conv_bn_act", "conv_bn_act"]
    torch.testing.assert_close(y, reference.channel_shuffle(ref, 3), rtol=1e-5, atol=1e-5)
    assert got.data_ptr() == buf[:, 1::2].data_ptr() and torch.isnan(buf[:, 0::2]).all()
    torch.testing.assert_close(buf[:, 1::2], reference.channel_shuffle(ref, 4), rtol=1e-5, atol=1e-5)


def test_module_train_is_exact():
    m, eager = _module()
    m.train()
    twin = copy.deepcopy(eager)  # its BN starts from the same running statistics
    x = torch.randn(2, 6, 5, 5, device=DEV, requires_grad=True)
    y = m(x, out_shuffle_groups=3)
    x2 = x.detach().clone().requires_grad_()
    ref = reference.channel_shuffle(twin(x2), 3)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    y.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(m.bn.running_var, twin[1].running_var, rtol=0, atol=0)


def test_module_bad_shuffle_groups():
    m, _ = _module()
    m.eval()
    with pytest.raises(ValueError, match="out_shuffle_groups must be"), torch.no_grad():
        m(torch.randn(1, 6, 3, 3, device=DEV), out_shuffle_groups=5)
    m.train()
    with pytest.raises(ValueError, match="out_shuffle_groups must be"):
        m(torch.randn(1, 6, 3, 3, device=DEV), out_shuffle_groups=5)
