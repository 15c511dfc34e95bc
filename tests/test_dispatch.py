"""Backend registry: automatic order, forcing, reasons, the registered op's contract."""
import pytest
import torch
import torch.nn.functional as F

from effops import BackendUnavailable, dispatch, native, use_backend
from effops.ops import conv_bn_act

from helpers import KERNEL_DEVICE, assert_matches, needs_triton


def _args(dtype=torch.float32, device=KERNEL_DEVICE):
    x = torch.randn(1, 4, 5, 5, device=device, dtype=dtype)
    w = torch.randn(3, 4, 3, 3, device=device, dtype=dtype)
    return x, w


def _selected(x, w):
    return dispatch.select("conv_bn_act", x, w, None, None, None, None).name


NATIVE_FIRST_ON_CPU = KERNEL_DEVICE == "cpu" and dispatch.CPU_PREFERENCE == "native"


@needs_triton
def test_automatic_choice():
    """CUDA tensors: triton. CPU tensors: native, unless EFFOPS_CPU_BACKEND=triton asks for the
    Triton interpreter (then triton, native)."""
    x, w = _args()
    want = "triton"
    if NATIVE_FIRST_ON_CPU:
        want = "native" if native.available() else "reference"
    assert _selected(x, w) == want
    assert_matches(conv_bn_act(x, w), F.conv2d(x.double(), w.double()))  # and what it runs is right


def test_cpu_order_follows_the_preference():
    x, w = _args(device="cpu")
    why = dispatch.reasons("conv_bn_act", x, w, None, None, None, None)
    if dispatch.CPU_PREFERENCE == "native":
        assert any("only when asked" in r for r in why["triton"]) or any("TRITON_INTERPRET" in r for r in why["triton"])
        with use_backend("triton"):  # forcing is asking: the interpreter's reason goes away
            assert not any("only when asked" in r for r in dispatch.reasons("conv_bn_act", x, w, None, None,
                                                                             None, None)["triton"])
    else:
        assert not any("only when asked" in r for r in why["triton"])


def test_float64_falls_back_to_reference_with_reason():
    x, w = _args(torch.float64, "cpu")
    assert _selected(x, w) == "reference"
    why = dispatch.reasons("conv_bn_act", x, w, None, None, None, None)
    assert any("float64" in r for r in why["triton"])
    assert any("float64" in r for r in why["native"])
    assert why["reference"] == []
    assert set(why) == {"native", "triton", "reference"}
    y = conv_bn_act(x, w)  # the fallback runs, in float64
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.conv2d(x, w), rtol=1e-12, atol=1e-12)


def test_forced_backend_that_cannot_run_raises_with_reasons():
    x, w = _args(torch.float64, "cpu")
    for name in ("triton", "native"):
        with use_backend(name), pytest.raises(BackendUnavailable, match="float64"):
            conv_bn_act(x, w)
    with pytest.raises(ValueError, match="unknown effops backend 'cuda'; expected one of native, triton, reference"):
        with use_backend("cuda"):  # no such backend: a clear error, not a silent choice
            conv_bn_act(x, w)


def test_forced_reference_and_env_var(monkeypatch):
    x, w = _args()
    with use_backend("reference"):
        assert _selected(x, w) == "reference"
        assert_matches(conv_bn_act(x, w, act="relu"), F.relu(F.conv2d(x.double(), w.double())))
    monkeypatch.setenv("EFFOPS_BACKEND", "reference")
    assert _selected(x, w) == "reference"
    with use_backend("reference"):  # the context manager wins over the environment
        assert _selected(x, w) == "reference"
    monkeypatch.setenv("EFFOPS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown effops backend"):
        _selected(x, w)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="expected one of native, triton, reference"):
        with use_backend("cudnn"):
            pass


def test_cpu_without_interpreter_gives_a_reason(monkeypatch):
    import effops.ops.conv as m

    monkeypatch.setattr(m, "INTERPRETED", False)
    x, w = _args(device="cpu")
    why = dispatch.reasons("conv_bn_act", x, w, None, None, None, None)["triton"]
    assert any("TRITON_INTERPRET=1" in r for r in why)


@needs_triton
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual):
    """torch.library.opcheck: schema, fake tensor, autograd registration, AOT dispatch."""
    x = torch.randn(2, 4, 5, 5, device=KERNEL_DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 4, 3, 3, device=KERNEL_DEVICE, requires_grad=True)
    b = torch.randn(6, device=KERNEL_DEVICE, requires_grad=True)
    r = torch.randn(2, 6, 5, 5, device=KERNEL_DEVICE, requires_grad=True) if residual else None
    args = (x, w, None, b, r, [1, 1], [1, 1], [1, 1], 1, "silu", 0.0, True)
    torch.library.opcheck(torch.ops.effops.conv_bn_act.default, args)
    x2 = x.detach()
    out = torch.empty(2, 6, 5, 5, device=KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(
        torch.ops.effops.conv_bn_act_out.default,
        (x2, w.detach(), None, b.detach(), None if r is None else r.detach(), [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, False, out),
        test_utils=("test_schema", "test_faketensor"),
    )


_TORCH_ACTS = {"relu": F.relu, "gelu": F.gelu, "hardswish": F.hardswish, "leaky_relu": lambda t: F.leaky_relu(t, 0.1)}


@needs_triton
@pytest.mark.parametrize("act", ["relu", "gelu", "hardswish", "leaky_relu"])
def test_backward_matches_autograd_of_reference(act):
    """The registered op's own backward (not autograd through its forward) against PyTorch
    autograd of the plain composition ``act(conv2d(x, w) * s + b + r)``."""
    x = torch.randn(2, 4, 5, 5, device=KERNEL_DEVICE, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 3, device=KERNEL_DEVICE, dtype=torch.float64)
    s, b = torch.rand(6, device=KERNEL_DEVICE, dtype=torch.float64) + 0.5, torch.randn(6, device=KERNEL_DEVICE, dtype=torch.float64)
    r = torch.randn(2, 6, 5, 5, device=KERNEL_DEVICE, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, w, s, b, r)]
    with use_backend("reference"):
        y = conv_bn_act(x, w, s, b, r, padding=1, act=act, act_param=0.1, residual_after_act=False)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    ref = _TORCH_ACTS[act](F.conv2d(x, w, padding=1) * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) + r)
    ref_grads = torch.autograd.grad(ref, leaves, torch.ones_like(ref))
    torch.testing.assert_close(y, ref)
    for g, gr in zip(grads, ref_grads):
        torch.testing.assert_close(g, gr)
