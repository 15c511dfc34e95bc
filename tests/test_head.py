"""FusedClassifierHead: timm's ClassifierHead (average pool -> dropout -> linear) with its small-batch
CPU inference as one native call, checked against timm's own forward in float64."""
import copy

import pytest
import torch
from torch import nn

import effops
from effops import FusedClassifierHead
from effops.ops.conv import native_fast

from helpers import assert_matches

timm = pytest.importorskip("timm")
from timm.layers import ClassifierHead  # noqa: E402


def _head(pool_type="avg", c=24, classes=10, drop=0.2):
    torch.manual_seed(0)
    return ClassifierHead(c, classes, pool_type=pool_type, drop_rate=drop).eval()


def _x(n=2, c=24, h=5, w=4, channels_last=True, dtype=torch.float32):
    x = torch.randn(n, c, h, w, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _spy(monkeypatch) -> list:
    """Record each call of the native ``pool_linear``."""
    mod = effops.native.module()
    calls, real = [], mod.pool_linear
    monkeypatch.setattr(mod, "pool_linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


def _needs_native():
    if not native_fast(torch.empty(1)):
        pytest.skip("the native backend is not the CPU backend in this run (EFFOPS_CPU_BACKEND=triton)")


@pytest.mark.parametrize("pool_type", ["avg", "fast"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_matches_timm_and_runs_one_native_call(monkeypatch, pool_type, channels_last, n):
    """From the second inference call on (the first checks the children), one native call whose
    result is within 1e-5 of timm's head in float64."""
    _needs_native()
    ref = _head(pool_type)
    fused = FusedClassifierHead.from_module(copy.deepcopy(ref))
    x = _x(n, channels_last=channels_last)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        first = fused(x)
        assert calls == []
        y = fused(x)
        assert calls == [x.shape]
    want = copy.deepcopy(ref).double()(x.double())
    assert y.shape == (n, 10) and y.dtype == torch.float32
    assert_matches(y, want)
    assert_matches(first, want)


def test_state_dict_attributes_and_reset_are_timms():
    ref = _head()
    fused = FusedClassifierHead.from_module(copy.deepcopy(ref))
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert (fused.in_features, fused.num_features, fused.use_conv) == (ref.in_features, ref.num_features, ref.use_conv)
    other = _head()
    other.fc.weight.data.normal_()
    fused.load_state_dict(other.state_dict())
    ref.load_state_dict(fused.state_dict())
    x = _x()
    with torch.no_grad():
        fused(x)
        assert_matches(fused(x), copy.deepcopy(other).double()(x.double()))
        fused.reset(5)  # model.reset_classifier: a new fc, checked again before the native call
        assert fused.fc.out_features == 5
        y = fused(x)
        y2 = fused(x)
    want = torch.nn.functional.linear(x.double().mean((2, 3)), fused.fc.weight.double(), fused.fc.bias.double())
    assert_matches(y, want)
    assert_matches(y2, want)


def test_every_other_case_runs_timms_forward(monkeypatch):
    """pre_logits, gradients, train-mode dropout, a hook, a replaced child, more than
    MAX_NATIVE_ROWS rows, another dtype, an empty batch: timm's forward, timm's result (or error)."""
    _needs_native()
    ref = _head(drop=0.5)
    fused = FusedClassifierHead.from_module(copy.deepcopy(ref))
    x = _x(2)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        fused(x)
        fused(x)
    assert len(calls) == 1
    with torch.no_grad():
        torch.testing.assert_close(fused(x, pre_logits=True), ref(x, pre_logits=True), rtol=0, atol=0)
    xg = x.clone().requires_grad_()
    y = fused(xg)
    assert y.grad_fn is not None
    y.sum().backward()
    xr = x.clone().requires_grad_()
    ref(xr).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    fused.train()
    ref.train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = fused(x)
        torch.manual_seed(1)
        b = ref(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the same dropout mask (fc: GEMV vs BLAS rounding)
    fused.eval()
    ref.eval()
    with torch.no_grad():
        assert not torch.allclose(a, fused(x))  # the mask was applied in train mode
    seen = []
    h = fused.fc.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        fused(x)
    h.remove()
    assert seen == [(2, 10)]
    with torch.no_grad():
        x9 = _x(9)
        assert_matches(fused(x9), copy.deepcopy(ref).double()(x9.double()))
        with pytest.raises(RuntimeError, match="dtype"):  # timm's own error for a float64 input
            fused(x.double())
        assert fused(_x(0)).shape == (0, 10)
        fused.fc = nn.Linear(24, 3)  # a replaced child: checked again, then native
        fused(x)
        y = fused(x)
    assert_matches(y, torch.nn.functional.linear(x.double().mean((2, 3)), fused.fc.weight.double(),
                                                 fused.fc.bias.double()))
    assert len(calls) == 2


def test_bad_input_errors():
    fused = FusedClassifierHead.from_module(_head())
    with torch.no_grad():
        fused(_x())
        with pytest.raises((ValueError, RuntimeError), match="24|features|shape"):
            fused(_x(c=12))
        with pytest.raises((ValueError, RuntimeError)):
            fused(torch.randn(2, 24))
    with pytest.raises(ValueError, match="not a timm ClassifierHead"):
        FusedClassifierHead.from_module(ClassifierHead(24, 10, pool_type="max"))


def test_optimize_swaps_a_timm_models_head():
    model = timm.create_model("ese_vovnet19b_dw", num_classes=7).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        fast = effops.optimize(model, check_speed=False)
        assert isinstance(fast.head, FusedClassifierHead)
        assert any("classifier head" in e.what for e in fast.effops_report.swapped)
        fast(x)
        assert_matches(fast(x), want)


def test_compiled_head_is_one_native_op():
    """Under torch.compile (inference) the head is the op effops::pool_linear_native, one graph."""
    _needs_native()
    ref = _head()
    fused = FusedClassifierHead.from_module(copy.deepcopy(ref))
    x = _x(2)
    torch._dynamo.reset()
    with torch.no_grad():
        gm_ops = []

        def backend(gm, example_inputs):
            gm_ops.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
            return gm

        y = torch.compile(fused, backend=backend)(x)
    torch._dynamo.reset()
    assert [t for t in gm_ops if isinstance(t, torch._ops.OpOverload)] == [torch.ops.effops.pool_linear_native.default]
    assert_matches(y, copy.deepcopy(ref).double()(x.double()))
