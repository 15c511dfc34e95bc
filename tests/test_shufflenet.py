"""FusedShuffleV2Block against torchvision's ShuffleNetV2 ``InvertedResidual``.

Stride 1 (8→8) and stride 2 (8→16) units: fp64 structure on the reference backend; the
Triton kernels (interpreter on CPU) at 1×1 / 7×7 / 13×13, batch 1 and 3, NCHW and NHWC,
fp32 / fp16 / bf16 into a NaN-poisoned output; train mode bit-exact (outputs, gradients,
running statistics); autocast dtypes; hooks; a replaced child; ``.data`` writes; empty
batch; bad inputs; state_dict keys; the converter on whole ShuffleNetV2 models; and what an
eval forward runs (torch.profiler: no cat, no shuffle pass, one copy for the identity half).
"""
import copy
from collections import Counter

import pytest
import torch
from torch import nn

import effops
from effops.nn import shufflenet
from effops.nn.common import BLOCK_RULES
from effops.nn.shufflenet import FusedShuffleV2Block

from helpers import (DTYPES, INTERPRETER, KERNEL_DEVICE, TRITON_RUNS, assert_matches, assert_same_state_and_grads,
                     assert_same_step, count_dispatch, needs_triton, randomize_bn)

tv = pytest.importorskip("torchvision")
from torchvision.models.shufflenetv2 import InvertedResidual, ShuffleNetV2  # noqa: E402

DEV = KERNEL_DEVICE
UNITS = {"s1": (8, 8, 1), "s2": (8, 16, 2)}
BACKENDS = ["reference"] + (["native"] if effops.native.available() else []) + (["triton"] if TRITON_RUNS else [])


def _unit(name, device=DEV):
    inp, oup, stride = UNITS[name]
    ref = randomize_bn(InvertedResidual(inp, oup, stride))
    with torch.no_grad():  # larger weights than the default init: the ReLUs see both signs
        for m in ref.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(1.5)
    return ref.eval().to(device)


def _x(c, n=2, hw=7, dtype=torch.float32, channels_last=True, device=DEV):
    x = torch.randn(n, c, hw, hw, device=device).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.fixture
def poisoned(monkeypatch):
    """The block's output buffer starts as NaN: every element must be written (rel_err asserts no NaN)."""
    real = shufflenet._new_output
    monkeypatch.setattr(shufflenet, "_new_output", lambda *a: real(*a).fill_(float("nan")))


@pytest.mark.parametrize("name", list(UNITS))
def test_structure_fp64_reference_backend(name):
    ref = _unit(name, "cpu").double()
    fused = FusedShuffleV2Block.from_module(copy.deepcopy(ref))
    x = _x(UNITS[name][0], n=3, hw=6, dtype=torch.float64, channels_last=False, device="cpu")
    with torch.no_grad(), effops.use_backend("reference"):
        y = fused(x)
        assert y.dtype == torch.float64 and y.is_contiguous()
        assert_matches(y, ref(x), fp32_tol=1e-12)  # fp64 against fp64: only rounding may differ
        x32 = x.float().contiguous(memory_format=torch.channels_last)
        y32 = copy.deepcopy(fused).float()(x32)
        assert y32.is_contiguous(memory_format=torch.channels_last)
        assert_matches(y32, ref(x))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("n, hw", [(1, 1), (3, 7), (1, 13)])
@pytest.mark.parametrize("name", list(UNITS))
def test_triton_kernels_match_pytorch(poisoned, name, n, hw, channels_last, dtype):
    ref = _unit(name)
    fused = FusedShuffleV2Block.from_module(copy.deepcopy(ref)).to(dtype)
    x = _x(UNITS[name][0], n=n, hw=hw, dtype=dtype, channels_last=channels_last)
    with torch.no_grad():
        ref64 = copy.deepcopy(ref).double()(x.double())
        same = copy.deepcopy(ref).to(dtype)(x) if dtype != torch.float32 else None
        with effops.use_backend("triton"):
            y = fused(x)
    assert y.dtype == dtype and y.shape == ref64.shape
    fmt = torch.channels_last if channels_last and hw > 1 else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    assert_matches(y, ref64, same)
    if name == "s1":  # the identity half is a copy: bit-exact
        assert torch.equal(y[:, 0::2], x[:, :UNITS[name][0] // 2])


@needs_triton
@pytest.mark.parametrize("name", list(UNITS))
def test_channel_view_input(poisoned, name):
    """The input may itself be a strided channel view (every second channel of an NHWC buffer)."""
    ref = _unit(name)
    fused = FusedShuffleV2Block.from_module(copy.deepcopy(ref))
    buf = _x(2 * UNITS[name][0], n=2, hw=5)
    x = buf[:, 1::2]
    with torch.no_grad(), effops.use_backend("triton"):
        y = fused(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert_matches(y, copy.deepcopy(ref).double()(x.double()))


@pytest.mark.skipif(not effops.native.available(), reason="native CPU extension unavailable")
@pytest.mark.parametrize("layout", ["nhwc", "view", "nchw"])
@pytest.mark.parametrize("n, hw", [(1, 1), (3, 7)])
@pytest.mark.parametrize("name", list(UNITS))
def test_native_backend_matches_pytorch(poisoned, monkeypatch, name, n, hw, layout):
    """The native CPU path: each branch into a dense tensor, then one interleave pass (channel-minor
    inputs: NHWC, or a channel view); NCHW inputs write the output's channel views instead."""
    nat = effops.native.module()
    calls = []
    real = nat.interleave_channels
    monkeypatch.setattr(nat, "interleave_channels", lambda *a: calls.append(1) or real(*a), raising=False)
    ref = _unit(name, "cpu")
    fused = FusedShuffleV2Block.from_module(copy.deepcopy(ref))
    c = UNITS[name][0]
    if layout == "view":  # channels c/2 .. 3c/2 of a wider NHWC buffer
        x = _x(2 * c, n=n, hw=hw, device="cpu")[:, c // 2:c // 2 + c]
    else:
        x = _x(c, n=n, hw=hw, channels_last=layout == "nhwc", device="cpu")
    with torch.no_grad(), effops.use_backend("native"):
        y = fused(x)
        assert_matches(y, copy.deepcopy(ref).double()(x.double()))
        if name == "s1":
            assert torch.equal(y[:, 0::2], x[:, :c // 2])
    assert len(calls) == (1 if x.stride(1) == 1 else 0)  # NCHW 7x7: the channel-view writes


@pytest.mark.parametrize("name", list(UNITS))
def test_train_is_exactly_pytorch(name):
    ref = _unit(name, "cpu").train()
    fused = FusedShuffleV2Block.from_module(copy.deepcopy(ref)).train()
    for _ in range(2):
        assert_same_step(ref, fused, _x(UNITS[name][0], n=3, device="cpu"))
    assert_same_state_and_grads(ref, fused)
    # ...and eval afterwards uses the updated statistics.
    ref.eval(), fused.eval()
    x = _x(UNITS[name][0], device="cpu")
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))


def test_eval_with_autograd_gives_pytorch_gradients():
    ref = _unit("s2", "cpu")
    fused = FusedShuffleV2Block.from_module(copy.deepcopy(ref))
    x1 = _x(8, device="cpu").requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y_ref, y = ref(x1), fused(x2)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    y_ref.sum().backward()
    y.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    torch.testing.assert_close(fused.branch1[2].weight.grad, ref.branch1[2].weight.grad, rtol=0, atol=0)


def test_state_dict_keys_and_constructor():
    for inp, oup, stride in UNITS.values():
        ref = InvertedResidual(inp, oup, stride)
        fused = FusedShuffleV2Block.from_module(ref)
        assert list(fused.state_dict()) == list(ref.state_dict())
        assert fused.branch2[0] is ref.branch2[0]  # shared, not copied
        built = FusedShuffleV2Block(inp, oup, stride)
        assert list(built.state_dict()) == list(ref.state_dict())
        built.load_state_dict(randomize_bn(ref).state_dict(), strict=True)
        ref.load_state_dict(built.state_dict(), strict=True)
        assert sum(1 for _ in built.modules()) == sum(1 for _ in ref.modules())  # no duplicate registrations
        x = torch.randn(2, inp, 5, 5)
        with torch.no_grad(), effops.use_backend("reference"):
            assert_matches(built.eval()(x), copy.deepcopy(ref).eval().double()(x.double()))
    with pytest.raises(ValueError, match="stride 1 needs inp == oup"):
        FusedShuffleV2Block(8, 16, 1)
    with pytest.raises(ValueError, match="oup must be even"):
        FusedShuffleV2Block(8, 15, 2)


@needs_triton
def test_data_writes_are_seen_after_refresh():
    ref = _unit("s1")
    fused = FusedShuffleV2Block.from_module(copy.deepcopy(ref))
    x = _x(8)
    with torch.no_grad(), effops.use_backend("triton"):
        fused(x)
        for m in (ref, fused):  # .data writes do not bump the version counters: refresh() says so
            m.branch2[4].running_var.data.mul_(3.0)
            m.branch2[5].weight.data.neg_()
        effops.refresh()
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))


@needs_triton
@pytest.mark.parametrize("name", list(UNITS))
def test_eval_forward_runs_no_cat_and_no_shuffle_pass(monkeypatch, name):
    """torch.profiler over one steady-state eval forward on the Triton backend: the top-level ATen
    ops are exactly the allocation of the output and the conv intermediates (no BN scale/bias
    ops: those are derived once per BN state), the channel slices of the split / the interleaved output views, and
    (stride 1) one copy of the identity half; plus one kernel launch per conv."""
    from torch.profiler import ProfilerActivity, profile, record_function

    if INTERPRETER:  # the interpreter's own argument copies happen inside the launch: label them
        import triton.runtime.interpreter as interp

        real = interp.InterpretedFunction.run

        def run(self, *a, **k):
            with record_function("kernel:" + self.fn.__name__):
                return real(self, *a, **k)

        monkeypatch.setattr(interp.InterpretedFunction, "run", run)

    def top_level(prof):  # ATen ops and launches not called from inside another one
        def outer(e):
            p = e.cpu_parent
            while p is not None:
                if p.name.startswith(("aten::", "kernel:")):
                    return False
                p = p.cpu_parent
            return True

        return [e for e in prof.events() if e.name.startswith(("aten::", "kernel:")) and outer(e)]

    ref = _unit(name).to(memory_format=torch.channels_last)  # GEMM weights as the kernels read them: no relayout
    fused = FusedShuffleV2Block.from_module(copy.deepcopy(ref))
    steps = fused._plan.left + fused._plan.right
    x = _x(UNITS[name][0], n=1, hw=5)
    with torch.no_grad(), effops.use_backend("triton"):
        y = fused(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            y = fused(x)
    events = top_level(prof)
    got = Counter(e.name for e in events)
    stride1 = name == "s1"
    expected = Counter()
    expected["aten::empty"] += 1 + len(steps) - (1 if stride1 else 2)  # the output + each branch's intermediates
    expected["aten::slice"] += 2 + (2 if stride1 else 0)  # out[:, 0::2], out[:, 1::2] (+ x[:, :C/2], x[:, C/2:])
    if stride1:
        expected["aten::copy_"] += 1  # the identity half
    if INTERPRETER:
        expected["kernel:_conv_bn_act_kernel"] += sum(f.conv.groups == 1 for f in steps)
        expected["kernel:_depthwise_kernel"] += sum(f.conv.groups > 1 for f in steps)
    assert got == expected, (sorted(got.items()), sorted(expected.items()))
    if stride1:  # the copy is x[:, :4] into out[:, 0::2]
        assert [e.input_shapes[:2] for e in events if e.name == "aten::copy_"] == [[[1, 4, 5, 5], [1, 4, 5, 5]]]
    with torch.no_grad():
        assert_matches(y, copy.deepcopy(ref).double()(x.double()))
    # The eager unit, for contrast, concatenates and shuffles with a copy.
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        ref(x)
    eager = Counter(e.name for e in prof.events())
    assert eager["aten::cat"] == 1 and eager["aten::transpose"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_make_the_block_call_its_modules(monkeypatch, backend):
    ref = _unit("s1", "cpu")
    fused = FusedShuffleV2Block.from_module(copy.deepcopy(ref))
    calls = count_dispatch(monkeypatch)
    seen, seen_ref = [], []
    h = fused.branch2[5].register_forward_hook(lambda m, i, o: seen.append(o))
    ref.branch2[5].register_forward_hook(lambda m, i, o: seen_ref.append(o))
    x = _x(8, device="cpu")
    with torch.no_grad(), effops.use_backend(backend):
        y = fused(x)
        assert calls == [] and len(seen) == 1
        torch.testing.assert_close(y, ref(x), rtol=0, atol=0)
        torch.testing.assert_close(seen[0], seen_ref[0], rtol=0, atol=0)
        h.remove()
        fused(x)
    # Without the hook the fused path runs again: through the dispatcher, or (native) by one
    # direct native call per conv and the interleave.
    assert calls == ([] if backend == "native" else ["conv_bn_act"] * 3)
    if backend == "native":
        nat, interleaved = effops.native.module(), []
        real = nat.interleave_channels
        monkeypatch.setattr(nat, "interleave_channels", lambda *a: interleaved.append(1) or real(*a),
                            raising=False)
        with torch.no_grad(), effops.use_backend(backend):
            assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        assert interleaved == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_child_is_seen(backend):
    ref = _unit("s2", "cpu")
    fused = FusedShuffleV2Block.from_module(copy.deepcopy(ref))
    x = _x(8, device="cpu")
    with torch.no_grad(), effops.use_backend(backend):
        fused(x)
        ref.branch1[4] = nn.SiLU()  # still a conv-BN-act chain: parsed again, still fused
        fused.branch1[4] = nn.SiLU()
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        assert "conv1x1+bn+silu writes shuffled channels 0::2" in fused.describe()
        ref.branch2[6] = nn.Dropout().eval()  # not conv → BN → act any more: PyTorch's forward, with a warning
        fused.branch2[6] = nn.Dropout().eval()
        with pytest.warns(UserWarning, match="runs unfused.*branch2.6: Dropout is not a supported activation"):
            y = fused(x)
        torch.testing.assert_close(y, ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(UNITS))
@pytest.mark.parametrize("ac_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_result_dtype_as_pytorch(ac_dtype, name, backend):
    """Under autocast the convs run in the autocast dtype; stride 1 returns float32 as
    PyTorch does (torch.cat promotes the float32 identity half with branch2's output)."""
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    ref = _unit(name, dev)
    fused = FusedShuffleV2Block.from_module(copy.deepcopy(ref))
    x = _x(UNITS[name][0], device=dev)
    with torch.no_grad():
        ref64 = copy.deepcopy(ref).double()(x.double())
        with torch.autocast(dev, dtype=ac_dtype):
            y_ref = ref(x)
            with effops.use_backend(backend):
                if backend == "native" and ac_dtype == torch.float16:  # forced, and it has no float16
                    with pytest.raises(effops.BackendUnavailable, match="float32 or bfloat16, got torch.float16"):
                        fused(x)
                    return
                y = fused(x)
    assert y_ref.dtype == (torch.float32 if name == "s1" else ac_dtype)
    assert y.dtype == y_ref.dtype
    assert_matches(y.to(ac_dtype), ref64, y_ref.to(ac_dtype))
    if name == "s1":
        assert torch.equal(y[:, 0::2], x[:, :4])  # the identity half keeps float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(UNITS))
def test_empty_batch(name, backend):
    ref = _unit(name, "cpu")
    fused = FusedShuffleV2Block.from_module(copy.deepcopy(ref))
    x = torch.randn(0, UNITS[name][0], 7, 7)
    with torch.no_grad(), effops.use_backend(backend):
        y = fused(x)
    y_ref = ref(x)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_are_clear_errors(backend):
    fused = FusedShuffleV2Block.from_module(_unit("s2", "cpu"))
    with torch.no_grad(), effops.use_backend(backend):
        with pytest.raises(ValueError, match="expected an input with 8 channels"):
            fused(torch.randn(1, 6, 5, 5))
        with pytest.raises(ValueError, match="4-D input"):
            fused(torch.randn(8, 5, 5))
        with pytest.raises(TypeError, match="floating-point"):
            fused(torch.ones(1, 8, 5, 5, dtype=torch.int32))
        with pytest.raises(TypeError, match="expected the same dtype"):
            fused(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    fused.train()
    with pytest.raises(ValueError, match="expected an input with 8 channels"):
        fused(torch.randn(2, 6, 5, 5))


def test_from_module_refuses_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="not torchvision's ShuffleNetV2 InvertedResidual"):
        FusedShuffleV2Block.from_module(nn.Sequential(nn.Conv2d(3, 3, 1)))
    bad = InvertedResidual(8, 8, 1)
    bad.branch2[2] = nn.Tanh()
    with pytest.raises(ValueError, match="Tanh is not a supported activation"):
        FusedShuffleV2Block.from_module(bad)
    # The converter reports it and fuses inside instead (the unit's forward is traced).
    fast = effops.optimize(nn.Sequential(bad))
    assert not isinstance(fast[0], FusedShuffleV2Block)
    assert any("ShuffleNetV2 unit not fused" in e.what and "Tanh" in e.what for e in fast.effops_report.skipped)


def test_block_rule_and_report_line():
    rule = next(r for r in BLOCK_RULES if r.name == "ShuffleNetV2 unit")
    unit = InvertedResidual(116, 116, 1)
    assert rule.matches(unit) and not rule.matches(nn.Sequential(*unit.branch2))
    assert rule.describe(rule.build(unit)) == (
        "ShuffleNetV2 unit s1 116→116: split as a view, branch2 conv1x1+bn+relu → dw3x3+bn → conv1x1+bn+relu "
        "writes shuffled channels 1::2, identity copied into 0::2 (no cat, no shuffle pass)")
    assert rule.describe(rule.build(InvertedResidual(24, 116, 2))) == (
        "ShuffleNetV2 unit s2 24→116: branch1 dw3x3/s2+bn → conv1x1+bn+relu writes shuffled channels 0::2, "
        "branch2 conv1x1+bn+relu → dw3x3/s2+bn → conv1x1+bn+relu writes 1::2 (no cat, no shuffle pass)")


@pytest.mark.slow
def test_optimize_swaps_the_16_units_of_shufflenet_v2_x1_0():
    fast = effops.optimize(tv.models.shufflenet_v2_x1_0())
    units = [e for e in fast.effops_report.swapped if e.what.startswith("ShuffleNetV2 unit")]
    assert len(units) == 16 and sum(isinstance(m, FusedShuffleV2Block) for m in fast.modules()) == 16
    assert [e.path for e in units[:2]] == ["stage2.0", "stage2.1"]
    assert units[0].what.startswith("ShuffleNetV2 unit s2 24→116") and "s1 116→116" in units[1].what
    assert not fast.effops_report.skipped


def test_reduced_shufflenet_converted_equals_the_original():
    model = randomize_bn(ShuffleNetV2([2, 1, 2], [8, 16, 32, 64, 128], num_classes=10)).eval()
    fast = effops.optimize(model)
    assert list(fast.state_dict()) == list(model.state_dict())
    assert sum(isinstance(m, FusedShuffleV2Block) for m in fast.modules()) == 5
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()))
    again = effops.optimize(fast)  # an optimized unit is left as it is
    assert not [e for e in again.effops_report.swapped if e.what.startswith("ShuffleNetV2 unit")]


@pytest.mark.slow
def test_compile_fullgraph():
    torch._dynamo.reset()
    ref = _unit("s1", "cpu")
    fused = FusedShuffleV2Block.from_module(copy.deepcopy(ref))
    x = _x(8, device="cpu")
    with torch.no_grad(), effops.use_backend("reference"):
        y = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
        assert_matches(y, copy.deepcopy(ref).double()(x.double()))


def test_deepcopy_and_pickle_keep_their_own_modules():
    import io

    fused = FusedShuffleV2Block.from_module(_unit("s2", "cpu"))
    twin = copy.deepcopy(fused)
    assert twin._plan.right[0].conv is twin.branch2[0] and twin.branch2[0] is not fused.branch2[0]
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded._plan.left[-1].bn is loaded.branch1[3]
    x = _x(8, device="cpu")
    with torch.no_grad(), effops.use_backend("reference"):
        torch.testing.assert_close(loaded(x), fused(x), rtol=0, atol=0)
        torch.testing.assert_close(twin(x), fused(x), rtol=0, atol=0)
