"""OSA blocks of VoVNet-39: eager, torch.compile (default, and max-autotune with
freezing), effops — time, speedup, % of roofline, peak memory. Whole models
(VoVNet-39/57, timm ese_vovnet39b, ...) are in test_models.py.

    pytest benchmarks/test_osa.py                    # CUDA: fp16 + bf16, batch 1 and 32; CPU: fp32, batch 1
    EFFOPS_BENCH_DTYPES=float16 pytest benchmarks/test_osa.py

Blocks: the first OSA module of each VoVNet-39 stage at 224² input (56², 28², 14², 7²)
and the V2 form of the last module of stages 4 and 5 (identity + eSE).

Roofline floor of a block: its conv FLOPs, and the bytes of reading the input once,
writing every stage output once and reading it back once (the aggregation), and
writing the output (+ weights). "peak MB" (CUDA) is the memory allocated during one
forward above what was allocated before it, output included. Each case first checks
effops against the eager module run in float64 on the same input (fp32: relative error
<= 1e-5; fp16/bf16: at most 2x eager's own same-dtype error + eps; see _numerics.py).
"""
import copy
import os

import pytest
import torch

import effops
from effops.benchmark import compiled_providers, measure_providers, measured_peaks, randomize_bn, result_rows
from effops.models.classic_vovnet import OSAModule

from _numerics import FP32_TOL, check_numerics, fp64_reference, rel_err

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

BLOCKS = [
    # name, in_ch, stage_ch, concat_ch, H=W, identity, ese
    ("s2_osa", 128, 128, 256, 56, False, False),
    ("s3_osa", 256, 160, 512, 28, False, False),
    ("s4_osa", 512, 192, 768, 14, False, False),
    ("s4_osa_v2_identity_ese", 768, 192, 768, 14, True, True),
    ("s5_osa", 768, 224, 1024, 7, False, False),
    ("s5_osa_v2_identity_ese", 1024, 224, 1024, 7, True, True),
]
if CUDA:
    DTYPES = [getattr(torch, d) for d in os.environ.get("EFFOPS_BENCH_DTYPES", "float16,bfloat16").split(",")]
    BATCHES = [1, 32]
else:
    DTYPES, BATCHES = [torch.float32], [1]
L = 5


def _providers(model, fast, x, batch):
    providers = {"eager": lambda: model(x)}
    providers.update(compiled_providers(model, x, batch))
    providers["effops"] = lambda: fast(x)
    return providers


def _record(results, case, shape, dtype, batch, providers, flops, min_bytes, errs):
    timed = measure_providers(providers, DEV, host_graph=CUDA and batch == 1)
    results.extend(result_rows(timed, flops=flops, min_bytes=min_bytes, peaks=measured_peaks(DEV, dtype),
                               host_graph=batch == 1, cuda=CUDA, case=case, shape=shape, dtype=str(dtype), **errs))
    results.flush()


def _check(fast, model, x, fp32_tol=FP32_TOL):
    """effops (``fast``) against the original eager ``model`` run in float64 on ``x``: the
    numerics rule of _numerics.py. Returns the errors for the result rows."""
    ref64 = fp64_reference(model, x)
    eager = model(x)
    out = fast(x)
    errs = check_numerics(out, ref64, eager, fp32_tol=fp32_tol)
    return {**errs, "max_rel_err_vs_eager": rel_err(out, eager)}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b[0])
def test_osa_block(block, batch, dtype, results):
    name, cin, sc, cc, hw, identity, ese = block
    model = randomize_bn(OSAModule(cin, sc, cc, L, "OSA", identity=identity, ese=ese)).eval()
    model = model.to(DEV, dtype).to(memory_format=torch.channels_last)
    fast = effops.FusedOSA.from_module(copy.deepcopy(model)).eval()
    x = torch.randn(batch, cin, hw, hw, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        errs = _check(fast, model, x)
        pix = batch * hw * hw
        flops = 2 * pix * (9 * sc * cin + (L - 1) * 9 * sc * sc + cc * (cin + L * sc))
        esize = x.element_size()
        weights = sum(p.numel() for p in model.parameters())
        min_bytes = esize * (pix * (cin + 2 * L * sc + cc) + weights)
        _record(results, f"{name}_b{batch}_{str(dtype).replace('torch.', '')}",
                f"{batch}x{cin}x{hw}x{hw} -> {L}x{sc} -> {cc}", dtype, batch, _providers(model, fast, x, batch),
                flops, min_bytes, errs)
