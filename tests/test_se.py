"""Squeeze-and-excitation: ``effops.ops.se`` (``se_gate``, ``se_apply``: Triton kernels, registered
ops, references) and ``effops.nn.se.SqueezeExcite`` (the drop-in module and its converter rule).

Kernels against the fp64 reference: C in {8, 24, 30}, R in {2, 6} or effective SE, 1x1 / 7x7 /
13x13 images, batch 1 and 3, NCHW / NHWC / channel views, float32/16/bf16 inputs (the gate is
float32 whatever the input), the act/gate pairs of the listed models (ReLU, SiLU, Hardswish x
Sigmoid, Hardsigmoid) and every activation once as each, with and without biases, the
excitation in one launch and in one per layer, the device-branch tiles and the tuner's
candidates, 64-bit addressing. ``se_apply`` with and without residual and activation, into a
channel view. Gradients (gradcheck in fp64, and the Triton forward against PyTorch's
autograd), bad input, empty batch, torch.compile, opcheck. The module: every ``from_module``
flavour in eval and train, state_dict keys and shared parameters, ``.data`` writes, replaced
children, hooks, autocast, ``forward_residual``, ``gate_of``, and ``effops.optimize``.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effops
from effops.ops.conv import native_fast
from effops import ChannelView, dispatch
from effops.activations import ACTIVATIONS, apply_activation
from effops.nn.osa import EffectiveSE, ese_fc_of
from effops.nn.se import SqueezeExcite
from effops.ops import reference, se
from effops.ops.se import se_apply, se_gate

from helpers import KERNEL_DEVICE, assert_matches, count_dispatch, device_branch, needs_triton

DEV = KERNEL_DEVICE
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from effops.models.classic_vovnet import eSEModule  # noqa: E402
from timm.layers.squeeze_excite import EffectiveSEModule, SEModule  # noqa: E402
from timm.models._efficientnet_blocks import SqueezeExcite as TimmEffSE  # noqa: E402
from torchvision.ops.misc import SqueezeExcitation  # noqa: E402


def _input(layout, n, c, hw, dtype=torch.float32):
    """``layout``: "nchw", "nhwc", or "view" (channels 1, 3, 5, ... of an NHWC buffer)."""
    if layout == "view":
        buf = torch.randn(n, 2 * c + 1, hw, hw, device=DEV).to(dtype).contiguous(memory_format=torch.channels_last)
        return buf[:, 1::2][:, :c]
    x = torch.randn(n, c, hw, hw, device=DEV).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x


def _weights(c, r, bias, linear=False):
    """(reduce_weight, reduce_bias, expand_weight, expand_bias); r None: effective SE."""
    tail = () if linear else (1, 1)
    k = c if r is None else r
    rw = None if r is None else torch.randn(r, c, *tail, device=DEV) * 0.5
    rb = None if r is None or not bias else torch.randn(r, device=DEV)
    ew = torch.randn(c, k, *tail, device=DEV) * 0.5
    eb = torch.randn(c, device=DEV) if bias else None
    return rw, rb, ew, eb


def _d(t):
    return None if t is None else t.double()


def _gate64(x, rw, rb, ew, eb, act="relu", gate="sigmoid", act_param=0.0, gate_param=0.0):
    return reference.se_gate(x.double(), _d(rw), _d(rb), ew.double(), _d(eb), act, act_param, gate, gate_param)


# ---------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------
def test_references_match_the_modules():
    m = SEModule(12, rd_channels=3).double()
    x = torch.randn(2, 12, 5, 4, dtype=torch.float64)
    g = reference.se_gate(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, "relu", 0.0, "sigmoid")
    assert g.shape == (2, 12) and g.dtype == torch.float64
    torch.testing.assert_close(reference.se_apply(x, g), m(x), rtol=1e-12, atol=1e-12)
    r = torch.randn_like(x)
    torch.testing.assert_close(reference.se_apply(x, g, r, "relu"), torch.relu(m(x) + r), rtol=1e-12, atol=1e-12)
    # float16 input: fp32 math, one rounding
    xh = x.half()
    gh = reference.se_gate(xh, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias)
    assert gh.dtype == torch.float32 and reference.se_apply(xh, gh).dtype == torch.float16


# ---------------------------------------------------------------------------------------
# se_gate kernels
# ---------------------------------------------------------------------------------------
GATE_CASES = [
    # (C, R, H=W, N, layout, dtype, act, gate, bias): the pairs the listed modules use
    (8, 2, 1, 1, "nchw", torch.float32, "relu", "sigmoid", True),            # timm SEModule, torchvision
    (24, 6, 7, 3, "nhwc", torch.float32, "silu", "sigmoid", True),           # EfficientNet, RegNetZ
    (30, 6, 13, 3, "nchw", torch.float16, "relu", "hardsigmoid", True),      # MobileNetV3, GhostNet
    (24, 2, 13, 1, "nhwc", torch.bfloat16, "hardswish", "hardsigmoid", False),  # FBNetV3, no biases
    (30, 2, 7, 3, "view", torch.float32, "relu", "sigmoid", True),           # a channel view of NHWC
    (8, None, 7, 3, "nhwc", torch.float16, "identity", "hardsigmoid", True),  # effective SE (VoVNetV2)
    (30, None, 1, 1, "nchw", torch.bfloat16, "identity", "hardsigmoid", False),
    (24, None, 13, 3, "view", torch.float32, "identity", "sigmoid", True),
]


@needs_triton
@pytest.mark.parametrize("case", GATE_CASES, ids=lambda c: f"C{c[0]}_R{c[1]}_{c[2]}x{c[2]}_b{c[3]}_{c[4]}_"
                         f"{str(c[5])[6:]}_{c[6]}_{c[7]}{'' if c[8] else '_nobias'}")
def test_se_gate_kernel(case):
    c, r, hw, n, layout, dtype, act, gate, bias = case
    x = _input(layout, n, c, hw, dtype)
    rw, rb, ew, eb = _weights(c, r, bias, linear=c == 24)
    with effops.use_backend("triton"):
        g = se_gate(x, rw, rb, ew, eb, act=act, gate=gate)
    assert g.shape == (n, c) and g.dtype == torch.float32
    assert_matches(g, _gate64(x, rw, rb, ew, eb, act, gate))


@needs_triton
@pytest.mark.parametrize("which", ["act", "gate"])
def test_se_gate_every_activation(which):
    x = _input("nhwc", 2, 8, 3)
    rw, rb, ew, eb = _weights(8, 6, True)
    for name in ACTIVATIONS:
        act, gate = (name, "sigmoid") if which == "act" else ("relu", name)
        kw = dict(act=act, gate=gate, act_param=0.1 if act == "leaky_relu" else 0.0,
                  gate_param=0.2 if gate == "leaky_relu" else 0.0)
        with effops.use_backend("triton"):
            g = se_gate(x, rw, rb, ew, eb, **kw)
        assert_matches(g, _gate64(x, rw, rb, ew, eb, **kw))


@needs_triton
@pytest.mark.parametrize("split", [False, True])
def test_excitation_in_one_launch_or_one_per_layer(split):
    """The two forms the tuner chooses between, with tiles smaller than the problem (several
    output, hidden and input blocks; several partial sums per image)."""
    x = _input("nhwc", 3, 40, 13)
    rw, _, ew, eb = _weights(40, 20, True)
    rb = torch.randn(40, device=DEV)[::2]  # a strided bias
    cfg = dict(BLOCK_N=2, BLOCK_O=16, BLOCK_R=16, BLOCK_K=16, SPLIT=split)
    g = se._run_gate_triton(x, rw, rb, ew, eb, "silu", 0.0, "sigmoid", 0.0, config=cfg)
    assert_matches(g, _gate64(x, rw, rb, ew, eb, "silu", "sigmoid"))


@needs_triton
def test_gate_is_deterministic():
    x = _input("nhwc", 3, 24, 13)
    w = _weights(24, 6, True)
    with effops.use_backend("triton"):
        assert torch.equal(se_gate(x, *w), se_gate(x, *w))


@needs_triton
def test_device_branch_heuristic_tiles(monkeypatch):
    """The GPU path's heuristic tiles, run under the interpreter."""
    device_branch(monkeypatch, autotune=False)
    assert se._excite_heuristic(1, 2048, 512).get("SPLIT")  # re-reading 1M weights per block: split
    assert not se._excite_heuristic(32, 256, 64).get("SPLIT")
    for layout, r in (("nchw", 6), ("nhwc", None), ("view", 6)):
        x = _input(layout, 3, 24, 7)
        w = _weights(24, r, True)
        with effops.use_backend("triton"):
            g = se_gate(x, *w)
            y = se_apply(x, g, x, act="relu")
        assert_matches(g, _gate64(x, *w))
        assert_matches(y, torch.relu(x.double() * g.double()[:, :, None, None] + x.double()))


@needs_triton
def test_tuner_runs_every_candidate(monkeypatch):
    """On a GPU the tuner times each candidate of the pool, excitation and apply launches: every
    one offered here runs (a ranking by a fake timer: the last one offered wins)."""
    import triton.testing

    from effops import tuning

    device_branch(monkeypatch, autotune=True)
    clock = iter(range(1000, 0, -1))
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: (fn(), next(clock))[1])
    x = _input("nhwc", 2, 40, 13)
    w = _weights(40, 10, True)
    with effops.use_backend("triton"):
        g = se_gate(x, *w)
        y = se_apply(x, g, act="identity")
    kinds = {key[1][0] for key in tuning._CACHE}
    assert kinds == {"se_pool", "se_excite", "se_apply"}
    assert_matches(g, _gate64(x, *w))
    assert_matches(y, x.double() * g.double()[:, :, None, None])


@needs_triton
def test_int64_addressing():
    """Input and output as views whose last channel lies past 2**31 elements (see test_int64.py)."""
    from test_int64 import HugeViews

    hv = HugeViews(4)
    vals = torch.arange(1, 17, dtype=torch.float16, device=DEV).view(1, 4, 2, 2) / 8
    x = hv.filled(0, vals)
    out = hv.view(1, (1, 4, 2, 2))
    out.fill_(float("nan"))
    rw, rb, ew, eb = (w.half() if w is not None else None for w in _weights(4, 2, True))
    with effops.use_backend("triton"):
        g = se_gate(x, rw, rb, ew, eb)
        se_apply(x, g, x, act="relu", out=out)
    g64 = _gate64(vals, rw, rb, ew, eb)
    assert_matches(g, g64)
    ref = torch.relu(vals.double() * g64[:, :, None, None] + vals.double())
    assert_matches(out, ref, torch.relu(vals * g64.half()[:, :, None, None] + vals))


# ---------------------------------------------------------------------------------------
# se_apply kernel
# ---------------------------------------------------------------------------------------
APPLY_CASES = [
    # (N, C, H=W, layout, dtype, residual, act, act_param)
    (1, 8, 1, "nchw", torch.float32, False, "identity", 0.0),     # plain SE: x * gate
    (3, 24, 7, "nhwc", torch.float16, True, "relu", 0.0),         # SE-ResNet / ResNet-RS bottleneck
    (3, 30, 13, "view", torch.bfloat16, True, "silu", 0.0),
    (1, 24, 13, "nchw", torch.float32, True, "leaky_relu", 0.1),
    (3, 8, 7, "nhwc", torch.float32, False, "hardswish", 0.0),
]


@needs_triton
@pytest.mark.parametrize("case", APPLY_CASES, ids=lambda c: f"b{c[0]}_C{c[1]}_{c[2]}x{c[2]}_{c[3]}_{str(c[4])[6:]}_"
                         f"{'res_' if c[5] else ''}{c[6]}")
def test_se_apply_kernel(case):
    n, c, hw, layout, dtype, has_res, act, p = case
    x = _input(layout, n, c, hw, dtype)
    g = torch.rand(c, n, device=DEV).t()  # any strides
    res = _input("nchw" if layout == "nhwc" else "nhwc", n, c, hw, dtype) if has_res else None
    with effops.use_backend("triton"):
        y = se_apply(x, g, res, act=act, act_param=p)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.contiguous_format if layout == "nchw" else torch.channels_last)
    pre = x.double() * g.double()[:, :, None, None] + (res.double() if has_res else 0)
    same = x * g.to(dtype)[:, :, None, None] + (res if has_res else 0)
    assert_matches(y, apply_activation(pre, act, p), apply_activation(same, act, p))


@needs_triton
def test_se_apply_out_into_channel_view_of_poisoned_buffer():
    x = _input("nhwc", 3, 6, 7)
    g, r = torch.rand(3, 6, device=DEV), _input("nhwc", 3, 6, 7)
    buf = torch.full((3, 15, 7, 7), float("nan"), device=DEV).contiguous(memory_format=torch.channels_last)
    view = ChannelView(buf, 2, 2, 6)  # channels 2, 4, ..., 12
    with effops.use_backend("triton"):
        ret = se_apply(x, g, r, act="relu", out=view)
    dst = view.as_tensor()
    assert ret.data_ptr() == dst.data_ptr()
    assert_matches(dst, torch.relu(x.double() * g.double()[:, :, None, None] + r.double()))
    untouched = torch.ones(15, dtype=torch.bool)
    untouched[2:13:2] = False
    assert buf[:, untouched].isnan().all()  # only the view was written
    # into an NCHW tensor, from a channel-view input
    dst2 = torch.full((3, 6, 7, 7), float("nan"), device=DEV)
    with effops.use_backend("triton"):
        assert se_apply(ChannelView.of(x), g, out=dst2) is dst2
    assert_matches(dst2, x.double() * g.double()[:, :, None, None])


def test_float64_runs_the_reference_backend():
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, device=DEV)
    w = [t.double() if t is not None else None for t in _weights(6, 2, True)]
    assert dispatch.reasons("se_gate", x, *w)["triton"]
    g = se_gate(x, *w, act="silu")
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, _gate64(x, *w, act="silu"), rtol=1e-12, atol=1e-12)
    assert se_apply(x, g).dtype == torch.float64


# ---------------------------------------------------------------------------------------
# Errors, empty batch
# ---------------------------------------------------------------------------------------
def test_errors():
    x = torch.randn(2, 8, 3, 3, device=DEV)
    rw, rb, ew, eb = _weights(8, 2, True)
    with pytest.raises(ValueError, match="4-D"):
        se_gate(x[0], rw, rb, ew, eb)
    with pytest.raises(TypeError, match="floating-point"):
        se_gate(x.long(), rw, rb, ew, eb)
    with pytest.raises(ValueError, match="expected input with 8 channels"):
        se_gate(torch.randn(2, 6, 3, 3, device=DEV), rw, rb, ew, eb)
    with pytest.raises(ValueError, match=r"expand_weight of shape \(8, 2, 1, 1\)"):
        se_gate(x, rw, rb, ew[:, :1], eb)
    with pytest.raises(ValueError, match=r"reduce_bias of shape \(2,\)"):
        se_gate(x, rw, torch.randn(3, device=DEV), ew, eb)
    with pytest.raises(ValueError, match=r"expand_weight of shape \(8, 8, 1, 1\)"):  # eSE needs C -> C
        se_gate(x, None, None, ew, eb)
    with pytest.raises(ValueError, match="reduce_bias given without reduce_weight"):
        se_gate(x, None, rb, torch.randn(8, 8, device=DEV), eb)
    with pytest.raises(ValueError, match="H x W, which is empty"):
        se_gate(torch.randn(2, 8, 0, 3, device=DEV), rw, rb, ew, eb)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        se_gate(x, rw, rb, ew, eb, gate="tanh")
    with pytest.raises(ValueError, match="on meta but the input is on"):
        se_gate(x, rw.to("meta"), rb, ew, eb)
    g = torch.rand(2, 8, device=DEV)
    with pytest.raises(ValueError, match=r"gate of shape \(N, C\) = \(2, 8\)"):
        se_apply(x, g[:, :4])
    with pytest.raises(ValueError, match=r"residual of shape \(2, 8, 3, 3\)"):
        se_apply(x, g, x[:, :4])
    with pytest.raises(TypeError, match="residual is torch.float16"):
        se_apply(x, g, x.half())
    with pytest.raises(TypeError, match="floating-point gate"):
        se_apply(x, g > 0.5)
    with pytest.raises(ValueError, match="overlaps x"):
        se_apply(x, g, out=x)
    with pytest.raises(ValueError, match=r"out of shape \(2, 8, 3, 3\)"):
        se_apply(x, g, out=torch.empty(2, 8, 3, 4, device=DEV))
    with pytest.raises(TypeError, match="out is torch.float16"):
        se_apply(x, g, out=torch.empty(2, 8, 3, 3, device=DEV, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="inference-only"):
        se_apply(x.requires_grad_(), g, out=torch.empty(2, 8, 3, 3, device=DEV))


@needs_triton
def test_empty_batch():
    x = torch.randn(0, 8, 3, 3, device=DEV).contiguous(memory_format=torch.channels_last)
    w = _weights(8, 2, True)
    with effops.use_backend("triton"):
        g = se_gate(x, *w)
        y = se_apply(x, g, x, act="relu")
    assert g.shape == (0, 8) and y.shape == x.shape
    m = SqueezeExcite(8, 2).to(DEV).eval()
    assert m(x).shape == x.shape and m.forward_residual(x, x, "relu").shape == x.shape


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [3, None])
def test_gradcheck_fp64(r):
    """The registered ops' backward formulas (reference backend, fp64; smooth activations), with
    1x1-conv weights for SE and linear weights for effective SE."""
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, device=DEV, requires_grad=True)
    res = torch.randn_like(x, requires_grad=True)
    ws = [t.double().requires_grad_() for t in _weights(6, r, True, linear=r is None) if t is not None]

    def f(x, res, *ws):
        rw, rb, ew, eb = ws if r is not None else (None, None, *ws)
        return se_apply(x, se_gate(x, rw, rb, ew, eb, act="silu", gate="sigmoid"), res, act="gelu")

    with effops.use_backend("reference"):
        assert torch.autograd.gradcheck(f, (x, res, *ws))


def _autograd_grads(module, x, r, go):
    """Gradients of ``sum(relu(module(x) + r) * go)`` by PyTorch's autograd, in train mode (the
    original modules' math), on copies: ``[x.grad, r.grad, *parameter grads]``."""
    module = copy.deepcopy(module).train()
    x, r = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    (torch.relu(module(x) + r) * go.to(x.dtype)).sum().backward()
    return [x.grad, r.grad] + [p.grad for p in module.parameters()]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_of_the_triton_forward(dtype):
    """Triton forward + the ops' backward against PyTorch's autograd of the module's math."""
    m = _randomize(SqueezeExcite(24, 6, act="silu", gate="hardsigmoid")).to(DEV, dtype).eval()
    x, r = _input("nhwc", 3, 24, 7, dtype).requires_grad_(), _input("nchw", 3, 24, 7, dtype).requires_grad_()
    go = torch.randn(3, 24, 7, 7, device=DEV)
    with effops.use_backend("triton"):
        (m.forward_residual(x, r, "relu") * go.to(dtype)).sum().backward()
    got = [x.grad, r.grad] + [p.grad for p in m.parameters()]
    ref = _autograd_grads(copy.deepcopy(m).double(), x.double(), r.double(), go.double())
    same = _autograd_grads(m, x, r, go)
    for a, b, c in zip(got, ref, same):
        assert a.dtype == dtype
        assert_matches(a, b, c)


# ---------------------------------------------------------------------------------------
# torch.compile, opcheck
# ---------------------------------------------------------------------------------------
@needs_triton
def test_torch_compile_fullgraph(monkeypatch):
    calls = count_dispatch(monkeypatch)
    torch._dynamo.reset()
    m = SqueezeExcite.from_module(SEModule(8, rd_channels=2)).to(DEV).eval()
    x = _input("nhwc", 2, 8, 3)
    r = torch.randn_like(x)
    graphs = []
    aot_eager = torch._dynamo.backends.registry.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(lambda x, r: m.forward_residual(x, r, "relu") + m(x), fullgraph=True, backend=backend)
    with torch.no_grad():
        y = compiled(x, r)
        ref = torch.relu(m.forward_unfused(x) + r) + m.forward_unfused(x)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    if native_fast(x):  # CPU inference on the native backend: the compile-only ops, C++ kernels, no dispatcher
        assert targets.count(se.GATE_NATIVE_OP) == 2 and targets.count(se.APPLY_NATIVE_OP) == 2, targets
        assert se.GATE_OP not in targets and se.APPLY_OP not in targets, targets
    else:
        assert calls.count("se_gate") == 2 and calls.count("se_apply") == 2  # effops ops, not traced through
    assert_matches(y, ref.double())


@needs_triton
def test_opcheck():
    x = torch.randn(2, 6, 2, 3, device=DEV, requires_grad=True)
    rw, rb, ew, eb = (t.requires_grad_() for t in _weights(6, 2, True))
    torch.library.opcheck(se.GATE_OP, (x, rw, rb, ew, eb, "relu", 0.0, "sigmoid", 0.0))
    g = torch.rand(2, 6, device=DEV, requires_grad=True)
    torch.library.opcheck(se.APPLY_OP, (x, g, torch.randn_like(x), "relu", 0.0))
    torch.library.opcheck(se.APPLY_OUT_OP, (x.detach(), g.detach(), None, "identity", 0.0, torch.empty(2, 6, 2, 3)))


# ---------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------
FLAVOURS = {
    "timm_SEModule": lambda: SEModule(24, rd_channels=6),                                   # SE-ResNet, ResNet-RS
    "timm_SEModule_silu": lambda: SEModule(24, rd_channels=6, act_layer=nn.SiLU),           # RegNetZ
    "timm_SqueezeExcite": lambda: TimmEffSE(24, rd_channels=6, act_layer=nn.SiLU),          # EfficientNet
    "timm_SqueezeExcite_ghostnet": lambda: TimmEffSE(24, rd_channels=6, gate_layer="hard_sigmoid"),  # GhostNet, MNv3
    "timm_EffectiveSEModule": lambda: EffectiveSEModule(24),                                # ese_vovnet
    "torchvision_SqueezeExcitation": lambda: SqueezeExcitation(24, 6),                      # RegNetY
    "torchvision_SqueezeExcitation_mnv3": lambda: SqueezeExcitation(24, 6, scale_activation=nn.Hardsigmoid),
    "classic_eSEModule": lambda: eSEModule(24),                                              # CenterMask
    "effops_EffectiveSE": lambda: EffectiveSE(24),
    "effops_SqueezeExcite": lambda: SqueezeExcite(24, 6, act="hardswish", gate="hardsigmoid", bias=False),
}


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m


@needs_triton
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_from_module_matches_original_in_eval_and_train(flavour, monkeypatch):
    orig = _randomize(FLAVOURS[flavour]()).to(DEV)
    fused = SqueezeExcite.from_module(orig)
    assert type(fused) is SqueezeExcite
    assert list(fused.state_dict()) == list(orig.state_dict())
    assert [n for n, _ in fused.named_children()] == [n for n, _ in orig.named_children()]
    for (_, a), (_, b) in zip(fused.named_children(), orig.named_children()):
        assert a is b  # shared, not copied
    x = _input("nhwc", 3, 24, 7)
    orig.eval(), fused.eval()
    calls = count_dispatch(monkeypatch)
    with torch.no_grad():
        y = fused(x)
    assert calls == ["se_gate", "se_apply"]
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y, copy.deepcopy(orig).double()(x.double()))
    # train: the original forward, bit for bit, gradients included
    orig.train(), fused.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fused(xa), orig(xb)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    grads = [p.grad.clone() for p in orig.parameters()]
    orig.zero_grad()
    yb.square().sum().backward()
    assert torch.equal(xa.grad, xb.grad) and all(torch.equal(g, p.grad) for g, p in zip(grads, orig.parameters()))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_half_precision(dtype):
    orig = _randomize(SqueezeExcitation(24, 6, scale_activation=nn.Hardsigmoid)).to(DEV, dtype).eval()
    fused = SqueezeExcite.from_module(copy.deepcopy(orig)).eval()
    x = _input("nhwc", 3, 24, 7, dtype)
    with torch.no_grad():
        y, eager = fused(x), orig(x)
    assert y.dtype == dtype
    assert_matches(y, copy.deepcopy(orig).double()(x.double()), eager)


def test_constructor_layouts_and_effective_se():
    m = SqueezeExcite(16, 4)
    assert list(m.state_dict()) == list(SEModule(16, rd_channels=4).state_dict())
    assert m.channels == 16 and m.rd_channels == 4 and m.activations == ("relu", "sigmoid")
    e = EffectiveSE(12)
    assert isinstance(e, SqueezeExcite) and list(e.state_dict()) == ["fc.weight", "fc.bias"]
    assert e.rd_channels is None and e.activations == ("identity", "hardsigmoid")
    assert ese_fc_of(e) is e.fc and ese_fc_of(SqueezeExcite.from_module(eSEModule(12))) is not None
    x = torch.randn(2, 12, 3, 3)
    torch.testing.assert_close(e.train()(x), x * F.hardsigmoid(e.fc(x.mean((2, 3), keepdim=True))), rtol=0, atol=0)
    e.gate = nn.Sigmoid()  # no longer an eSE: FusedOSA must not fuse it as one
    assert ese_fc_of(e) is None
    assert ese_fc_of(SqueezeExcite(12, None, gate="sigmoid")) is None
    with pytest.raises(ValueError, match="positive int"):
        SqueezeExcite(0)


@pytest.mark.parametrize("make, msg", [
    (lambda: SEModule(8, rd_channels=2, norm_layer=nn.BatchNorm2d), "bn is a BatchNorm2d"),
    (lambda: SEModule(8, rd_channels=2, add_maxpool=True), "add_maxpool"),
    (lambda: EffectiveSEModule(8, add_maxpool=True), "add_maxpool"),
    (lambda: SEModule(8, rd_channels=2, act_layer=nn.Tanh), "activation Tanh is not supported"),
    (lambda: SqueezeExcitation(8, 2, scale_activation=nn.Softsign), "gate Softsign is not supported"),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 1)), "not a squeeze-excitation module"),
])
def test_unsupported_modules_are_refused(make, msg):
    with pytest.raises(ValueError, match=msg):
        SqueezeExcite.from_module(make())


@needs_triton
def test_module_errors():
    m = SqueezeExcite(8, 2).to(DEV).eval()
    with pytest.raises(ValueError, match="expected input with 8 channels"):
        m(torch.randn(1, 6, 3, 3, device=DEV))
    with pytest.raises(ValueError, match="4-D input"):
        m.gate_of(torch.randn(8, 3, 3, device=DEV))
    with pytest.raises(TypeError, match="the input is torch.float16 but the fc weights are torch.float32"):
        m(torch.randn(1, 8, 3, 3, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="activation Tanh is not supported"):
        m.forward_residual(torch.randn(1, 8, 3, 3, device=DEV), torch.randn(1, 8, 3, 3, device=DEV), nn.Tanh())


@needs_triton
@pytest.mark.parametrize("how", ["weight.data", "set .data", "bias in place"])
def test_parameter_changes_are_seen_next_call(how):
    orig = _randomize(SEModule(8, rd_channels=2)).to(DEV).eval()
    fused = SqueezeExcite.from_module(copy.deepcopy(orig)).eval()
    x = _input("nhwc", 2, 8, 3)
    with torch.no_grad():
        assert_matches(fused(x), copy.deepcopy(orig).double()(x.double()))
        for m in (orig, fused):
            if how == "weight.data":
                m.fc1.weight.data.mul_(-3)  # .data: the version counter does not move
            elif how == "set .data":
                m.fc2.weight.data = torch.full_like(m.fc2.weight, 0.3)
            else:
                m.fc2.bias.add_(2)
        assert_matches(fused(x), copy.deepcopy(orig).double()(x.double()))


@needs_triton
def test_replaced_children_are_followed(monkeypatch):
    orig = _randomize(SEModule(8, rd_channels=2)).to(DEV).eval()
    fused = SqueezeExcite.from_module(copy.deepcopy(orig)).eval()
    x = _input("nhwc", 2, 8, 3)
    calls = count_dispatch(monkeypatch)

    def check():
        with torch.no_grad():
            assert_matches(fused(x), copy.deepcopy(orig).double()(x.double()))

    for name, new in (("act", nn.SiLU()), ("gate", nn.Hardsigmoid())):
        setattr(orig, name, new)
        setattr(fused, name, copy.deepcopy(new))
        check()
        assert calls[-2:] == ["se_gate", "se_apply"]  # still fused, with the new activation
    assert fused.activations == ("silu", "hardsigmoid")
    calls.clear()
    for name, new in (("gate", nn.Tanh()), ("bn", nn.BatchNorm2d(2).eval())):  # not fusable: the children run
        setattr(orig, name, new)
        setattr(fused, name, copy.deepcopy(new))
        with pytest.warns(UserWarning, match="runs unfused"):
            check()
        assert calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        check()


@needs_triton
def test_hooks_fire_on_the_children(monkeypatch):
    orig = _randomize(SqueezeExcitation(8, 2)).to(DEV).eval()
    fused = SqueezeExcite.from_module(copy.deepcopy(orig)).eval()
    x = _input("nhwc", 2, 8, 3)
    seen = []
    h = fused.fc1.register_forward_hook(lambda m, i, o: seen.append(o))
    calls = count_dispatch(monkeypatch)
    with torch.no_grad():
        y = fused(x)
        assert len(seen) == 1 and calls == []
        assert torch.equal(y, orig(x))
        h.remove()
        assert_matches(fused(x), copy.deepcopy(orig).double()(x.double()))
    assert calls == ["se_gate", "se_apply"]


@needs_triton
def test_autocast_cpu_bfloat16_matches_pytorch_dtype():
    if DEV != "cpu":
        pytest.skip("CPU autocast; on CUDA the same code path runs with the CUDA autocast dtype")
    orig = _randomize(SEModule(8, rd_channels=2)).eval()
    fused = SqueezeExcite.from_module(copy.deepcopy(orig)).eval()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = _input("nhwc", 2, 8, 3, dtype)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y, eager = fused(x), orig(x)
        assert y.dtype == eager.dtype, dtype  # float16 * bfloat16 gate -> float32, as PyTorch
        # effops computes the gate in fp32 (eager in bfloat16): fp32 results meet the fp32 rule
        assert_matches(y, copy.deepcopy(orig).double()(x.double()), eager)


@needs_triton
def test_gate_of_and_forward_residual():
    orig = _randomize(TimmEffSE(24, rd_channels=6, act_layer=nn.SiLU)).to(DEV).eval()
    fused = SqueezeExcite.from_module(copy.deepcopy(orig)).eval()
    x, r = _input("nhwc", 3, 24, 7), _input("nchw", 3, 24, 7)
    ref = copy.deepcopy(orig).double()
    with torch.no_grad():
        g = fused.gate_of(x)
        assert g.shape == (3, 24) and g.dtype == torch.float32
        s64 = ref.gate(ref.conv_expand(ref.act1(ref.conv_reduce(x.double().mean((2, 3), keepdim=True)))))
        assert_matches(g, s64.flatten(1))
        assert_matches(fused.forward_residual(x, r, "relu"), torch.relu(ref(x.double()) + r.double()))
        assert_matches(fused.forward_residual(x, r, nn.ReLU6()), F.relu6(ref(x.double()) + r.double()))
        # a residual PyTorch would broadcast / promote: the same expression, unfused
        r64 = r[:1].double()
        y = fused.forward_residual(x, r64, "relu")
        assert y.dtype == torch.float64 and y.shape == x.shape
        torch.testing.assert_close(y, torch.relu(orig(x) + r64), rtol=1e-5, atol=1e-6)
    fused.train()
    xg = x.clone().requires_grad_()
    g = fused.gate_of(xg)
    assert g.dtype == torch.float32 and g.requires_grad
    torch.testing.assert_close(fused.forward_residual(x, r, "relu"), torch.relu(orig.train()(x) + r), rtol=0, atol=0)


@needs_triton
def test_optimize_swaps_every_flavour(monkeypatch):
    class Block(nn.Module):
        """An SE bottleneck-ish block with a hand-written forward."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.se = SEModule(8, rd_channels=2)

        def forward(self, x):
            return torch.relu(self.se(self.bn(self.conv(x))) + x)

    model = nn.Sequential(
        Block(), TimmEffSE(8, rd_channels=2, gate_layer="hard_sigmoid"), EffectiveSEModule(8),
        SqueezeExcitation(8, 2), eSEModule(8), EffectiveSE(8),
        SEModule(8, rd_channels=2, norm_layer=nn.BatchNorm2d),  # refused: a real BN between the fcs
    ).to(DEV)
    model = _randomize(model).eval()
    x = _input("nhwc", 2, 8, 5)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    fast = effops.optimize(model)
    kinds = [type(m).__name__ for m in (fast[0].se, *fast[1:])]
    assert kinds == ["SqueezeExcite"] * 5 + ["EffectiveSE", "SEModule"]
    assert fast.state_dict().keys() == model.state_dict().keys()
    swapped = {e.path: e.what for e in fast.effops_report.swapped}
    assert swapped["0.se"] == ("squeeze-excite 8→2→8 (relu, sigmoid gate): mean pool + fc + relu + fc + sigmoid in "
                               "2 launches (pool, excitation), x·gate in 1")
    assert swapped["2"].startswith("effective squeeze-excite 8→8 (hardsigmoid gate)")
    assert swapped["1"].startswith("squeeze-excite 8→2→8 (relu, hardsigmoid gate)")
    assert "5" not in swapped  # effops' own EffectiveSE is already a SqueezeExcite
    skipped = {e.path: e.what for e in fast.effops_report.skipped}
    assert "bn is a BatchNorm2d" in skipped["6"]
    calls = count_dispatch(monkeypatch)
    with torch.no_grad():
        y = fast(x)
    # Block's SE squeeze rides its conv's epilogue (SEEpilogueStep): the excitation reads the conv's
    # channel sums, no se_gate op; the other five SEs pool their input. (On the native CPU backend
    # the conv runs natively and the SE pools its input: six se_gate calls.)
    assert calls.count("se_gate") == (6 if native_fast(x) else 5)
    assert_matches(y, ref)
    again = effops.optimize(fast)
    assert not any("squeeze-excite" in e.what for e in again.effops_report.swapped)


def test_block_rule_matches_cheaply_and_never_effops_modules():
    from effops.nn.common import BLOCK_RULES

    rule = next(r for r in BLOCK_RULES if r.name == "squeeze-excite")
    assert rule.matches(SEModule(8)) and rule.matches(SqueezeExcitation(8, 2)) and rule.matches(eSEModule(8))
    assert not rule.matches(SqueezeExcite(8, 2)) and not rule.matches(EffectiveSE(8))
    assert not rule.matches(nn.Sequential(nn.Conv2d(8, 8, 1), nn.Sigmoid()))
    se_like = SEModule(8)
    se_like.extra = nn.ReLU()  # an unknown child: not the structure the forward is known for
    assert not rule.matches(se_like)
