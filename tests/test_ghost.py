"""FusedGhostModule against timm's GhostModule / GhostModuleV2 / GhostModuleV3 and the reference
GhostModule: eval on both backends, train, gradients, state_dict, freshness, hooks, autocast,
replaced children, bad input, the converter rule, and whole GhostNets."""
import copy
import math
import pytest
import torch
from torch import nn

import effops
import effops.nn.repvgg  # noqa: F401 - registers the RepVGG block rule (the compile test converts one)
from effops.nn.common import BLOCK_RULES
from effops.nn.ghost import FusedGhostModule, ghost_kind

from helpers import (
    KERNEL_DEVICE, assert_matches, assert_same_state_and_grads, assert_same_step, count_dispatch,
    needs_triton, randomize_bn, rel_err)

timm = pytest.importorskip("timm")
from timm.models.ghostnet import GhostModule, GhostModuleV2, GhostModuleV3  # noqa: E402

DEV = KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """One intra-op thread: with ``-n 2`` each worker has a core, and two OpenMP threads per worker
    spin against each other (a float64 whole-GhostNet forward went from 0.2 s to 50 s under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Paper:
    class GhostModule(nn.Module):
        """The ghost module of the paper's code (huawei-noah ghostnet_pytorch), verbatim but for
        names: ``oup`` channels kept, "no activation" written as an empty nn.Sequential."""

        def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True):
            super().__init__()
            self.oup = oup
            init_channels = math.ceil(oup / ratio)
            new_channels = init_channels * (ratio - 1)
            self.primary_conv = nn.Sequential(
                nn.Conv2d(inp, init_channels, kernel_size, stride, kernel_size // 2, bias=False),
                nn.BatchNorm2d(init_channels),
                nn.ReLU(inplace=True) if relu else nn.Sequential(),
            )
            self.cheap_operation = nn.Sequential(
                nn.Conv2d(init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels, bias=False),
                nn.BatchNorm2d(new_channels),
                nn.ReLU(inplace=True) if relu else nn.Sequential(),
            )

        def forward(self, x):
            x1 = self.primary_conv(x)
            x2 = self.cheap_operation(x1)
            out = torch.cat([x1, x2], dim=1)
            return out[:, :self.oup, :, :]


ReferenceGhostModule = _Paper.GhostModule  # recognised by its class name, as users' copies are


# name -> builder of the original module (small, odd channel counts)
VARIANTS = {
    "v1_odd": lambda: GhostModule(5, 9),                               # ratio 2, last ghost channel sliced off
    "v1_identity": lambda: GhostModule(6, 7, act_layer=nn.Identity),   # GhostBottleneck's ghost2
    "v1_ratio3": lambda: GhostModule(5, 11, ratio=3),                  # slice cuts a group: two cheap launches
    "v1_k3_s2": lambda: GhostModule(4, 6, kernel_size=3, stride=2),
    "v2": lambda: GhostModuleV2(5, 9),
    "v3_train": lambda: GhostModuleV3(6, 9),
    "v3_shortcut_deployed": lambda: _deployed(GhostModuleV3(6, 9, mode="shortcut")),
    "reference": lambda: ReferenceGhostModule(5, 9, relu=False),
}


def _deployed(m):
    randomize_bn(m).eval().reparameterize()
    return m


def _orig(variant):
    m = randomize_bn(VARIANTS[variant]())
    with torch.no_grad():  # larger weights than the default init, so activations see real ranges
        for c in m.modules():
            if isinstance(c, nn.Conv2d):
                c.weight.mul_(1.5)
    return m.eval().to(DEV)


def _x(c, n=2, h=7, w=7, dtype=torch.float32, channels_last=True, device=DEV):
    x = torch.randn(n, c, h, w, device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _in_chs(m):
    return FusedGhostModule.from_module(copy.deepcopy(m)).in_chs


def _poison_new_buffers(monkeypatch):
    """Every floating-point ``torch.empty`` from here on comes back NaN-filled."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


# -- eval through the Triton kernels ------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("variant,dtype,n,hw,channels_last", [
    ("v1_odd", torch.float32, 3, 7, True),
    ("v1_odd", torch.float32, 1, 13, False),
    ("v1_odd", torch.float16, 3, 1, True),
    ("v1_odd", torch.bfloat16, 1, 7, False),
    ("v1_identity", torch.bfloat16, 3, 7, True),
    ("v1_ratio3", torch.float32, 3, 7, True),
    ("v1_k3_s2", torch.float16, 1, 13, False),
    ("v2", torch.float32, 3, 7, True),
    ("v3_train", torch.float32, 1, 7, True),
    ("v3_shortcut_deployed", torch.float16, 3, 13, True),
    ("reference", torch.float32, 1, 7, False),
], ids=lambda v: str(v).replace("torch.", ""))
def test_eval_triton_matches_original(variant, dtype, n, hw, channels_last, monkeypatch):
    ref = _orig(variant)
    fused = FusedGhostModule.from_module(copy.deepcopy(ref)).to(dtype)
    x = _x(fused.in_chs, n, hw, hw, dtype, channels_last)
    with torch.no_grad():
        ref64 = copy.deepcopy(ref).double()(x.double())
        same = copy.deepcopy(ref).to(dtype)(x) if dtype != torch.float32 else None
        _poison_new_buffers(monkeypatch)  # an element no kernel writes stays NaN (rel_err rejects NaN)
        with effops.use_backend("triton"):
            y = fused(x)
    assert y.shape == ref64.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_matches(y, ref64, same)


@needs_triton
def test_channel_view_input():
    """The input is a channel range of a larger NHWC buffer (e.g. a split): read in place, the
    output is NHWC."""
    ref = _orig("v1_ratio3")
    fused = FusedGhostModule.from_module(copy.deepcopy(ref))
    big = _x(9, 2, 6, 5)
    x = big[:, 3:8]
    with torch.no_grad(), effops.use_backend("triton"):
        y = fused(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y, copy.deepcopy(ref).double()(x.double()))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp64_structure_on_the_reference_backend(variant):
    """The fused path's structure (channel ranges, weight / BN slicing, merged V3 branches, gate) in
    float64 on the reference backend equals the original module to rounding."""
    ref = _orig(variant).cpu().double()
    fused = FusedGhostModule.from_module(copy.deepcopy(ref))
    for x in (_x(fused.in_chs, 3, 7, 6, torch.float64, False, "cpu"), _x(fused.in_chs, 1, 5, 5, torch.float64,
                                                                         True, "cpu")):
        with torch.no_grad(), effops.use_backend("reference"):
            y, want = fused(x), ref(x)
        assert y.shape == want.shape and rel_err(y, want) < 1e-13, rel_err(y, want)


def test_only_the_kept_ghost_channels_are_computed(monkeypatch):
    """ratio 2, out_chs odd: the cheap conv runs on init - 1 channels (not init, then sliced)."""
    ref = _orig("v1_odd").cpu()  # init 5, 5 ghosts, 4 kept
    fused = FusedGhostModule.from_module(copy.deepcopy(ref))
    shapes = []
    from effops import dispatch
    run = dispatch.run
    monkeypatch.setattr(dispatch, "run", lambda op, *a, **k: shapes.append(tuple(a[1].shape)) or run(op, *a, **k))
    with torch.no_grad(), effops.use_backend("reference"):
        fused(_x(5, device="cpu"))
    assert shapes == [(5, 5, 1, 1), (4, 1, 3, 3)]


# -- training and autograd ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["v1_odd", "v2", "v3_train", "reference"])
def test_train_is_exactly_the_original(variant):
    ref = _orig(variant).cpu().train()
    fused = FusedGhostModule.from_module(copy.deepcopy(ref)).train()
    for _ in range(2):
        assert_same_step(ref, fused, _x(fused.in_chs, device="cpu"))
    assert_same_state_and_grads(ref, fused)


def test_eval_with_autograd_gives_the_original_gradients():
    ref = _orig("v2").cpu()
    fused = FusedGhostModule.from_module(copy.deepcopy(ref))
    x1 = _x(5, device="cpu").requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y_ref, y = ref(x1), fused(x2)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    y_ref.sum().backward()
    y.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    torch.testing.assert_close(fused.cheap_operation[0].weight.grad, ref.cheap_operation[0].weight.grad,
                               rtol=0, atol=0)


# -- structure, state_dict, constructor ---------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_keys_and_parameters_are_the_originals(variant):
    ref = _orig(variant)
    fused = FusedGhostModule.from_module(ref)
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in fused.named_children()] == [n for n, _ in ref.named_children()]
    for (_, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        assert a is b  # shared, not copied
    fused.load_state_dict(ref.state_dict(), strict=True)
    assert not fused.training  # the original's mode


def test_constructor_builds_timm_layout():
    fused = FusedGhostModule(6, 11, ratio=2, dw_size=3, act="relu")
    timm_mod = GhostModule(6, 11)
    assert list(fused.state_dict()) == list(timm_mod.state_dict())
    timm_mod = randomize_bn(timm_mod).eval()
    fused.load_state_dict(timm_mod.state_dict(), strict=True)
    fused.eval()
    x = _x(6, device="cpu")
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fused(x), copy.deepcopy(timm_mod).double()(x.double()))
    with pytest.raises(ValueError, match="ratio must be >= 2"):
        FusedGhostModule(6, 11, ratio=1)
    with pytest.raises(ValueError, match="out_chs must be a positive int"):
        FusedGhostModule(6, 0)


def test_kinds_and_unfusable_structures():
    assert ghost_kind(GhostModule(4, 6)) == "v1" and ghost_kind(GhostModuleV2(4, 6)) == "v2"
    assert ghost_kind(GhostModuleV3(4, 6)) == "v3" and ghost_kind(ReferenceGhostModule(4, 6)) == "v1"
    assert ghost_kind(nn.Sequential()) is None
    with pytest.raises(ValueError, match="not a ghost module"):
        FusedGhostModule.from_module(nn.Conv2d(3, 3, 1))
    m = GhostModule(4, 6)
    m.cheap_operation[0].stride = (2, 2)  # the original can't concatenate this either
    with pytest.raises(ValueError, match="must keep the spatial size"):
        FusedGhostModule.from_module(m)
    m = GhostModule(4, 6)
    m.primary_conv[2] = nn.Tanh()
    with pytest.raises(ValueError, match="activation Tanh is not supported"):
        FusedGhostModule.from_module(m)


# -- the eval forward: what runs -------------------------------------------------------------------------
CAT_OPS = {"aten::cat", "aten::_cat", "aten::concat", "aten::concatenate"}
COPY_OPS = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}


class _Allocations:
    """Every ATen op of the calls inside the block, and the shape of each new 4-D tensor."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        rec = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                rets = func._schema.returns
                if isinstance(out, torch.Tensor) and rets and rets[0].alias_info is None and out.dim() == 4:
                    rec.fresh.append(tuple(out.shape))
                rec.ops.append(str(func))
                return out

        self.fresh, self.ops, self._mode = [], [], Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


@needs_triton
def test_eval_forward_has_no_cat_no_slice_copy_and_one_buffer():
    """torch.profiler over a converted ghost module's eval forward: no ``aten::cat`` and no copy of
    an activation tensor; at the ATen level the only 4-D tensor allocated is the output buffer (the
    intrinsic channels and the ghosts are never tensors of their own). (The Triton interpreter
    copies kernel arguments as flat byte arrays: 1-D copies, not counted.)"""
    ref = _orig("v1_odd")  # init 5, 4 kept ghosts
    fast = effops.optimize(copy.deepcopy(ref))
    assert isinstance(fast, FusedGhostModule)
    x = _x(5, 2, 5, 5)
    with torch.no_grad(), effops.use_backend("triton"):
        fast(x)  # warm-up: the measured call is the steady state
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            y = fast(x)
        with _Allocations() as rec:
            fast(x)
    events = [(e.name, [len(s) for s in e.input_shapes]) for e in prof.events()]
    assert not [e for e in events if e[0] in CAT_OPS], events
    assert not [e for e in events if e[0] in COPY_OPS and 4 in e[1]], events
    assert any(e[0] in COPY_OPS and e[1] and e[1][0] == 1 for e in events) == (DEV == "cpu")  # the interpreter's
    assert not any("cat" in op for op in rec.ops), rec.ops
    assert rec.fresh == [(2, 9, 5, 5)], rec.fresh
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ref(x)
    assert CAT_OPS & {e.name for e in prof.events()}  # the original does concatenate
    assert_matches(y, copy.deepcopy(ref).double()(x.double()))


@needs_triton
def test_data_write_is_seen_after_refresh():
    ref = _orig("v1_odd")
    fused = FusedGhostModule.from_module(copy.deepcopy(ref))
    x = _x(5)
    with torch.no_grad(), effops.use_backend("triton"):
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        for m in (ref, fused):  # .data writes do not bump the version counters: refresh() says so
            m.cheap_operation[1].running_var.data.mul_(4)
            m.cheap_operation[0].weight.data.mul_(-1)
            m.primary_conv[1].bias.data.add_(0.5)
        effops.refresh()
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))


def test_hooks_see_the_original_modules():
    ref = _orig("v1_odd").cpu()
    fused = FusedGhostModule.from_module(copy.deepcopy(ref))
    seen = []
    fused.cheap_operation[1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    x = _x(5, device="cpu")
    with torch.no_grad(), effops.use_backend("reference"):
        y = fused(x)
    assert seen == [(2, 5, 7, 7)]  # the full cheap output, as in the original forward
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0)


def test_autocast_dtype():
    ref = _orig("v2").cpu()
    fused = FusedGhostModule.from_module(copy.deepcopy(ref))
    x = _x(5, device="cpu")
    with torch.no_grad(), effops.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        y, same = fused(x), ref(x)
    assert y.dtype == same.dtype
    with torch.no_grad():
        assert_matches(y, copy.deepcopy(ref).double()(x.double()), same)


def test_replaced_child_is_used():
    ref = _orig("v1_odd").cpu()
    fused = FusedGhostModule.from_module(copy.deepcopy(ref))
    x = _x(5, device="cpu")
    with torch.no_grad(), effops.use_backend("reference"):
        fused(x)
        for m in (ref, fused):
            m.cheap_operation[2] = nn.SiLU()
        calls = []
        with pytest.MonkeyPatch.context() as mp:
            calls = count_dispatch(mp)
            assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        assert calls == ["conv_bn_act", "conv_bn_act"]  # still fused, with the new activation
        for m in (ref, fused):
            m.primary_conv[2] = nn.Tanh()  # not an activation the kernels apply
        with pytest.warns(UserWarning, match="runs unfused"):
            y = fused(x)
        torch.testing.assert_close(y, ref(x), rtol=0, atol=0)


def test_empty_batch_and_bad_input():
    ref = _orig("v1_odd").cpu()
    fused = FusedGhostModule.from_module(copy.deepcopy(ref))
    with torch.no_grad():
        y = fused(torch.randn(0, 5, 6, 6))
        assert y.shape == (0, 9, 6, 6) == ref(torch.randn(0, 5, 6, 6)).shape
        with pytest.raises(ValueError, match="expected an input with 5 channels"):
            fused(torch.randn(2, 4, 6, 6))
        with pytest.raises(ValueError, match="4-D input"):
            fused(torch.randn(5, 6, 6))
        with pytest.raises(TypeError, match="input is torch.float64 but weight is torch.float32"):
            fused(torch.randn(2, 5, 6, 6, dtype=torch.float64))
        with pytest.raises(TypeError, match="floating-point"):
            fused(torch.ones(2, 5, 6, 6, dtype=torch.int32))


# -- the converter ----------------------------------------------------------------------------------
def test_block_rule_is_registered():
    rule = next(r for r in BLOCK_RULES if r.name == "ghost module")
    assert rule.fused_type is FusedGhostModule and rule.matches(GhostModule(4, 6))
    fast = effops.optimize(nn.Sequential(GhostModule(4, 6), nn.ReLU()).eval())
    what = str(fast.effops_report)
    assert "ghost module 4→6: conv1x1 + bn + relu → channels [0, 3), dw3x3 + bn + relu → [3, 6)" in what
    assert isinstance(fast[0], FusedGhostModule)
    assert effops.optimize(fast, inplace=True)[0] is fast[0]  # already optimized: left alone


@pytest.mark.slow
@pytest.mark.parametrize("name,modules", [("ghostnet_100", 32), ("ghostnetv2_100", 32), ("ghostnetv3_050", 32)])
def test_whole_ghostnet_equals_the_original(name, modules):
    model = randomize_bn(timm.create_model(name, num_classes=10)).eval()
    fast = effops.optimize(model)
    rep = fast.effops_report
    assert sum(e.what.startswith("ghost module") for e in rep.swapped) == modules, str(rep)
    assert sum(e.what.startswith("SE gate → ghost module") for e in rep.swapped) == 7, str(rep)  # all 7 SEs
    assert not rep.skipped, str(rep)
    assert list(fast.state_dict()) == list(model.state_dict())
    assert sum(isinstance(m, FusedGhostModule) for m in fast.modules()) == modules
    x = torch.randn(1, 3, 48, 48)  # GhostNetV2's gate pools the last stage by 2: it needs >= 2x2 there
    with torch.no_grad(), effops.use_backend("reference"):
        ref64 = copy.deepcopy(model).double()(x.double())
        assert_matches(fast(x), ref64)
        y64 = copy.deepcopy(fast).double()(x.double())  # the converted model, in float64
    assert rel_err(y64, ref64) < 1e-12


# -- an SE gate folded into a ghost module's primary conv (timm GhostBottleneck: se → ghost2) ---------
def _se_bottleneck(stride=2):
    from timm.models.ghostnet import GhostBottleneck

    torch.manual_seed(0)
    return randomize_bn(GhostBottleneck(6, 12, 5, dw_kernel_size=3, stride=stride, se_ratio=0.25)).eval()


def test_se_gate_into_ghost_module_reference_backend():
    """The converted bottleneck computes only the SE gate and hands it to ghost2's primary conv:
    the report says so, the fp64 structure equals the original, fp32 is within 1e-5 of it."""
    from effops.nn.traced import GhostGateStep

    model = _se_bottleneck()
    fast = effops.optimize(copy.deepcopy(model))
    what = [e.what for e in fast.effops_report.swapped]
    assert "SE gate → ghost module 12→5 (gate applied in its primary conv's operand load) [traced]" in what, what
    assert sum(isinstance(m, GhostGateStep) for m in fast.forward.graph_module.modules()) == 1
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad(), effops.use_backend("reference"):
        y32 = fast(x)
        ref64 = copy.deepcopy(model).double()(x.double())
        y64 = copy.deepcopy(fast).double()(x.double())
    assert rel_err(y64, ref64) <= 1e-12, rel_err(y64, ref64)
    assert rel_err(y32, ref64) <= 1e-5, rel_err(y32, ref64)
    # A hook on the SE module: it runs as a module (and sees its input), with the same result.
    seen = []
    fast.se.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad(), effops.use_backend("reference"):
        assert rel_err(fast(x), ref64) <= 1e-5
    assert seen == [(2, 12, 5, 5)]
    # A pre-hook on ghost2 sees the SE's output, as in the original forward.
    inputs = []
    fast.ghost2.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with torch.no_grad(), effops.use_backend("reference"):
        fast(x)
        want = model.se(model.bn_dw(model.conv_dw(model.ghost1(x))))
    assert len(inputs) == 1 and rel_err(inputs[0], want) <= 1e-6


def test_se_gate_into_ghost_module_train_is_exact():
    model = _se_bottleneck().train()
    fast = effops.optimize(copy.deepcopy(model)).train()
    x = torch.randn(2, 6, 9, 9)
    outs = []
    for m in (model, fast):
        y = m(x)
        y.square().mean().backward()
        outs.append((y.detach(), [p.grad for p in m.parameters()], m.state_dict()))
    (ya, ga, sa), (yb, gb, sb) = outs
    assert torch.equal(ya, yb)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("variant", ["v1_odd", "v2", "v3_train"])
def test_gate_argument_equals_gating_the_input(variant):
    """``ghost(x, gate=g) == ghost(x * g)``: folded into the primary conv (V1; V3's merged primary
    branches), or computed first where the gate can't be folded (V2's gate branch reads ``x``),
    under autocast, with a gradient through ``g``, and in train mode."""
    ref = _orig(variant).cpu()
    fused = FusedGhostModule.from_module(copy.deepcopy(ref))
    assert fused.takes_gate() == (variant != "v2")
    x = _x(fused.in_chs, 2, 6, 6, torch.float32, True, "cpu")
    g = torch.rand(2, fused.in_chs)
    with torch.no_grad(), effops.use_backend("reference"):
        xg = x * g[:, :, None, None]
        assert_matches(fused(x, gate=g), copy.deepcopy(ref).double()(xg.double()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, same, want = fused(x, gate=g), ref(xg), fused(xg)
        assert y.dtype == same.dtype
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        with pytest.raises(ValueError, match="gate of shape"):
            fused(x, gate=g[:, 1:])
    gr = g.clone().requires_grad_()
    with effops.use_backend("reference"):
        y = fused(x, gate=gr)
    y.sum().backward()
    gr2 = g.clone().requires_grad_()
    ref(x * gr2[:, :, None, None]).sum().backward()
    torch.testing.assert_close(gr.grad, gr2.grad, rtol=1e-5, atol=1e-6)
    fused.train(), ref.train()
    torch.testing.assert_close(fused(x, gate=g), ref(x * g[:, :, None, None]), rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("variant", ["v1_odd", "v3_train"])
def test_gate_argument_triton(variant):
    ref = _orig(variant)
    fused = FusedGhostModule.from_module(copy.deepcopy(ref))
    x = _x(fused.in_chs, 2, 5, 5)
    g = torch.rand(2, fused.in_chs, device=DEV)
    with torch.no_grad(), effops.use_backend("triton"):
        y = fused(x, gate=g)
    with torch.no_grad():
        assert_matches(y, copy.deepcopy(ref).double()((x * g[:, :, None, None]).double()))


@needs_triton
def test_se_gate_into_ghost_module_triton_dispatches_no_se_apply(monkeypatch):
    model = _se_bottleneck(stride=1)
    fast = effops.optimize(copy.deepcopy(model)).to(DEV)
    x = _x(6, 2, 5, 5)
    calls = count_dispatch(monkeypatch)
    with torch.no_grad(), effops.use_backend("triton"):
        y = fast(x)
    assert "se_apply" not in calls and "se_gate" in calls, calls
    assert_matches(y, copy.deepcopy(model).to(DEV).double()(x.double()))


@pytest.mark.slow
def test_compile_fullgraph():
    """Ghost modules (V1 and the gated V2) and a RepVGG block trace as one graph, without breaks
    (``aot_eager``: tracing and the ops' fake implementations, not Inductor's code generation)."""
    from timm.models.byobnet import RepVggBlock

    torch._dynamo.reset()
    model = nn.Sequential(GhostModuleV2(5, 9), GhostModule(9, 7, act_layer=nn.Identity), RepVggBlock(7, 7))
    fast = effops.optimize(randomize_bn(model).eval())
    assert [type(m).__name__ for m in fast] == ["FusedGhostModule", "FusedGhostModule", "FusedRepVGGBlock"]
    x = _x(5, device="cpu")
    with torch.no_grad(), effops.use_backend("reference"):
        y = torch.compile(fast, fullgraph=True, backend="aot_eager")(x)
    assert_matches(y, copy.deepcopy(model).double()(x.double()))
