"""Squeeze-and-excitation at ResNet-RS / SE-ResNet stage shapes: eager, torch.compile (default,
and max-autotune with freezing), effops — time, speedup, achieved GB/s, % of roofline.

    pytest benchmarks/test_se.py                     # CUDA: fp16 + bf16, batch 1 and 32; CPU: fp32, batch 1
    EFFOPS_BENCH_DTYPES=float16 pytest benchmarks/test_se.py

Cases: timm's ``SEModule`` (ResNet-RS: ``C -> C/4 -> C``, ReLU, sigmoid gate) on each stage's
bottleneck output at 224² input (256@56², 512@28², 1024@14², 2048@7²):

* ``se``: ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``; effops: :class:`effops.nn.se.SqueezeExcite`
  (pool, excitation, ``x * gate``: three launches);
* ``se_residual_relu``: the SE bottleneck's tail ``relu(se(x) + shortcut)``; effops:
  ``SqueezeExcite.forward_residual`` (pool, excitation, then gate + add + ReLU in one pass).

Roofline floor: the bytes of reading ``x`` once (and the shortcut), writing the output once,
and reading the fc weights; FLOPs (the two mat-vecs and the elementwise work) are negligible.
effops reads ``x`` twice (the pool, then the gate pass), so its ceiling is 2/3 of that floor
for ``se`` and 3/4 for ``se_residual_relu``; only a kernel that keeps ``x`` on chip between the
pool and the gate could beat that. Each case first checks effops against the eager module run
in float64 on the same input (see _numerics.py).
"""
import copy
import os

import pytest
import torch
from torch import nn

from effops.benchmark import compiled_providers, measure_providers, measured_peaks, result_rows
from effops.nn.se import SqueezeExcite

from _numerics import check_numerics, fp64_reference, rel_err

timm_se = pytest.importorskip("timm.layers.squeeze_excite", reason="the eager baseline is timm's SEModule")

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

SHAPES = [
    # name, C, H=W: ResNet-RS bottleneck outputs (4x planes) per stage at 224² input
    ("s2", 256, 56),
    ("s3", 512, 28),
    ("s4", 1024, 14),
    ("s5", 2048, 7),
]
if CUDA:
    DTYPES = [getattr(torch, d) for d in os.environ.get("EFFOPS_BENCH_DTYPES", "float16,bfloat16").split(",")]
    BATCHES = [1, 32]
else:
    DTYPES, BATCHES = [torch.float32], [1]


class _SEResidualReLU(nn.Module):
    """``relu(se(x) + shortcut)`` with the shortcut held as a buffer, so every provider (and
    ``torch.compile``) is called with ``x`` alone."""

    def __init__(self, se: nn.Module, shortcut: torch.Tensor):
        super().__init__()
        self.se = se
        self.register_buffer("shortcut", shortcut)

    def forward(self, x):
        return torch.relu(self.se(x) + self.shortcut)


def _se_module(c: int, dtype) -> nn.Module:
    se = timm_se.SEModule(c, rd_ratio=0.25, rd_divisor=8)
    with torch.no_grad():  # weights of a trained SE's magnitude: gates spread over (0, 1), not all 0.5
        for p in se.parameters():
            p.copy_(torch.randn_like(p) * (1.0 / p.shape[1] ** 0.5 if p.dim() > 1 else 0.5))
    return se.to(DEV, dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("residual", [False, True], ids=["se", "se_residual_relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_squeeze_excite(shape, residual, batch, dtype, results):
    name, c, hw = shape
    se = _se_module(c, dtype)
    fast = SqueezeExcite.from_module(copy.deepcopy(se)).eval()
    x = torch.randn(batch, c, hw, hw, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)
    if residual:
        shortcut = torch.randn_like(x)
        model = _SEResidualReLU(se, shortcut).eval()

        def effops_fn():
            return fast.forward_residual(x, shortcut, "relu")
    else:
        model = se

        def effops_fn():
            return fast(x)

    r = se.fc1.out_channels
    with torch.inference_mode():
        ref64 = fp64_reference(model, x)
        eager, out = model(x), effops_fn()
        errs = check_numerics(out, ref64, eager)
        errs["max_rel_err_vs_eager"] = rel_err(out, eager)
        pix = batch * hw * hw
        esize = x.element_size()
        weights = sum(p.numel() for p in se.parameters()) * next(se.parameters()).element_size()
        min_bytes = esize * pix * c * (3 if residual else 2) + weights
        flops = batch * 4 * c * r + pix * c * (4 if residual else 2)
        providers = {"eager": lambda: model(x)}
        providers.update(compiled_providers(model, x, batch))
        providers["effops"] = effops_fn
        timed = measure_providers(providers, DEV, host_graph=CUDA and batch == 1)
        case = f"{name}_{'se_residual_relu' if residual else 'se'}_b{batch}_{str(dtype).replace('torch.', '')}"
        results.extend(result_rows(timed, flops=flops, min_bytes=min_bytes, peaks=measured_peaks(DEV, dtype),
                                   host_graph=batch == 1, cuda=CUDA, case=case,
                                   shape=f"{batch}x{c}x{hw}x{hw}, rd {r}", dtype=str(dtype), **errs))
        results.flush()
