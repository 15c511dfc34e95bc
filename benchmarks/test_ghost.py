"""Ghost modules at GhostNet-1.0 shapes and RepVGG-A2 blocks: eager, torch.compile, effops.

    pytest benchmarks/test_ghost.py                  # CUDA: fp16 + bf16, batch 1 and 32; CPU: fp32, batch 1
    EFFOPS_BENCH_COMPILE_MODES=default pytest benchmarks/test_ghost.py   # CPU with torch.compile too

Ghost modules (timm ``GhostModule``, ratio 2, 1x1 primary conv, 3x3 depthwise cheap conv) at
the input sizes they see in ``ghostnet_100`` at 224²: ``ghost1`` (ReLU) expands, ``ghost2``
(no activation) projects. effops writes both halves into one output buffer: no concat, no
slice; the cheap conv computes only the kept ghost channels.

RepVGG-A2 blocks (timm ``RepVggBlock``, training form: 3x3 + 1x1 + identity BN branches):
the first block of each stage (stride 2, no identity) and a stride-1 block of stages 1-3.
effops merges the branches into one conv per call (float64, from the live modules) and
runs one conv + bias + ReLU; ``eager_reparameterized`` is timm's own ``reparameterize()``
(merged once, offline), the deployment baseline. ``merge_host_us`` is the host time of
that per-call merge alone (``timeit``, median of 5 repeats of 50 calls), on the benchmark's
device.

Roofline floor: the conv FLOPs (ghost: primary + kept cheap channels; RepVGG: the merged
conv), and the bytes of reading the input once, writing the output once (ghost: also
reading the intrinsic channels back once) plus the weights. Each case first checks effops
against the eager module in float64 on the same input (fp32: relative error <= 1e-5;
fp16/bf16: at most 2x eager's own same-dtype error + eps; see _numerics.py).
"""
import copy
import math
import os
import statistics
import timeit

import pytest
import torch

from effops.benchmark import compiled_providers, measure_providers, measured_peaks, randomize_bn, result_rows
from effops.nn.ghost import FusedGhostModule
from effops.nn.repvgg import FusedRepVGGBlock

from _numerics import FP32_TOL, check_numerics, fp64_reference, rel_err

timm = pytest.importorskip("timm")
from timm.models.byobnet import RepVggBlock  # noqa: E402
from timm.models.ghostnet import GhostModule  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

GHOST = [
    # name (ghostnet_100 module), in_chs, out_chs, H=W, activation
    ("b0.ghost1_16-16_112", 16, 16, 112, True),
    ("b1.ghost1_16-48_112", 16, 48, 112, True),
    ("b1.ghost2_48-24_56", 48, 24, 56, False),
    ("b2.ghost1_24-72_56", 24, 72, 56, True),
    ("b5.ghost1_40-240_28", 40, 240, 28, True),
    ("b6.ghost1_80-184_14", 80, 184, 14, True),
    ("b6.ghost2_184-80_14", 184, 80, 14, False),
    ("b8.ghost1_160-960_7", 160, 960, 7, True),
    ("b8.ghost2_960-160_7", 960, 160, 7, False),
]
REPVGG = [
    # name (repvgg_a2 block), in_chs, out_chs, input H=W, stride
    ("s0.0_64-96_s2_112", 64, 96, 112, 2),
    ("s0.1_96_56", 96, 96, 56, 1),
    ("s1.0_96-192_s2_56", 96, 192, 56, 2),
    ("s1.1_192_28", 192, 192, 28, 1),
    ("s2.1_384_14", 384, 384, 14, 1),
    ("s3.0_384-1408_s2_14", 384, 1408, 14, 2),
]
if CUDA:
    DTYPES = [getattr(torch, d) for d in os.environ.get("EFFOPS_BENCH_DTYPES", "float16,bfloat16").split(",")]
    BATCHES = [1, 32]
else:
    DTYPES, BATCHES = [torch.float32], [1]
IDS = dict(dtype=lambda d: str(d).replace("torch.", ""), batch=lambda b: f"b{b}")


def _run_case(results, case, shape, model, fast, x, batch, dtype, flops, min_bytes, extra=None, **fields):
    with torch.inference_mode():
        ref64 = fp64_reference(model, x)
        eager, out = model(x), fast(x)
        errs = {**check_numerics(out, ref64, eager, fp32_tol=FP32_TOL), "max_rel_err_vs_eager": rel_err(out, eager)}
        providers = {"eager": lambda: model(x)}
        providers.update(extra or {})
        providers.update(compiled_providers(model, x, batch))
        providers["effops"] = lambda: fast(x)
        timed = measure_providers(providers, DEV, host_graph=CUDA and batch == 1)
    results.extend(result_rows(timed, flops=flops, min_bytes=min_bytes, peaks=measured_peaks(DEV, dtype),
                               host_graph=batch == 1, cuda=CUDA, case=case, shape=shape, dtype=str(dtype), **errs,
                               **fields))
    results.flush()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS["dtype"])
@pytest.mark.parametrize("batch", BATCHES, ids=IDS["batch"])
@pytest.mark.parametrize("block", GHOST, ids=lambda b: b[0])
def test_ghost_module(block, batch, dtype, results):
    name, cin, cout, hw, relu = block
    model = GhostModule(cin, cout, act_layer=torch.nn.ReLU if relu else torch.nn.Identity)
    model = randomize_bn(model).eval().to(DEV, dtype).to(memory_format=torch.channels_last)
    fast = FusedGhostModule.from_module(copy.deepcopy(model)).eval()
    x = torch.randn(batch, cin, hw, hw, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)
    init = math.ceil(cout / 2)
    pix = batch * hw * hw
    flops = 2 * pix * (cin * init + 9 * (cout - init))
    weights = sum(p.numel() for p in model.parameters())
    min_bytes = x.element_size() * (pix * (cin + cout + init) + weights)
    _run_case(results, f"ghost_{name}_b{batch}_{IDS['dtype'](dtype)}", f"{batch}x{cin}x{hw}x{hw} -> {cout}",
              model, fast, x, batch, dtype, flops, min_bytes, merge_host_us=None)


def _merge_host_us(fast: FusedRepVGGBlock, dtype: torch.dtype) -> float:
    """Host time of the per-call merge alone (µs): ``timeit``, median of 5 repeats of 50 calls."""
    fmt = torch.channels_last if CUDA else torch.contiguous_format

    def merge():
        fast.merged_weight_bias(dtype, fmt)

    with torch.inference_mode():
        merge()
        runs = timeit.repeat(merge, number=50, repeat=5)
        if CUDA:
            torch.cuda.synchronize()
    return statistics.median(runs) / 50 * 1e6


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS["dtype"])
@pytest.mark.parametrize("batch", BATCHES, ids=IDS["batch"])
@pytest.mark.parametrize("block", REPVGG, ids=lambda b: b[0])
def test_repvgg_block(block, batch, dtype, results):
    name, cin, cout, hw, stride = block
    model = randomize_bn(RepVggBlock(cin, cout, stride=stride)).eval()
    model = model.to(DEV, dtype).to(memory_format=torch.channels_last)
    fast = FusedRepVGGBlock.from_module(copy.deepcopy(model)).eval()
    deployed = copy.deepcopy(model)
    deployed.reparameterize()
    deployed = deployed.to(DEV, dtype).to(memory_format=torch.channels_last)
    x = torch.randn(batch, cin, hw, hw, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)
    oh = (hw - 1) // stride + 1
    pix = batch * oh * oh
    flops = 2 * pix * cout * cin * 9
    min_bytes = x.element_size() * (batch * hw * hw * cin + pix * cout + cout * cin * 9)
    _run_case(results, f"repvgg_{name}_b{batch}_{IDS['dtype'](dtype)}", f"{batch}x{cin}x{hw}x{hw} -> {cout}",
              model, fast, x, batch, dtype, flops, min_bytes, extra={"eager_reparameterized": lambda: deployed(x)},
              merge_host_us=_merge_host_us(fast, dtype))
