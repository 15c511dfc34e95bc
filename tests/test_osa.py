"""FusedOSA against the classic OSA module and timm's OsaBlock: eval and train, every variant."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import effops
from effops.ops.conv import native_fast
from effops import EffectiveSE, FusedOSA, FusedOSAStages
from effops.models import classic_vovnet, vovnet27_slim
from effops.models.classic_vovnet import OSAModule
from effops.ops import osa as osa_ops

from helpers import (DTYPES, KERNEL_DEVICE, TRITON_RUNS, assert_matches, assert_same_state_and_grads, assert_same_step,
                     count_dispatch, device_branch, needs_triton, randomize_bn)

DEV = KERNEL_DEVICE

# (in_ch, stage_ch, concat_ch, layer_per_block, identity, ese, depthwise): small, odd channel counts.
VARIANTS = {
    "v1": (6, 5, 12, 3, False, False, False),
    "identity": (12, 5, 12, 2, True, False, False),
    "ese": (6, 5, 12, 3, False, True, False),
    "v2": (12, 7, 12, 3, True, True, False),
    "dw_reduced": (6, 5, 12, 2, False, True, False),  # depthwise with the 1x1 reduction (in != stage)
    "dw_identity": (10, 10, 10, 3, True, True, True),
    "one_layer": (9, 4, 7, 1, False, False, False),
}
VARIANTS["dw_reduced"] = (6, 5, 12, 2, False, True, True)


def _classic(variant, name="OSA2_1"):
    in_ch, sc, cc, L, identity, ese, dw = VARIANTS[variant]
    ref = randomize_bn(OSAModule(in_ch, sc, cc, L, name, identity=identity, ese=ese, depthwise=dw))
    with torch.no_grad():  # larger weights than the default init, so the gate and ReLUs see real ranges
        for m in ref.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(1.5)
    return ref.to(DEV)


def _x(c, n=2, h=5, w=7, dtype=torch.float32, channels_last=True):
    x = torch.randn(n, c, h, w, device=DEV, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("variant", ["dw_reduced", "dw_identity", "dw_wide", "v2"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_native_cpu_eval_matches_classic_module(variant, compiled):
    """The native CPU path (eager: the modules' native calls; compiled: the osa_block_native op)
    within 1e-5 of float64, on maps tall enough for several bands per thread; with
    16 or more stage channels each depthwise stage runs as one banded depthwise -> 1x1 pair."""
    if not native_fast(torch.empty(1)):
        pytest.skip("the native backend is not the CPU backend in this run (EFFOPS_CPU_BACKEND=triton)")
    if variant == "dw_wide":
        ref = randomize_bn(OSAModule(12, 16, 24, 2, "OSA2_1", identity=False, ese=True, depthwise=True)).eval()
    else:
        ref = _classic(variant).eval().cpu()
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    x = torch.randn(2, fused.in_ch, 19, 13).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    mod = effops.native.module()
    before = mod.dw_pair_policy()
    mod.set_dw_pair_policy(1)  # banded wherever it applies (2, the default, measures)
    try:
        with torch.no_grad():
            run = torch.compile(fused, fullgraph=True, backend="eager") if compiled else fused
            run(x)  # the first call plans each conv
            with torch.profiler.profile() as prof:
                y = run(x)
    finally:
        mod.set_dw_pair_policy(before)
    pairs = sum(1 for e in prof.events() if e.name == "effops::depthwise_pointwise")
    assert pairs == (2 if variant == "dw_wide" else 0)
    # compiled: the whole block is one C++ op call, no Python between its convs
    assert sum(1 for e in prof.events() if e.name == "effops::osa_block_native") == (1 if compiled else 0)
    assert_matches(y, copy.deepcopy(ref).double()(x.double()))


@pytest.mark.parametrize("variant", ["dw_identity", "v2"])
def test_native_cpu_compiled_with_freezing_takes_tensors_as_constants(variant):
    """Under inductor's freezing the compiled block's weights, BN scales and biases are constants of
    the trace (no guard per tensor); a parameter assigned afterwards retraces."""
    if not native_fast(torch.empty(1)):
        pytest.skip("the native backend is not the CPU backend in this run (EFFOPS_CPU_BACKEND=triton)")
    import torch._inductor.config as inductor_config
    from test_compile_native_cpu import _guard_lines

    ref = _classic(variant).eval().cpu()
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    x = torch.randn(2, fused.in_ch, 9, 7).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch.no_grad(), inductor_config.patch(freezing=True):
        run = torch.compile(fused)
        lines = _guard_lines(lambda: run(x))
        assert any("TENSOR_MATCH" in g for g in lines)  # the log was captured
        assert [g for g in lines if "_parameters['weight']" in g or "_buffers['running_var']" in g] == []
        assert_matches(run(x), copy.deepcopy(ref).double()(x.double()))
        conv = fused._parts.agg.fused.conv
        w = torch.randn_like(conv.weight)
        conv.weight = nn.Parameter(w)
        ref_conv = dict(ref.named_modules())[dict((m, n) for n, m in fused.named_modules())[conv]]
        ref_conv.weight = nn.Parameter(w.clone())
        assert_matches(run(x), copy.deepcopy(ref).double()(x.double()))


def _spy_steps(monkeypatch) -> list:
    """Record each call of the native ``osa_block_steps`` (FusedOSA's one-call steady state)."""
    mod = effops.native.module()
    calls, real = [], mod.osa_block_steps
    monkeypatch.setattr(mod, "osa_block_steps", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _needs_native():
    if not native_fast(torch.empty(1)):
        pytest.skip("the native backend is not the CPU backend in this run (EFFOPS_CPU_BACKEND=triton)")


def _v2_steady_state(monkeypatch):
    """A classic VoVNetV2 block and its FusedOSA on the native backend, an input, and a spy on
    osa_block_steps."""
    _needs_native()
    ref = _classic("v2").eval().cpu()
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    return ref, fused, _x(fused.in_ch, h=6, w=5).cpu(), _spy_steps(monkeypatch)


def _dw_wide():
    return randomize_bn(OSAModule(12, 16, 24, 2, "OSA2_1", identity=False, ese=True, depthwise=True))


@pytest.mark.parametrize("variant", list(VARIANTS) + ["dw_wide"])
def test_native_steady_state_is_one_call_equal_to_the_per_op_path(monkeypatch, variant):
    """From the second eager call on (the first plans each conv), CPU float32 inference runs the
    whole block as one native call (osa_block_steps) whose result is bit-identical to the per-op
    native path's and within 1e-5 of float64."""
    _needs_native()
    ref = (_dw_wide() if variant == "dw_wide" else _classic(variant)).eval().cpu()
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    x = torch.randn(2, fused.in_ch, 11, 9).contiguous(memory_format=torch.channels_last)
    calls = _spy_steps(monkeypatch)
    with torch.no_grad():
        first = fused(x)
        assert calls == []  # the units had no plans yet: the per-op path ran (and planned them)
        y = fused(x)
        assert calls == [1]
        monkeypatch.setattr(FusedOSA, "_native_steps", lambda self, x, identity: None)
        per_op = fused(x)
    assert torch.equal(y, per_op) and torch.equal(y, first)
    assert_matches(y, copy.deepcopy(ref).double()(x.double()))


def test_native_steady_state_reads_the_live_modules(monkeypatch):
    """The one-call path gathers the modules' tensors on every call (a replaced weight, updated
    running statistics are used) and leaves to the full path whatever its guards reject: a hook
    on a child, train mode, gradients, another dtype, a changed setting (here the aggregation's
    padding, which makes the block unfusable: the full path says so)."""
    ref, fused, x, calls = _v2_steady_state(monkeypatch)
    agg, ref_agg = fused.concat[0], ref.concat[0]
    with torch.no_grad():
        fused(x)
        w = torch.randn_like(agg.weight)
        agg.weight = nn.Parameter(w.clone())
        ref_agg.weight = nn.Parameter(w.clone())
        fused.layers[0][1].running_mean.add_(0.25)
        ref.layers[0][1].running_mean.add_(0.25)
        y = fused(x)
        assert calls == [1]
        assert_matches(y, copy.deepcopy(ref).double()(x.double()))
        h = fused.layers[1][0].register_forward_hook(lambda m, i, o: None)
        fused(x)
        h.remove()
        fused.train()
        fused(x)
        fused.eval()
        twin = copy.deepcopy(fused).double()
        twin(x.double())
        twin(x.double())
        assert calls == [1]
    fused(x)  # gradients enabled, parameters that require them
    assert calls == [1]
    with torch.no_grad():
        fused(x)
        assert calls == [1, 1]
        agg.padding = (1, 1)
        with pytest.raises(ValueError, match="aggregation conv must be a plain 1x1 conv"):
            fused(x)
    assert calls == [1, 1]


def test_native_steady_state_cache_sees_writes_no_hook_reports(monkeypatch):
    """After one full gather, calls reuse its osa_block_steps arguments only while every object
    they were read from is the same: a weight assigned into ``_parameters`` directly (no
    registration hook), a BN's eps, one BN put in train mode, a weight's values or dtype changed
    through ``.data`` (same Parameter) all take effect, as in a block that never cached."""
    ref, fused, x, calls = _v2_steady_state(monkeypatch)
    agg, ref_agg = fused.concat[0], ref.concat[0]
    bn, ref_bn = fused.layers[0][1], ref.layers[0][1]

    def same_as_ref():
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))

    with torch.no_grad():
        fused(x)  # plans the units
        fused(x)  # gathers the arguments once, caches them
        assert fused._steps_cache is not None and calls == [1]
        assert copy.deepcopy(fused)._steps_cache is None  # a copy reads its own modules
        w = torch.randn_like(agg.weight)
        agg._parameters["weight"] = nn.Parameter(w.clone())
        ref_agg._parameters["weight"] = nn.Parameter(w.clone())
        same_as_ref()
        same_as_ref()  # the second call after the write: cached again, with the new weight
        assert calls == [1, 1, 1]
        bn.eps = ref_bn.eps = 0.25
        same_as_ref()
        agg.weight.data = torch.randn_like(w)  # new values under the same Parameter
        ref_agg.weight.data = agg.weight.data.clone()
        same_as_ref()
        bn.train()  # this BN alone: batch statistics, running statistics updated, as PyTorch does
        ref_bn.train()
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
        bn.eval()
        ref_bn.eval()
        same_as_ref()
        n = len(calls)
        same_as_ref()
        assert len(calls) == n + 1 and fused._steps_cache is not None
        agg.weight.data = agg.weight.data.double()  # another dtype under the same Parameter
        y = fused(x)
        assert fused._steps_cache is None  # the native call refused the cached arguments
        torch.testing.assert_close(y, FusedOSA.from_module(copy.deepcopy(fused)).eval()(x), rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eval_matches_classic_module(variant, dtype):
    ref = _classic(variant).eval()
    fused = FusedOSA.from_module(copy.deepcopy(ref)).to(dtype)
    x = _x(fused.in_ch, dtype=dtype)
    with torch.no_grad():
        ref64 = copy.deepcopy(ref).double()(x.double())
        same = copy.deepcopy(ref).to(dtype)(x) if dtype != torch.float32 else None
        with effops.use_backend("triton"):
            y = fused(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y, ref64, same, fp32_tol=1e-5)


@pytest.mark.parametrize("variant", ["v1", "v2", "dw_reduced"])
def test_eval_reference_backend(variant):
    ref = _classic(variant).eval().cpu()
    fused = FusedOSA.from_module(copy.deepcopy(ref))
    x = torch.randn(3, fused.in_ch, 6, 5)  # NCHW in, NCHW out
    with torch.no_grad(), effops.use_backend("reference"):
        y = fused(x)
        assert y.is_contiguous()
        assert_matches(y, copy.deepcopy(ref).double()(x.double()))


@needs_triton
def test_nchw_and_odd_sizes_through_the_kernel():
    ref = _classic("v2").eval()
    fused = FusedOSA.from_module(copy.deepcopy(ref))
    x = _x(12, n=3, h=9, w=1, channels_last=False)
    with torch.no_grad(), effops.use_backend("triton"):
        y = fused(x)
    assert y.is_contiguous()
    assert_matches(y, copy.deepcopy(ref).double()(x.double()))


@pytest.mark.parametrize("variant", ["v1", "v2", "dw_reduced"])
def test_train_is_exactly_pytorch(variant):
    ref = _classic(variant).train()
    fused = FusedOSA.from_module(copy.deepcopy(ref)).train()
    for _ in range(2):
        assert_same_step(ref, fused, _x(fused.in_ch))
    assert_same_state_and_grads(ref, fused)


@needs_triton
def test_eval_after_training_uses_updated_statistics():
    ref = _classic("v1").train()
    fused = FusedOSA.from_module(copy.deepcopy(ref)).train()
    x = _x(fused.in_ch)
    ref(x), fused(x)
    ref.eval(), fused.eval()
    with torch.no_grad(), effops.use_backend("triton"):
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))


def test_eval_with_autograd_gives_pytorch_gradients():
    ref = _classic("v2").eval()
    fused = FusedOSA.from_module(copy.deepcopy(ref))
    x1 = _x(fused.in_ch).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y_ref, y = ref(x1), fused(x2)
    torch.testing.assert_close(y, y_ref)
    y_ref.sum().backward()
    y.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(fused.ese.fc.weight.grad, ref.ese.fc.weight.grad)


class _Allocations(TorchDispatchMode):
    """Records every ATen op, and the shape of every *new* tensor it returns: outputs
    that alias an input (views, in-place ops, ``set_``) are recorded with shape None."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rets = func._schema.returns
        fresh = isinstance(out, torch.Tensor) and rets and rets[0].alias_info is None
        self.calls.append((func, tuple(out.shape) if fresh else None))
        return out


@needs_triton
@pytest.mark.parametrize("variant", ["v1", "v2", "dw_identity"])
def test_no_concat_is_materialised(variant):
    ref = _classic(variant).eval()
    fused = FusedOSA.from_module(copy.deepcopy(ref))
    in_ch, sc, L = fused.in_ch, fused.stage_ch, fused.layer_per_block
    x = _x(in_ch)
    with torch.no_grad(), effops.use_backend("triton"):
        fused(x)  # warm the folded-weight cache: the recorded call is the steady state
        with _Allocations() as rec:
            y = fused(x)
    names = [str(f) for f, _ in rec.calls]
    assert not any("cat" in n for n in names), names
    four_d = [s for _, s in rec.calls if s is not None and len(s) == 4 and s[0] == x.shape[0]]
    n = x.shape[0]
    assert (n, in_ch + L * sc, 5, 7) not in four_d  # the concat never exists
    # Exactly two activation tensors: the single stage buffer and the output (no depthwise scratch either).
    assert sorted(four_d) == sorted([(n, L * sc, 5, 7), (n, fused.concat_ch, 5, 7)]), four_d
    # ...and the reference backend, for contrast, does build the concat.
    with torch.no_grad(), effops.use_backend("reference"), _Allocations() as rec:
        torch.testing.assert_close(fused(x), y)
    assert any("cat" in str(f) for f, _ in rec.calls)
    with torch.no_grad():  # and the concat-free output is the classic block's (PyTorch, fp64)
        assert_matches(y, copy.deepcopy(ref).double()(x.double()))


def test_state_dict_is_the_classic_layout():
    ref = _classic("v2", name="OSA4_2")
    fused = FusedOSA(12, 7, 12, 3, identity=True, ese=True, name="OSA4_2")
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fused.state_dict(), strict=True)
    assert "layers.0.OSA4_2_0/conv.weight" in fused.state_dict() and "ese.fc.bias" in fused.state_dict()
    dw = FusedOSA(6, 5, 12, 2, ese=True, depthwise=True, name="OSA2_1")
    dw_ref = _classic("dw_reduced")
    assert list(dw.state_dict()) == list(dw_ref.state_dict())
    assert isinstance(fused.ese, EffectiveSE)
    # Each loaded tensor lands where the classic block uses it: same output as the classic block.
    dw.load_state_dict(dw_ref.state_dict(), strict=True)
    for block, classic in ((fused, ref), (dw, dw_ref)):
        block, classic = block.cpu().eval(), classic.cpu().eval()
        x = torch.randn(2, block.in_ch, 5, 6)
        with torch.no_grad(), effops.use_backend("reference"):
            assert_matches(block(x), copy.deepcopy(classic).double()(x.double()))


def test_bad_configurations_are_clear_errors():
    with pytest.raises(ValueError, match="layer_per_block must be a positive int"):
        FusedOSA(8, 4, 16, layer_per_block=0)
    with pytest.raises(ValueError, match="in_ch == concat_ch"):
        FusedOSA(8, 4, 16, identity=True)
    with pytest.raises(ValueError, match="stage_ch must be a positive int"):
        FusedOSA(8, 0, 16)
    ckpt = _classic("v1").state_dict()  # in 6, stage 5, concat 12, 3 layers
    with pytest.raises(RuntimeError, match="size mismatch for layers.0.OSA2_1_0/conv.weight"):
        FusedOSA(6, 4, 12, 3, name="OSA2_1").load_state_dict(ckpt)
    with pytest.raises(RuntimeError, match="Unexpected key.*layers.2.OSA2_1_2"):
        FusedOSA(6, 5, 12, 2, name="OSA2_1").load_state_dict(ckpt)  # checkpoint has 3 layers


def test_from_module_refuses_what_it_cannot_fuse():
    ref = _classic("v1")
    ref.concat[2] = nn.Tanh()
    with pytest.raises(ValueError, match="Tanh is not supported"):
        FusedOSA.from_module(ref)
    ref = _classic("v1")
    ref.layers[1][0].stride = (2, 2)
    with pytest.raises(ValueError, match="size-preserving"):
        FusedOSA.from_module(ref)
    with pytest.raises(ValueError, match="not an OSA block"):
        FusedOSA.from_module(nn.Sequential(nn.Conv2d(3, 3, 1)))


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON_RUNS else []))
def test_bad_inputs_are_clear_errors(backend):
    fused = FusedOSA.from_module(_classic("v1").cpu()).eval()
    with torch.no_grad(), effops.use_backend(backend):
        with pytest.raises(ValueError, match="expected an input with 6 channels"):
            fused(torch.randn(1, 5, 4, 4))
        with pytest.raises(ValueError, match="4-D input"):
            fused(torch.randn(6, 4, 4))
        with pytest.raises(TypeError, match="floating-point"):
            fused(torch.ones(1, 6, 4, 4, dtype=torch.int32))
        with pytest.raises(TypeError, match="expected the same dtype"):
            fused(torch.randn(1, 6, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON_RUNS else []))
def test_empty_batch(backend):
    ref = _classic("v2").cpu().eval()
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    x = torch.randn(0, 12, 5, 7)
    with torch.no_grad(), effops.use_backend(backend):
        y = fused(x)
    assert y.shape == (0, 12, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x), rtol=0, atol=0)  # shape, dtype, device as PyTorch's


def test_checked_op_validates_arguments():
    x = torch.randn(1, 4, 3, 3)
    w = [torch.randn(2, 4, 3, 3)]
    with pytest.raises(ValueError, match="concat_ch, 6, 1, 1"):
        effops.ops.osa_block(x, w, [None], torch.randn(5, 7, 1, 1))
    with pytest.raises(ValueError, match="at least one stage conv"):
        effops.ops.osa_block(x, [], [], torch.randn(5, 4, 1, 1))
    with pytest.raises(ValueError, match="after a depthwise conv the stage conv is pointwise"):
        effops.ops.osa_block(x, w, [None], torch.randn(5, 6, 1, 1), dw_ws=[torch.randn(4, 1, 3, 3)])


@needs_triton
@pytest.mark.parametrize("name", ["ese_vovnet19b_dw", "ese_vovnet39b"])
def test_timm_osa_block(name):
    pytest.importorskip("timm")
    from timm.models.vovnet import OsaBlock

    dw = name.endswith("_dw")
    # One block of each kind, small: with eSE; depthwise with the reduction conv / residual without.
    for kw in (dict(in_chs=8, residual=False), dict(in_chs=12, residual=True)):
        blk = OsaBlock(mid_chs=12 if dw else 6, out_chs=12, layer_per_block=3, depthwise=dw, attn="ese", **kw)
        blk = randomize_bn(blk).eval().to(DEV)
        fused = FusedOSA.from_module(copy.deepcopy(blk))
        assert list(fused.state_dict()) == list(blk.state_dict())
        assert fused.depthwise == dw and fused.has_ese and fused.identity == kw["residual"]
        x = _x(kw["in_chs"], h=6, w=5)
        with torch.no_grad(), effops.use_backend("triton"):
            assert_matches(fused(x), copy.deepcopy(blk).double()(x.double()))


@pytest.mark.slow
@pytest.mark.parametrize("v2", [False, True])
def test_effops_models_load_the_classic_checkpoint(v2):
    ref = randomize_bn(classic_vovnet("vovnet27_slim", num_classes=10, v2=v2)).eval()
    model = vovnet27_slim(v2=v2, num_classes=10)
    assert sum(isinstance(m, FusedOSA) for m in model.modules()) == 4
    assert sum(isinstance(m, FusedOSA) and m.has_ese for m in model.modules()) == (4 if v2 else 0)
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(model.eval()(x), copy.deepcopy(ref).double()(x.double()))


@pytest.mark.slow
def test_optimize_converts_classic_v2_vovnet39_blocks_with_identity():
    model = classic_vovnet("vovnet39", num_classes=10, v2=True)
    fast = effops.optimize(model)
    osa = {e.path: e.what for e in fast.effops_report.swapped if e.what.startswith("OSA")}
    assert osa["stage4.OSA4_2"] == "OSA 768→5×192→768 + eSE + identity (relu)"
    assert osa["stage4.OSA4_1"] == "OSA 512→5×192→768 (relu)"
    assert not fast.effops_report.skipped


def test_shared_conv_inside_a_block_is_not_fused():
    ref = _classic("identity").cpu()
    shared = nn.Sequential(ref, nn.Sequential(ref.concat[0]))  # the aggregation conv is used twice
    fast = effops.optimize(shared)
    assert not any(isinstance(m, FusedOSA) for m in fast.modules())
    assert any("OSA block not fused" in e.what and "shared" in e.what for e in fast.effops_report.skipped)


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON_RUNS else []))
@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("device_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_runs_in_the_autocast_dtype(device_dtype, variant, backend):
    """Under torch.autocast the block runs in the autocast dtype, held to the half-precision
    rule: its error against fp64 at most 2x that of the original modules under the same
    autocast on the same device (PyTorch's own mixed precision) + eps, and in PyTorch's
    output dtype: with the identity (v2) float32, the residual add promoting the
    autocast-dtype block output with the float32 input."""
    dev = "cpu" if backend == "reference" else KERNEL_DEVICE
    ref = _classic(variant).eval().to(dev)
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    x = torch.randn(2, fused.in_ch, 5, 7, device=dev).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref64 = copy.deepcopy(ref).double()(x.double())
        with torch.autocast(dev, dtype=device_dtype):
            y_ref = ref(x)
            with effops.use_backend(backend):
                y = fused(x)
    assert y_ref.dtype == (torch.float32 if fused.identity else device_dtype)
    assert y.dtype == y_ref.dtype
    # Computed in the autocast dtype: judged by the half-precision rule (both rounded alike).
    assert_matches(y.to(device_dtype), ref64, y_ref.to(device_dtype))


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("in_ch, stage_ch, concat_ch, v2", [(256, 160, 512, False), (768, 192, 768, True)],
                         ids=["s3_v1", "s4_v2"])
def test_peak_activation_memory_at_most_0_6x_eager(in_ch, stage_ch, concat_ch, v2):
    """The issue's memory target, measured as an allocation model (any device): the
    bytes of tensors allocated during one eval forward and alive at once. Real
    VoVNet-39 channel counts; the ratio does not depend on the spatial size."""
    from effops.benchmark import LiveTensorBytes

    ref = OSAModule(in_ch, stage_ch, concat_ch, 5, "OSA", identity=v2, ese=v2).eval().to(DEV)
    fused = FusedOSA.from_module(copy.deepcopy(ref))
    x = _x(in_ch, n=2, h=3, w=3)
    with torch.no_grad(), effops.use_backend("triton"):
        fused(x)
        with LiveTensorBytes() as eager:
            y_ref = ref(x)
        with LiveTensorBytes() as ours:
            y = fused(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert_matches(y, copy.deepcopy(ref).double()(x.double()))
    # effops holds exactly the stage buffer and the output (+ a few bytes of eSE sums/gates).
    buf = 2 * 5 * stage_ch * 9 * 4
    assert buf + y.untyped_storage().nbytes() <= ours.peak <= buf + y.untyped_storage().nbytes() + 2 * 2 * concat_ch * 4 * 4
    assert ours.peak <= 0.6 * eager.peak, f"effops peak {ours.peak} B vs eager {eager.peak} B"


@needs_triton
def test_deepcopy_pickle_and_eval_train_eval():
    import io

    ref = _classic("v2")
    ref_before = copy.deepcopy(ref).eval()  # the state the copies below are taken in
    fused = FusedOSA.from_module(copy.deepcopy(ref))
    twin = copy.deepcopy(fused)  # e.g. an EMA copy: shares modules internally, not with the original
    assert twin._parts.agg.fused.conv is twin.concat[0] and twin.concat[0] is not fused.concat[0]
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded._parts.ese is loaded.ese
    x = _x(fused.in_ch)
    ref.eval(), fused.eval()
    with torch.no_grad(), effops.use_backend("triton"):
        fused(x)  # warm the folded caches
    ref.train(), fused.train()
    for _ in range(3):  # running statistics move
        ref(x), fused(x)
    ref.eval(), fused.eval()
    with torch.no_grad(), effops.use_backend("triton"):
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
    # The copies compute with their own state (the original's running statistics have moved
    # since): a copy still reading the original's modules would match the trained block instead.
    with torch.no_grad(), effops.use_backend("reference"):
        before64 = copy.deepcopy(ref_before).double()(x.double())
        for copied in (twin, loaded):
            assert_matches(copied.eval()(x), before64)


@pytest.fixture
def device_launch_path(monkeypatch):
    """Run the launchers' *device* branch (heuristic tiles, as with EFFOPS_AUTOTUNE=0 or
    during CUDA-graph capture) on CPU tensors under the interpreter. Without a GPU
    this code would otherwise never execute before reaching one."""
    from effops.ops import conv

    device_branch(monkeypatch, autotune=False)
    calls = []
    for mod, name in ((conv, "_heuristic_meta"), (osa_ops, "_heuristic_meta"), (osa_ops, "_dw_pw_heuristic")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["v1", "v2", "dw_reduced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_device_launch_path_under_the_interpreter(device_launch_path, variant, dtype):
    calls = device_launch_path
    ref = _classic(variant).eval()
    fused = FusedOSA.from_module(copy.deepcopy(ref)).to(dtype)
    # Enough pixels (2 x 9 x 10 = 180) that the heuristic 64-row tiles leave a ragged last tile.
    x = _x(fused.in_ch, n=2, h=9, w=10, dtype=dtype)
    with torch.no_grad():
        ref64 = copy.deepcopy(ref).double()(x.double())
        same = copy.deepcopy(ref).to(dtype)(x) if dtype != torch.float32 else None
        with effops.use_backend("triton"):
            y = fused(x)
    assert_matches(y, ref64, same)
    L = fused.layer_per_block
    expected = (["_dw_pw_heuristic"] * L if fused.depthwise else ["_heuristic_meta"] * L) + ["_heuristic_meta"]
    assert sorted(calls) == sorted(expected + (["_heuristic_meta"] if variant == "dw_reduced" else []))


@pytest.mark.parametrize("copy_first", [False, True])
def test_hooks_on_children_make_the_block_call_them(monkeypatch, copy_first):
    ref = _classic("v2")
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    if copy_first:  # the hook registry tuple must follow the copy (an EMA twin, say)
        fused = copy.deepcopy(fused)
    ref.eval()
    calls = count_dispatch(monkeypatch)
    seen, seen_ref = [], []
    handles = [fused.layers[1][0].register_forward_hook(lambda m, i, o: seen.append(o)),
               ref.layers[1][0].register_forward_hook(lambda m, i, o: seen_ref.append(o)),
               fused.ese.register_forward_pre_hook(lambda m, i: seen.append(i[0])),
               ref.ese.register_forward_pre_hook(lambda m, i: seen_ref.append(i[0]))]
    x = _x(fused.in_ch)
    with torch.no_grad():
        y, y_ref = fused(x), ref(x)
        assert calls == [] and len(seen) == 2
        for a, b in zip(seen, seen_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for h in handles:
            h.remove()
        fused(x)
    # The native CPU path runs the block's convs itself (the eSE squeeze with the aggregation) and
    # dispatches only the gate's application.
    assert calls == (["se_apply"] if native_fast(x) else ["osa_block"])


@needs_triton
def test_stage_convs_take_the_tma_kernel_when_the_tuner_picks_it(monkeypatch):
    """The stage convs read and write channel views of the NHWC stage buffer: with 8-aligned
    channel counts they qualify for the TMA kernel, and the block still matches PyTorch."""
    import triton.testing

    from effops.ops import conv

    device_branch(monkeypatch, autotune=True)
    small = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=3)
    # Pointer tile first, then (when offered) the TMA tile, timed faster.
    monkeypatch.setattr(conv, "_candidates", lambda ci, co, tma=0: [small, dict(small, TMA=True)] if tma else [small])
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, warmup, rep, _t=iter(range(1000, 0, -1)): (fn(), next(_t))[1])
    for name in ("_dw_pw_configs", "_dw_pw_heuristic"):  # keep the other launchers' tiles small too
        monkeypatch.setattr(osa_ops, name, lambda *a: [small] if name.endswith("configs") else small)
    launched = []
    real = conv._launch_tma
    monkeypatch.setattr(conv, "_launch_tma", lambda x, w, *a: launched.append(tuple(w.shape)) or real(x, w, *a))
    ref = OSAModule(16, 8, 16, 3, "OSA2_1", identity=True, ese=False)
    randomize_bn(ref).eval()
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    x = _x(16, n=2, h=5, w=6)
    with torch.no_grad(), effops.use_backend("triton"):
        y = fused(x)
    assert set(launched) == {(8, 16, 3, 3), (8, 8, 3, 3)}  # the first stage conv reads x, the others the buffer
    with torch.no_grad():
        assert_matches(y, copy.deepcopy(ref).double()(x.double()), fp32_tol=1e-5)


# -- timm VoVNet's stages as one native chain ---------------------------------------------------------
def _ese19(num_classes=5):
    timm = pytest.importorskip("timm")
    return randomize_bn(timm.create_model("ese_vovnet19b_dw", num_classes=num_classes)).eval()


def _count_block_calls(monkeypatch) -> list:
    calls, real = [], FusedOSA.forward
    monkeypatch.setattr(FusedOSA, "forward", lambda self, x: calls.append(1) or real(self, x))
    return calls


def _stage_by_stage(stages, f):
    for s in stages:
        f = s(f)
    return f


def test_timm_stages_run_as_one_native_chain(monkeypatch):
    """optimize() makes timm VoVNet's ``stages`` a FusedOSAStages (same state_dict); once every block
    has gathered its arguments, inference runs the whole chain in one native call, bit-identical to
    the stages run one by one (the eSE gates scaled after the next max pool), within 1e-5 of float64."""
    _needs_native()
    model = _ese19()
    ref = copy.deepcopy(model)
    fast = effops.optimize(model, check_speed=False)
    assert isinstance(fast.stages, FusedOSAStages)
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert any(e.path == "stages" and e.what.startswith("VoVNet stages: 4 stages (4 OSA blocks, 3 max pools)")
               for e in fast.effops_report.swapped)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        f = fast.stem(x)
        for _ in range(3):  # plan the units, gather each block's arguments, build the chain
            fast.stages(f)
        assert fast.stages._chain is not None
        calls = _count_block_calls(monkeypatch)
        y = fast.stages(f)
        assert calls == []  # no block ran its own forward
        per_stage = _stage_by_stage(fast.stages, f)
        assert len(calls) == 4
        assert torch.equal(y, per_stage)
        assert_matches(fast(x), copy.deepcopy(ref).double()(x.double()))
        assert copy.deepcopy(fast.stages)._chain is None  # a copy builds its own
        head = fast.stages[:2]
        assert isinstance(head, FusedOSAStages) and torch.equal(head(f), _stage_by_stage(fast.stages[:2], f))


def test_timm_stages_chain_gives_way(monkeypatch):
    """A hook, a BN in train mode, a replaced pool, a weight given another dtype through ``.data``,
    another input shape, gradients: the stages run one by one (each block under its own guards),
    with the results of the modules as they are now."""
    _needs_native()
    fast = effops.optimize(_ese19(), check_speed=False)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    calls = _count_block_calls(monkeypatch)
    stages = fast.stages

    def check(f, used_chain):
        n = len(calls)
        y = stages(f)
        assert (len(calls) == n) == used_chain
        want = _stage_by_stage(list(stages), f)
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        return y

    with torch.no_grad():
        f = fast.stem(x)
        for _ in range(3):
            stages(f)
        check(f, True)
        seen = []
        h = stages[2].blocks[0].conv_mid[1].conv_pw.register_forward_hook(lambda m, i, o: seen.append(1))
        check(f, False)
        assert seen
        h.remove()
        check(f, True)  # nothing it reads changed: the same chain
        bn = stages[1].blocks[0].conv_concat.bn
        bn.train()
        check(f, False)
        bn.eval()
        stages(f)
        stages(f)
        check(f, True)
        stages[2].pool = nn.MaxPool2d(2, 2)  # a plain max pool: the chain can't take it
        check(f, False)
        check(f, False)
        stages[2].pool = effops.MaxPool2d(2, 2)
        for _ in range(3):
            stages(f)
        check(f, True)
        w = stages[3].blocks[0].conv_concat.conv.weight
        w.data = w.data.double()
        check(f, False)
        assert stages._chain is None
        w.data = w.data.float()
        f2 = fast.stem(torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last))
        check(f2, False)
    y = stages(f)  # gradients enabled: the blocks' own paths
    assert y.requires_grad


def test_compiled_model_calls_the_stages_chain_as_one_op(monkeypatch):
    """torch.compile (inductor, freezing) over an optimized timm VoVNet: inference calls the stages'
    eager path (the chain) as one op of a single graph (no graph break) rather than tracing the
    blocks, and matches float64."""
    _needs_native()
    from torch._inductor import config as inductor_config

    model = _ese19()
    ref = copy.deepcopy(model)
    fast = effops.optimize(model, check_speed=False)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch.no_grad(), inductor_config.patch(freezing=True):
        run = torch.compile(fast)
        for _ in range(3):
            run(x)
        assert fast.stages._chain is not None
        calls = _count_block_calls(monkeypatch)
        y = run(x)
        assert calls == []  # the blocks ran inside the chain
        explained = torch._dynamo.explain(fast)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    assert_matches(y, copy.deepcopy(ref).double()(x.double()))
    torch._dynamo.reset()
