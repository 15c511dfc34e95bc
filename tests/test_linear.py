"""effops.Linear: the drop-in nn.Linear that effops.optimize swaps in (a native matrix-vector
product for small-batch CPU inference), on every path."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effops
from effops import Linear
from effops.nn.linear import MAX_NATIVE_ROWS
from effops.ops.conv import native_fast
from helpers import rel_err

native_cpu = pytest.mark.skipif(not native_fast(torch.empty(1)),
                                reason="the native backend is not the CPU backend in this run "
                                       "(EFFOPS_CPU_BACKEND=triton, or the extension is unavailable)")


def _counting(monkeypatch):
    import effops.nn.linear as lin

    calls = []
    real = lin.native_module

    class Mod:
        def __getattr__(self, name):
            f = getattr(real(), name)
            return (lambda *a, **k: calls.append(name) or f(*a, **k)) if name == "linear" else f

    monkeypatch.setattr(lin, "native_module", lambda: Mod())
    return calls


def _pair(i, o, bias=True):
    torch.manual_seed(0)
    ref = nn.Linear(i, o, bias=bias)
    return ref, Linear.from_module(ref)


@native_cpu
@pytest.mark.parametrize("rows", [1, 3, MAX_NATIVE_ROWS])
@pytest.mark.parametrize("i,o,bias", [(1280, 1000, True), (37, 5, False), (16, 33, True), (7, 1, True)],
                         ids=["head", "odd-nobias", "one-vector", "tail"])
def test_native_path_matches_f_linear(rows, i, o, bias, monkeypatch):
    """Inner sizes below, at and past the vector width and the two-vector unroll; output counts
    that leave a partial block of four rows. fp32 within 1e-5 of the float64 result."""
    ref, lin = _pair(i, o, bias)
    assert isinstance(lin, nn.Linear) and lin.weight is ref.weight and list(lin.state_dict()) == list(ref.state_dict())
    assert repr(lin) == repr(ref)
    x = torch.randn(rows, i)
    calls = _counting(monkeypatch)
    with torch.no_grad():
        y = lin(x)
    assert calls == ["linear"] and y.shape == (rows, o) and y.dtype == torch.float32
    want = F.linear(x.double(), ref.weight.double(), None if ref.bias is None else ref.bias.double())
    assert rel_err(y, want) <= 1e-5


@native_cpu
def test_native_kernel_activation_strided_input_and_errors():
    from effops.native import module as native_module

    m = native_module()
    x = torch.randn(4, 64)[:, ::2]  # a strided view: made contiguous inside
    w, b = torch.randn(9, 32), torch.randn(9)
    y = m.linear(x, w, b, "relu", 0.0)
    assert rel_err(y, F.relu(F.linear(x.double(), w.double(), b.double()))) <= 1e-5
    assert m.linear(torch.randn(0, 32), w, b, "identity", 0.0).shape == (0, 9)
    with pytest.raises(ValueError, match="the input has 31 features, the weight expects 32"):
        m.linear(torch.randn(2, 31), w, b, "identity", 0.0)
    with pytest.raises(ValueError, match="expected float32 input and weight"):
        m.linear(x.double(), w, b, "identity", 0.0)
    with pytest.raises(ValueError, match="expected a 2-D input and weight"):
        m.linear(torch.randn(2, 3, 32), w, b, "identity", 0.0)
    with pytest.raises(ValueError, match="expected a float32 bias of 9 values"):
        m.linear(x, w, torch.randn(8), "identity", 0.0)
    with pytest.raises(ValueError, match="unknown activation"):
        m.linear(x, w, b, "swish", 0.0)


@native_cpu
def test_other_inputs_run_pytorch(monkeypatch):
    """More rows than the native cut-off, 3-D inputs, float64, gradients, an empty batch, torch.compile,
    a wrong feature count: nn.Linear's own forward (its values, gradients and errors)."""
    ref, _ = _pair(24, 10)
    lin = Linear.from_module(copy.deepcopy(ref))  # its own parameters: gradients compared below
    calls = _counting(monkeypatch)
    with torch.no_grad():
        for x in (torch.randn(MAX_NATIVE_ROWS + 1, 24), torch.randn(2, 3, 24), torch.randn(0, 24)):
            assert torch.equal(lin(x), ref(x))
        x64 = torch.randn(2, 24, dtype=torch.float64)
        assert torch.equal(copy.deepcopy(lin).double()(x64), copy.deepcopy(ref).double()(x64))
        with pytest.raises(RuntimeError, match="same dtype"):
            lin(x64)
    x = torch.randn(2, 24)
    lin(x).sum().backward()  # grad mode, parameters requiring grad: autograd through F.linear
    ref(x).sum().backward()
    assert torch.equal(lin.weight.grad, ref.weight.grad) and torch.equal(lin.bias.grad, ref.bias.grad)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        with torch.no_grad():
            lin(torch.randn(2, 23))
    assert calls == []


@native_cpu
def test_compiled_linear_calls_the_native_op():
    """Under torch.compile the small-batch path is the op effops::linear_native (Inductor would lower
    F.linear to BLAS); with gradients needed it is F.linear, differentiable as ever."""
    from effops.ops.linear import LINEAR_NATIVE_OP

    ref, lin = _pair(24, 10)
    x = torch.randn(2, 24)
    torch.library.opcheck(LINEAR_NATIVE_OP, (x, ref.weight.detach(), ref.bias.detach(), "relu", 0.0))
    torch.library.opcheck(LINEAR_NATIVE_OP, (x, ref.weight.detach(), None, "identity", 0.0))
    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        y = torch.compile(lin, backend=backend, fullgraph=True)(x)
    assert rel_err(y, F.linear(x.double(), ref.weight.double(), ref.bias.double())) <= 1e-5
    assert any(n.target is LINEAR_NATIVE_OP for n in graphs[0].graph.nodes)
    with torch.no_grad():
        assert rel_err(torch.compile(lin)(x), F.linear(x.double(), ref.weight.double(), ref.bias.double())) <= 1e-5
    torch._dynamo.reset()
    xg = x.clone().requires_grad_()
    torch.compile(lin, backend="eager", fullgraph=True)(xg).sum().backward()
    assert torch.allclose(xg.grad, ref.weight.sum(0).expand(2, -1))


def test_optimize_swaps_linear_layers_and_reports_them():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5))

    class Custom(nn.Linear):  # its own forward: not a plain F.linear, left alone
        def forward(self, x):
            return super().forward(x) * 2

    model.append(Custom(5, 3))
    model.eval()
    fast = effops.optimize(copy.deepcopy(model), check_speed=False)
    assert type(fast[5]) is Linear and type(fast[6]) is Custom
    assert list(fast.state_dict()) == list(model.state_dict())
    assert {e.path: e.what for e in fast.effops_report.swapped}["5"].startswith("linear 8->5")
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert rel_err(fast(x), model(x).double()) <= 1e-5
    again = effops.optimize(fast, check_speed=False)
    assert type(again[5]) is Linear


def test_optimize_swaps_timm_linear():
    pytest.importorskip("timm", reason="timm is not installed")
    from timm.layers import Linear as TimmLinear

    head = nn.Sequential(TimmLinear(16, 4)).eval()
    fast = effops.optimize(copy.deepcopy(head), check_speed=False)
    assert type(fast[0]) is Linear and fast[0].weight.shape == (4, 16)
    x = torch.randn(1, 16)
    with torch.no_grad():
        assert rel_err(fast(x), head(x).double()) <= 1e-5
