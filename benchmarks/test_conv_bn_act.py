"""conv+BN+ReLU across VoVNet-39 shapes: eager, eager with folded BN, torch.compile
(default, and max-autotune with freezing), effops.

    pytest benchmarks/                         # CUDA: fp16 + bf16, batch 1 and 32; CPU: fp32, batch 1
    EFFOPS_BENCH_DTYPES=float16 pytest benchmarks/
    EFFOPS_BENCH_MAX_AUTOTUNE=all pytest benchmarks/    # also at batch 1 (default: batch 32 only, it compiles slowly)
    EFFOPS_BENCH_COMPILE_MODES=default pytest benchmarks/   # only compile default (or EFFOPS_BENCH_COMPILE=0: none)

Each case first checks effops' output against the eager module run in float64 on the
same input (fp32: relative error <= 1e-5; fp16/bf16: at most 2x eager's own same-dtype
error + eps; see _numerics.py), so a fast wrong kernel fails.
"ms" is the host-inclusive median (do_bench; CUDA-graph replay at batch 1, where
launch overhead would dominate), "ms_cuda_graph" the device-only time of every
provider from CUDA-graph replay.
Results land in benchmarks/results/ as CSV and JSON stamped with device and versions.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effops import FusedConvBNAct
from effops.benchmark import compiled_providers, measure_providers, measured_peaks, randomize_bn, result_rows
from effops.ops.reference import fold_bn

from _numerics import check_numerics, fp64_reference, rel_err

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

# VoVNet-39 at 224²: each stage's 3×3 stage conv, the stage's first 3×3 (wider
# input) and the 1×1 OSA aggregation conv (in_ch + 5·stage_ch → concat_ch).
SHAPES = [
    # name, C_in, C_out, k, H=W
    ("s2_3x3", 128, 128, 3, 56),
    ("s2_agg1x1", 768, 256, 1, 56),
    ("s3_3x3", 160, 160, 3, 28),
    ("s3_first3x3", 256, 160, 3, 28),
    ("s3_agg1x1", 1056, 512, 1, 28),
    ("s4_3x3", 192, 192, 3, 14),
    ("s4_agg1x1", 1472, 768, 1, 14),
    ("s5_3x3", 224, 224, 3, 7),
    ("s5_agg1x1", 1888, 1024, 1, 7),
]
if CUDA:
    DTYPES = [getattr(torch, d) for d in os.environ.get("EFFOPS_BENCH_DTYPES", "float16,bfloat16").split(",")]
    BATCHES = [1, 32]
else:  # CPU: wall clock, fp32, the smaller shapes only (keeps the run to a minute or two)
    DTYPES, BATCHES = [torch.float32], [1]
    SHAPES = [s for s in SHAPES if s[4] <= 28]


def _block(cin, cout, k, dtype):
    seq = nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
    return randomize_bn(seq).eval().to(DEV, dtype).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_conv_bn_relu(shape, batch, dtype, results):
    name, cin, cout, k, hw = shape
    seq = _block(cin, cout, k, dtype)
    x = torch.randn(batch, cin, hw, hw, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)
    fused = FusedConvBNAct.from_modules(*copy.deepcopy(list(seq))).eval()
    conv, bn = seq[0], seq[1]
    wf, bf = fold_bn(conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    wf = wf.to(dtype).contiguous(memory_format=torch.channels_last)
    bf = bf.to(dtype)

    providers = {"eager": lambda: seq(x)}
    if CUDA:
        providers["eager_folded_cudnn"] = lambda: torch.cudnn_convolution_relu(x, wf, bf, (1, 1), (k // 2,) * 2, (1, 1), 1)
    else:
        providers["eager_folded"] = lambda: F.relu_(F.conv2d(x, wf, bf, 1, k // 2))
    providers.update(compiled_providers(seq, x, batch))
    providers["effops"] = lambda: fused(x)

    with torch.inference_mode():
        ref64 = fp64_reference(seq, x)
        eager = seq(x)
        out = fused(x)
        errs = check_numerics(out, ref64, eager)
        err = rel_err(out, eager)

        flops = 2 * batch * hw * hw * cout * cin * k * k
        esize = x.element_size()
        min_bytes = esize * (batch * hw * hw * (cin + cout) + cout * cin * k * k)
        timed = measure_providers(providers, DEV, host_graph=CUDA and batch == 1)
    results.extend(result_rows(timed, flops=flops, min_bytes=min_bytes, peaks=measured_peaks(DEV, dtype),
                               host_graph=batch == 1, cuda=CUDA,
                               case=f"{name}_b{batch}_{str(dtype).replace('torch.', '')}",
                               shape=f"{batch}x{cin}x{hw}x{hw} k{k} -> {cout}", dtype=str(dtype), **errs,
                               max_rel_err_vs_eager=err))
    results.flush()
