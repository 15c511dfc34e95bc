"""Helpers for numerical tests: devices, random BN state, dtype-aware comparisons."""
import os

import pytest
import torch
from torch import nn

ON_CUDA = torch.cuda.is_available()
# The device Triton kernels are tested on: CUDA when present, else CPU under the interpreter.
KERNEL_DEVICE = "cuda" if ON_CUDA else "cpu"
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Whether the triton backend can run here (CUDA, or CPU under the interpreter).
TRITON_RUNS = HAS_TRITON and (ON_CUDA or INTERPRETER)
needs_triton = pytest.mark.skipif(
    not TRITON_RUNS,
    reason="needs Triton with a CUDA GPU or TRITON_INTERPRET=1",
)
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randomize_bn(module: nn.Module) -> nn.Module:
    """Non-trivial BN state (mean != 0, var != 1, affine != identity): fresh BN hides folding bugs."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c) * 0.5)
                    m.running_var.copy_(torch.rand(c) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c) + 0.5)
                    m.bias.copy_(torch.randn(c) * 0.5)
    return module


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    assert not torch.isnan(a).any(), "output contains NaN (unwritten or invalid)"
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_matches(out: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor = None, *, fp32_tol=1e-5):
    """fp32: relative error <= fp32_tol against the fp64 reference.
    fp16/bf16: err(effops) <= 2 * err(PyTorch in the same dtype) + eps (flash-attention's rule)."""
    if out.dtype in (torch.float32, torch.float64):
        err = rel_err(out, ref64)
        assert err <= fp32_tol, f"relative error {err:.2e} > {fp32_tol:.0e}"
    else:
        assert torch_same_dtype is not None
        err, base = rel_err(out, ref64), rel_err(torch_same_dtype, ref64)
        eps = 1e-3 if out.dtype == torch.float16 else 8e-3
        assert err <= 2 * base + eps, f"{out.dtype}: relative error {err:.2e} vs PyTorch's own {base:.2e}"


def count_dispatch(monkeypatch) -> list:
    """Record the op name of every call into ``effops.dispatch.run`` (the fused eager path)."""
    from effops import dispatch

    calls, run = [], dispatch.run
    monkeypatch.setattr(dispatch, "run", lambda op, *a, **k: calls.append(op) or run(op, *a, **k))
    return calls


def device_branch(monkeypatch, autotune: bool) -> None:
    """Make the launchers take their *device* branch for CPU tensors under the interpreter
    (heuristic tiles with ``autotune=False``; the tile tuner, with an empty cache, otherwise).
    Without a GPU this code would otherwise never run before reaching one."""
    import collections
    import contextlib

    from effops import tuning
    from effops.ops import conv

    if KERNEL_DEVICE != "cpu":
        pytest.skip("drives the device branch under the interpreter; on a GPU it runs in every kernel test")
    monkeypatch.setenv("EFFOPS_AUTOTUNE", "1" if autotune else "0")
    monkeypatch.setattr(conv, "_interpreting", lambda t: False)
    monkeypatch.setattr(conv, "_on_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(tuning, "_capturing", lambda device: False)
    if autotune:
        monkeypatch.setattr(tuning, "_CACHE", collections.OrderedDict())


def assert_same_step(ref: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    """One forward + backward of ``ref`` and ``fused`` on copies of ``x``: the same output and
    input gradient, bit for bit (train-mode drop-ins must be exactly PyTorch)."""
    x1 = x.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y_ref, y = ref(x1), fused(x2)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)


def assert_same_state_and_grads(ref: nn.Module, fused: nn.Module) -> None:
    """Bit-identical ``state_dict`` (running stats, num_batches_tracked) and parameter gradients."""
    for (name, a), (_, b) in zip(ref.state_dict().items(), fused.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    for (name, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
