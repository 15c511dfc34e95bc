"""A per-(image, input channel) gate applied as the conv kernels load their input:
``conv_bn_act(x, ..., gate=g) == conv_bn_act(x * g[:, :, None, None], ...)`` without the
gated tensor (an inverted residual's SE gate inside its project conv), and
``FusedConvBNAct.forward(..., out=, gate=)``."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effops import dispatch, use_backend
from effops.activations import apply_activation
from effops.nn.conv_bn_act import FusedConvBNAct
from effops.ops import conv, reference
from effops.ops.conv import _run_triton, conv_bn_act
from effops.views import ChannelView

from helpers import (DTYPES, KERNEL_DEVICE, assert_matches, count_dispatch, device_branch, needs_triton,
                     randomize_bn)

DEV = KERNEL_DEVICE
NHWC = torch.channels_last

# (N, C_in, H, W, C_out, kernel, stride, padding, groups)
GEOMETRIES = {
    "1x1": (3, 12, 7, 7, 10, 1, 1, 0, 1),          # the POINTWISE GEMM loop
    "3x3": (1, 6, 13, 13, 8, 3, 2, 1, 1),          # the general K loop, stride 2
    "grouped": (3, 8, 7, 7, 12, 3, 1, 1, 4),
    "depthwise": (1, 10, 13, 13, 10, 3, 1, 1, 10),  # the depthwise kernel
    "1px": (3, 5, 1, 1, 7, 3, 1, 1, 1),           # one pixel: all taps but the centre are padding
}


def _problem(name, dtype=torch.float32, layout="nhwc", gate_dtype=torch.float32):
    n, cin, h, w, cout, k, s, p, g = GEOMETRIES[name]
    x = torch.randn(n, cin, h, w)
    if layout == "nhwc":
        x = x.contiguous(memory_format=NHWC)
    wt = torch.randn(cout, cin // g, k, k) / (cin // g * k * k) ** 0.5
    scale, bias = torch.rand(cout) + 0.5, torch.randn(cout)
    gate = torch.rand(n, cin)
    kw = dict(stride=s, padding=p, groups=g)
    return (x.to(DEV, dtype), wt.to(DEV, dtype), scale.to(DEV), bias.to(DEV), gate.to(DEV, gate_dtype), kw)


def _ref64(x, w, scale, bias, gate, kw, act="identity", residual=None, after=False):
    pair = lambda v: (v, v)  # noqa: E731
    return reference.conv_scale_bias_act(
        x.double(), w.double(), scale.double(), bias.double(), None if residual is None else residual.double(),
        pair(kw["stride"]), pair(kw["padding"]), (1, 1), kw["groups"], act, 0.0, after, gate.double())


def _torch_same_dtype(x, w, scale, bias, gate, kw, act="identity", residual=None, after=False):
    """Eager PyTorch in the input dtype: the SE multiply, conv, BN and act each rounded."""
    y = F.conv2d(x * gate.to(x.dtype)[:, :, None, None], w, None, **kw)
    y = y * scale.to(x.dtype).view(1, -1, 1, 1) + bias.to(x.dtype).view(1, -1, 1, 1)
    if residual is not None and not after:
        y = y + residual
    y = apply_activation(y, act)
    return y + residual if (residual is not None and after) else y


# --- the kernels against the fp64 reference ------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_gated_conv_matches_reference(name, dtype):
    # NCHW for two geometries, NHWC for the rest; the gate in x's dtype for half types on the
    # 3x3 case (both gate dtypes are accepted).
    layout = "nchw" if name in ("3x3", "grouped") else "nhwc"
    gate_dtype = dtype if name == "3x3" else torch.float32
    x, w, scale, bias, gate, kw = _problem(name, dtype, layout, gate_dtype)
    with use_backend("triton"):
        y = conv_bn_act(x, w, scale, bias, act="relu6", gate=gate, **kw)
    assert y.dtype == dtype and y.is_contiguous(memory_format=NHWC if layout == "nhwc" else torch.contiguous_format)
    assert_matches(y, _ref64(x, w, scale, bias, gate, kw, "relu6"),
                   None if dtype == torch.float32 else _torch_same_dtype(x, w, scale, bias, gate, kw, "relu6"))


@needs_triton
@pytest.mark.parametrize("name, residual", [("1x1", "before"), ("3x3", "after"), ("depthwise", "after")])
def test_gate_with_residual_into_a_strided_channel_view(name, residual):
    """Scale, bias, residual and act with the gate, written into every second channel of a
    NaN-poisoned buffer (ChannelView with a step): nothing else is touched."""
    x, w, scale, bias, gate, kw = _problem(name)
    cout = w.shape[0]
    ref_shape = _ref64(x, w, scale, bias, gate, kw).shape
    res = torch.randn(ref_shape, device=DEV)
    after = residual == "after"
    buf = torch.full((ref_shape[0], 2 * cout + 1, *ref_shape[2:]), float("nan"), device=DEV).contiguous(
        memory_format=NHWC)
    with use_backend("triton"):
        got = conv_bn_act(x, w, scale, bias, res, act="silu", residual_after_act=after, gate=gate, **kw,
                          out=ChannelView(buf, 1, 2))
    assert got.data_ptr() == buf[:, 1::2].data_ptr()
    assert_matches(buf[:, 1::2], _ref64(x, w, scale, bias, gate, kw, "silu", res, after))
    assert torch.isnan(buf[:, 0::2]).all()


@needs_triton
def test_gate_that_is_a_strided_view():
    """The gate is read through its strides (here a transposed [C, N] tensor)."""
    x, w, scale, bias, gate, kw = _problem("1x1")
    gate_t = gate.t().contiguous().t()
    assert not gate_t.is_contiguous()
    with use_backend("triton"):
        y = conv_bn_act(x, w, scale, bias, gate=gate_t, **kw)
    assert_matches(y, _ref64(x, w, scale, bias, gate, kw))


@needs_triton
@pytest.mark.parametrize("name", ["1x1", "3x3", "depthwise"])
def test_gated_int64_addressing_path(name):
    """The IDX64 variants of the gated kernels (forced on a small problem) give the same result."""
    x, w, scale, bias, gate, kw = _problem(name)
    out = torch.full(_ref64(x, w, scale, bias, gate, kw).shape, float("nan"), device=DEV).contiguous(
        memory_format=NHWC)
    pair = lambda v: [v, v]  # noqa: E731
    _run_triton(x, w, scale, bias, None, out, pair(kw["stride"]), pair(kw["padding"]), [1, 1], kw["groups"], "relu",
                0.0, False, gate, force_int64=True)
    assert_matches(out, _ref64(x, w, scale, bias, gate, kw, "relu"))


@needs_triton
def test_gated_conv_on_views_past_2_31_elements(monkeypatch):
    """A real int64 problem (tests/test_int64.py's huge views: channel * stride products pass
    2**31): the gated pointwise kernel picks IDX64 by itself and reads every channel right."""
    from test_int64 import HugeViews, check, ints, spy

    k = spy(monkeypatch, conv, "_conv_bn_act_kernel")
    hv = HugeViews(4)
    x = hv.filled(0, ints(2, 4, 2, 3))
    out = hv.poisoned(1, (2, 4, 2, 3))
    w = ints(4, 4, 1, 1)
    scale, bias = ints(4, dtype=torch.float32), ints(4, dtype=torch.float32)
    gate = ints(2, 4, dtype=torch.float32) * 0.5  # exact in fp16
    with use_backend("triton"):  # the Triton kernel's IDX64 path is what is tested
        conv_bn_act(x, w, scale, bias, gate=gate, out=out)
    assert [(m["POINTWISE"], m["IDX64"], m["HAS_GATE"]) for m in k.launches] == [(True, True, True)]
    xg = x.double().cpu() * gate.double().cpu()[:, :, None, None]
    ref = F.conv2d(xg, w.double().cpu()) * scale.double().cpu().view(1, -1, 1, 1) + bias.double().cpu().view(
        1, -1, 1, 1)
    check(out, ref)


@needs_triton
def test_empty_batch():
    x, w, scale, bias, gate, kw = _problem("3x3")
    with use_backend("triton"):
        y = conv_bn_act(x[:0], w, scale, bias, gate=gate[:0], **kw)
    assert y.shape == (0, 8, 7, 7)


# --- what can't take a gate: TMA tiles and cuDNN ---------------------------------------------------

@needs_triton
def test_tma_and_vendor_configs_refuse_a_gate(monkeypatch):
    x, w, scale, bias, gate, kw = _problem("1x1")
    w = w.contiguous(memory_format=NHWC)
    out = torch.empty(3, 10, 7, 7, device=DEV).contiguous(memory_format=NHWC)
    args = (x, w, scale, bias, None, out, [1, 1], [0, 0], [1, 1], 1, "relu", 0.0, False, gate)
    tma = dict(TMA=True, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=3)
    with pytest.raises(ValueError, match="TMA kernel"):
        _run_triton(*args, config=tma)
    with pytest.raises(ValueError, match="gated input"):
        _run_triton(*args, config={"VENDOR": "cudnn"})
    monkeypatch.setattr(conv, "_cudnn_usable", lambda t: True)
    assert conv._vendor_candidates(x, None, "relu", False) != []
    assert conv._vendor_candidates(x, None, "relu", False, gate) == []


@needs_triton
def test_tuner_offers_no_tma_tile_for_a_gated_call(monkeypatch):
    """On the device path the candidates of a gated call have no TMA tile and no cuDNN config,
    and the gate is part of the tuning key (a plain call of the same shapes is its own problem)."""
    import triton.testing

    from effops import tuning

    device_branch(monkeypatch, autotune=True)
    monkeypatch.setattr(conv, "_cudnn_usable", lambda t: True)
    offered = []
    pointer = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=3)
    monkeypatch.setattr(conv, "_candidates", lambda ci, co, tma=0: offered.append(tma) or [pointer])
    timed = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: timed.append(fn()) or 1.0)
    x, w, scale, bias, gate, kw = _problem("1x1")
    x = torch.randn(3, 16, 7, 7, device=DEV).contiguous(memory_format=NHWC)  # TMA-eligible channels
    w = torch.randn(10, 16, 1, 1, device=DEV).contiguous(memory_format=NHWC) / 4
    gate = torch.rand(3, 16, device=DEV)
    with use_backend("triton"):
        y = conv_bn_act(x, w, scale, bias, act="relu", gate=gate)
    assert offered == [0] and len(timed) == 1  # no TMA tile offered, no cuDNN timed
    assert_matches(y, _ref64(x, w, scale, bias, gate, dict(stride=1, padding=0, groups=1), "relu"))
    (key,) = tuning._CACHE
    assert ("gate", True) in key[1]


# --- autograd, the registered ops -----------------------------------------------------------------

@pytest.mark.parametrize("name, after", [("3x3", False), ("grouped", True), ("depthwise", False)])
def test_gradcheck_fp64(name, after):
    """Gradients for x, weight, scale, bias, residual and the gate (fp64: the reference backend
    runs; the backward formula is the op's, shared by every backend): all inputs together by
    gradcheck's random projections of the Jacobian (fast_mode), and for the 3x3 case every
    gate element on its own."""
    x, w, scale, bias, gate, kw = _problem(name, torch.float64)
    x, gate = x[:2, :, :5, :5], gate[:2]
    x = torch.cat([x, x.flip(0)])[:2]  # two images (the 3x3 case has one), so the gate differs per image
    gate = torch.cat([gate, gate.flip(1)])[:2]
    res = torch.randn(_ref64(x, w, scale, bias, gate, kw).shape, dtype=torch.float64, device=DEV)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, scale, bias, res, gate)]

    def f(x, w, s, b, r, g):
        return conv_bn_act(x, w, s, b, r, act="silu", residual_after_act=after, gate=g, **kw)

    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)
    if name == "3x3":
        only_gate = [leaves[i].detach() if i < 5 else leaves[i] for i in range(6)]
        assert torch.autograd.gradcheck(f, only_gate)


@needs_triton
def test_gate_gradients_through_the_triton_forward():
    """fp32 through the kernel: the op's gradients equal autograd of eager PyTorch."""
    x, w, scale, bias, gate, kw = _problem("3x3")
    leaves = [t.clone().requires_grad_() for t in (x, w, gate)]
    with use_backend("triton"):
        y = conv_bn_act(leaves[0], leaves[1], scale, bias, act="hardswish", gate=leaves[2], **kw)
    g_out = torch.randn_like(y)
    y.backward(g_out)
    eager = [t.clone().requires_grad_() for t in (x, w, gate)]
    ye = F.conv2d(eager[0] * eager[2][:, :, None, None], eager[1], None, **kw)
    ye = F.hardswish(ye * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    ye.backward(g_out)
    assert_matches(y.detach(), ye.detach().double())
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@needs_triton
def test_opcheck_with_gate():
    x, w, scale, bias, gate, kw = _problem("1x1")
    x, gate = x[:2, :, :3, :3], gate[:2]  # tiny: opcheck launches the kernel many times
    args = (x, w, scale, bias, None, [1, 1], [0, 0], [1, 1], 1, "relu", 0.0, False, gate.requires_grad_(), 1)
    torch.library.opcheck(torch.ops.effops.conv_bn_act.default, args)
    out = torch.empty(2, 10, 3, 3, device=DEV)
    torch.library.opcheck(torch.ops.effops.conv_bn_act_out.default, (*args[:12], out, gate.detach(), 1))


def test_reference_backend_matches():
    x, w, scale, bias, gate, kw = _problem("3x3")
    with use_backend("reference"):
        y = conv_bn_act(x, w, scale, bias, act="relu", gate=gate, **kw)
    assert_matches(y, _ref64(x, w, scale, bias, gate, kw, "relu"))


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, err, match", [
    (lambda g: g[:, :5], ValueError, r"gate of shape \(N, C_in\) = \(3, 12\)"),
    (lambda g: g[:1], ValueError, r"gate of shape \(N, C_in\) = \(3, 12\)"),
    (lambda g: g[:, :, None], ValueError, r"gate of shape"),
    (lambda g: g.half(), TypeError, "float32 or the input's dtype"),
    (lambda g: g.to("meta"), ValueError, "expected the same device"),
    (lambda g: g.tolist(), TypeError, "expected gate to be a tensor"),
])
def test_bad_gate_is_refused(bad, err, match):
    x, w, scale, bias, gate, kw = _problem("1x1")
    with pytest.raises(err, match=match):
        conv_bn_act(x, w, scale, bias, gate=bad(gate), **kw)


def test_out_with_a_gate_that_needs_grad_is_refused():
    x, w, scale, bias, gate, kw = _problem("1x1")
    with pytest.raises(RuntimeError, match="inference-only"):
        conv_bn_act(x, w, scale, bias, gate=gate.requires_grad_(), out=torch.empty(3, 10, 7, 7, device=DEV))


def test_out_overlapping_the_gate_is_refused():
    x, w, scale, bias, _, kw = _problem("1x1")
    store = torch.zeros(3 * 10 * 49, device=DEV)
    with pytest.raises(ValueError, match="out overlaps gate"):
        conv_bn_act(x, w, scale, bias, gate=store[:36].view(3, 12), out=store.view(3, 10, 7, 7))


# --- FusedConvBNAct(out=, gate=) ------------------------------------------------------------------

def _module(groups=1):
    torch.manual_seed(1)
    m = randomize_bn(FusedConvBNAct(8, 8, 3, groups=groups, act="hardswish")).to(DEV)
    eager = nn.Sequential(m.conv, m.bn, m.act)  # the same modules, called as PyTorch would
    return m, eager


@needs_triton
@pytest.mark.parametrize("groups", [1, 8], ids=["dense", "depthwise"])
def test_module_eval_gate_and_out_run_fused(monkeypatch, groups):
    m, eager = _module(groups)
    m.eval()
    x = torch.randn(3, 8, 7, 7, device=DEV).contiguous(memory_format=NHWC)
    gate = torch.rand(3, 8, device=DEV)
    calls = count_dispatch(monkeypatch)
    buf = torch.full((3, 16, 7, 7), float("nan"), device=DEV).contiguous(memory_format=NHWC)
    with torch.no_grad(), use_backend("triton"):
        y = m(x, gate=gate)
        got = m(x, gate=gate, out=buf[:, 1::2])
    assert calls == ["conv_bn_act", "conv_bn_act"]
    with torch.no_grad():
        ref = _fp64_copy(eager)(x.double() * gate.double()[:, :, None, None])
    assert_matches(y, ref)
    assert got.data_ptr() == buf[:, 1::2].data_ptr()
    assert_matches(buf[:, 1::2], ref) and torch.isnan(buf[:, 0::2]).all()


def _fp64_copy(mod):
    import copy

    return copy.deepcopy(mod).double()


@needs_triton
def test_module_eval_with_grad_copies_into_out_and_gets_gate_gradients():
    """Eval with autograd: the registered op runs, gradients reach the gate and the conv weight,
    and ``out`` receives a recorded copy."""
    m, eager = _module()
    m.eval()
    x = torch.randn(2, 8, 5, 5, device=DEV)
    gate = torch.rand(2, 8, device=DEV, requires_grad=True)
    buf = torch.zeros(2, 16, 5, 5, device=DEV)
    with use_backend("triton"):
        got = m(x, gate=gate, out=buf[:, 8:])
    got.sum().backward()
    gate_e = gate.detach().clone().requires_grad_()
    ye = eager(x * gate_e[:, :, None, None])
    ye.sum().backward()
    torch.testing.assert_close(buf[:, 8:], ye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gate.grad, gate_e.grad, rtol=1e-4, atol=1e-5)


def test_module_train_is_exact_with_gate_and_out():
    """train(): the modules run on ``x * gate`` (exact PyTorch, running stats updated the same),
    then the result is copied into ``out``."""
    m, _ = _module()
    twin = _fp64_copy(m).float()
    m.train(), twin.train()
    x = torch.randn(3, 8, 6, 6, device=DEV)
    gate = torch.rand(3, 8, device=DEV)
    buf = torch.zeros(3, 24, 6, 6, device=DEV)
    got = m(x, gate=gate, out=ChannelView(buf, 8, 1, 8))
    ref = twin.act(twin.bn(twin.conv(x * gate[:, :, None, None])))
    assert got.data_ptr() == buf[:, 8:16].data_ptr()
    torch.testing.assert_close(buf[:, 8:16], ref, rtol=0, atol=0)
    torch.testing.assert_close(m.bn.running_mean, twin.bn.running_mean, rtol=0, atol=0)
    assert (buf[:, :8] == 0).all() and (buf[:, 16:] == 0).all()


def test_module_hooks_see_the_gated_input():
    m, _ = _module()
    m.eval()
    seen = []
    h = m.conv.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x, gate = torch.randn(2, 8, 5, 5, device=DEV), torch.rand(2, 8, device=DEV)
    with torch.no_grad():
        m(x, gate=gate)
    h.remove()
    torch.testing.assert_close(seen[0], x * gate[:, :, None, None], rtol=0, atol=0)


def test_module_bad_gate_and_out():
    m, _ = _module()
    m.eval()
    x = torch.randn(2, 8, 5, 5, device=DEV)
    with pytest.raises(ValueError, match=r"gate of shape \(N, C_in\) = \(2, 8\)"), torch.no_grad():
        m(x, gate=torch.rand(1, 8, device=DEV))
    with pytest.raises(ValueError, match="expected out of shape"), torch.no_grad():
        m(x, out=torch.empty(2, 8, 4, 4, device=DEV))
    m.train()
    with pytest.raises(ValueError, match=r"gate of shape"):
        m(x, gate=torch.rand(2, 4, device=DEV))


def test_module_empty_batch_with_gate():
    m, _ = _module()
    x = torch.randn(0, 8, 5, 5, device=DEV)
    for mode in (m.eval, m.train):
        mode()
        with torch.no_grad():
            assert m(x, gate=torch.rand(0, 8, device=DEV)).shape == (0, 8, 5, 5)
