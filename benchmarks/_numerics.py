"""The project's numerics rule for benchmarks (a twin of ``tests/helpers.py::assert_matches``;
benchmarks/ does not import from tests/), so that a fast but wrong kernel fails its case:

- the reference is the original eager PyTorch module run in float64 on the same input
  values (the module's parameters and the input are in the benchmarked dtype already, so
  casting them up is exact);
- fp32: relative error of effops <= ``fp32_tol`` (1e-5) against that reference
  (TF32 is off for the benchmark session, see conftest.py);
- fp16/bf16: ``err(effops) <= 2 * err(eager PyTorch in the same dtype) + eps``, both
  against the fp64 reference (flash-attention's rule), eps 1e-3 for fp16, 8e-3 for bf16.
"""
import copy

import torch

FP32_TOL = 1e-5
EPS = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - ref|| / ||ref||`` in float64 on the CPU; NaN in ``a`` is an error."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(a).any(), "output contains NaN (unwritten or invalid)"
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def fp64_reference(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module`` (the original eager PyTorch module, not the effops one) run in float64
    on ``x``'s values, on ``x``'s device; the module itself is left untouched."""
    ref = copy.deepcopy(module).double()
    with torch.inference_mode():
        return ref(x.double())


def check_numerics(out: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, *, fp32_tol: float = FP32_TOL) -> dict:
    """Assert the rule for effops' ``out`` given the fp64 reference and eager PyTorch's
    output in the same dtype; returns both errors (for the result rows)."""
    assert out.dtype == eager.dtype, f"effops returned {out.dtype}, eager {eager.dtype}"
    assert out.shape == ref64.shape, f"effops returned shape {tuple(out.shape)}, expected {tuple(ref64.shape)}"
    err, base = rel_err(out, ref64), rel_err(eager, ref64)
    if out.dtype in (torch.float32, torch.float64):
        assert err <= fp32_tol, f"{out.dtype}: relative error {err:.2e} vs fp64 > {fp32_tol:.0e} (eager's own: {base:.2e})"
    else:
        eps = EPS[out.dtype]
        assert err <= 2 * base + eps, (f"{out.dtype}: relative error {err:.2e} vs fp64 > 2 x eager's own {base:.2e} "
                                       f"+ {eps:.0e}")
    return {"effops_rel_err_vs_fp64": err, "eager_rel_err_vs_fp64": base}
