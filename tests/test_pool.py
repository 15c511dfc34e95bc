"""effops.MaxPool2d: the drop-in nn.MaxPool2d that effops.optimize swaps in, on every path."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effops
from effops import MaxPool2d
from effops.ops.conv import native_fast

native_cpu = pytest.mark.skipif(not native_fast(torch.empty(1)),
                                reason="the native backend is not the CPU backend in this run "
                                       "(EFFOPS_CPU_BACKEND=triton, or the extension is unavailable)")


def _nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def _equal(a, b):
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0),
                                                                                    b.nan_to_num(0.0))


def _counting(monkeypatch):
    import effops.nn.pool as pool

    calls = []
    real = pool.native_module

    class Mod:
        def __getattr__(self, name):
            f = getattr(real(), name)
            return (lambda *a, **k: calls.append(name) or f(*a, **k)) if name == "max_pool_nhwc" else f

    monkeypatch.setattr(pool, "native_module", lambda: Mod())
    return calls


@native_cpu
@pytest.mark.parametrize("args", [dict(kernel_size=3, stride=2, ceil_mode=True), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=2), dict(kernel_size=(3, 1), stride=(1, 2), padding=(1, 0))],
                         ids=["vovnet", "resnet", "k2", "rect"])
def test_native_path_matches_nn_maxpool(args, monkeypatch):
    ref = nn.MaxPool2d(**args)
    pool = MaxPool2d.from_module(ref)
    assert isinstance(pool, nn.MaxPool2d) and not pool.state_dict() and repr(pool) == repr(ref)
    x = _nhwc(torch.randn(2, 24, 11, 12))
    x[0, 3, 4, 5] = float("nan")
    calls = _counting(monkeypatch)
    with torch.no_grad():
        y = pool(x)
    assert calls == ["max_pool_nhwc"] and _equal(y, ref(x))
    assert y.is_contiguous(memory_format=torch.channels_last)


@native_cpu
def test_other_inputs_run_pytorch(monkeypatch):
    """NCHW, float64, gradients, indices, dilation, an empty batch, torch.compile: nn.MaxPool2d's own
    forward (its values, layout and errors)."""
    calls = _counting(monkeypatch)
    pool, ref = MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 8, 9, 9)
    assert _equal(pool(x), ref(x)) and pool(x).is_contiguous()
    assert _equal(pool(_nhwc(x).double()), ref(_nhwc(x).double()))
    xg = _nhwc(x).requires_grad_()
    pool(xg).sum().backward()
    xr = _nhwc(x).requires_grad_()
    ref(xr).sum().backward()
    assert torch.equal(xg.grad, xr.grad)
    y, idx = MaxPool2d(3, 2, 1, return_indices=True)(_nhwc(x))
    assert torch.equal(idx, nn.MaxPool2d(3, 2, 1, return_indices=True)(_nhwc(x))[1])
    assert _equal(MaxPool2d(3, 2, 1, dilation=2)(_nhwc(x)), nn.MaxPool2d(3, 2, 1, dilation=2)(_nhwc(x)))
    assert pool(_nhwc(torch.randn(0, 8, 9, 9))).shape == (0, 8, 5, 5)
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        MaxPool2d(3, 2, 2)(_nhwc(x))
    torch._dynamo.reset()
    with torch.no_grad():
        assert _equal(torch.compile(pool, backend="eager", fullgraph=True)(_nhwc(x)), ref(_nhwc(x)))
    assert calls == []


def test_optimize_swaps_max_pools_and_reports_them():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.MaxPool2d(3, 2, ceil_mode=True), nn.MaxPool2d(2, return_indices=True)).eval()
    fast = effops.optimize(copy.deepcopy(model), check_speed=False)
    assert type(fast[3]) is MaxPool2d and type(fast[4]) is nn.MaxPool2d  # indices: left alone
    assert list(fast.state_dict()) == list(model.state_dict())
    assert {e.path: e.what for e in fast.effops_report.swapped}["3"] == "max pool 3x3 s2 ceil (NHWC, no indices)"
    x = _nhwc(torch.randn(1, 3, 17, 17))
    with torch.no_grad():
        y, ref = fast(x), model(x)
    assert torch.equal(y[1], ref[1]) and torch.allclose(y[0], ref[0], rtol=1e-5, atol=1e-6)
    again = effops.optimize(fast, check_speed=False)  # optimized before: the same module, not re-wrapped
    assert type(again[3]) is MaxPool2d
