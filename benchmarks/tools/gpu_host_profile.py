"""Where a GPU forward's time goes: host (Python + launches) against device (kernels), per case.

    python benchmarks/tools/gpu_host_profile.py            # CUDA: two VoVNet-39 convs and whole VoVNet-39, b32 fp16
    python benchmarks/tools/gpu_host_profile.py --cases conv   # the convs only
    python benchmarks/tools/gpu_host_profile.py --batch 1      # without CUDA: a smoke test on CPU, fp32

For each case and provider (eager modules, effops) it prints:

- ``host us``: wall time per call of a loop that never synchronises, divided by the calls
  (the rate the host issues work at; while it exceeds the device time, the GPU waits);
- ``synced ms``: wall time per call of the same loop ending in a synchronise;
- ``do_bench ms``: ``effops.benchmark.time_ms`` (L2 flushed, host included), as gpu_check.py reports;
- ``kernel ms``: the sum of the CUDA kernel times per call from ``torch.profiler``, and the
  number of kernels per call;
- the ten most expensive kernels, and effops' ten most expensive Python functions per call
  (``cProfile``, cumulative).

The effops tiles are tuned on the first call, as users get them (``EFFOPS_AUTOTUNE`` unset).
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import effops  # noqa: E402
from effops.benchmark import randomize_bn, time_ms  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke test of this script
DT = torch.float16 if DEV.type == "cuda" else torch.float32
CL = torch.channels_last


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def conv_case(cin, cout, k, hw, batch=32):
    seq = randomize_bn(nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(inplace=True))).eval().to(DEV, DT).to(memory_format=CL)
    fused = effops.FusedConvBNAct.from_modules(*copy.deepcopy(list(seq))).eval()
    x = torch.randn(batch, cin, hw, hw, device=DEV, dtype=DT).contiguous(memory_format=CL)
    return {"eager": seq, "effops": fused}, x


def model_case(batch=32):
    from effops.models import classic_vovnet  # plain PyTorch modules, as gpu_check.py's models stage

    base = randomize_bn(classic_vovnet("vovnet39")).eval().to(DEV, DT).to(memory_format=CL)
    fused = effops.optimize(base, check_speed=False)
    x = torch.randn(batch, 3, 224, 224, device=DEV, dtype=DT).contiguous(memory_format=CL)
    return {"eager": base, "effops": fused}, x


def profile(name, fn, n_host=50):
    fn()
    sync()
    t0 = time.perf_counter()
    first = None
    for i in range(n_host):
        fn()
        if i == 0:
            first = time.perf_counter() - t0
    host = (time.perf_counter() - t0) / n_host
    sync()
    synced = (time.perf_counter() - t0) / n_host
    bench = time_ms(fn, DEV)
    from torch.profiler import ProfilerActivity, profile as tprof

    reps = 5
    with tprof(activities=[ProfilerActivity.CUDA if DEV.type == "cuda" else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        sync()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernel_ms = sum(e.device_time_total for e in kernels) / reps / 1e3
    n_kernels = sum(e.count for e in kernels) / reps
    print(f"{name:28s} host {host * 1e6:9.1f} us | synced {synced * 1e3:8.3f} ms | do_bench {bench:8.3f} ms | "
          f"kernel {kernel_ms:8.3f} ms in {n_kernels:5.0f} kernels  (first loop call {first * 1e6:.0f} us)")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:10]:
        print(f"    {e.device_time_total / reps / 1e3:8.4f} ms x{e.count // reps:<4d} {e.key[:110]}")
    if "effops" in name:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            fn()
        pr.disable()
        sync()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(18)
        lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
        print("    cProfile, 20 calls (cumulative):")
        for ln in lines[3:26]:
            print("      " + ln[:160])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="conv,model")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    print(torch.cuda.get_device_name() if DEV.type == "cuda" else "CPU", torch.__version__, flush=True)
    cases = []
    if "conv" in args.cases:
        cases += [("s2_3x3 32x128x56x56 k3->128", lambda: conv_case(128, 128, 3, 56, args.batch)),
                  ("s5_agg1x1 32x1888x7x7 k1->1024", lambda: conv_case(1888, 1024, 1, 7, args.batch))]
    if "model" in args.cases:
        cases.append(("vovnet39 224", lambda: model_case(args.batch)))
    with torch.no_grad():
        for title, build in cases:
            mods, x = build()
            print(f"== {title}", flush=True)
            for prov, m in mods.items():
                t0 = time.perf_counter()
                m(x)
                sync()
                print(f"  {prov} first call {time.perf_counter() - t0:.1f} s", flush=True)
                profile(f"  {prov}", lambda m=m: m(x))
                sys.stdout.flush()
            if title.startswith("s"):
                for prob in effops.info()["tuning"]["in_memory"][-1:]:
                    print("  tuned:", prob["implementation"], prob["config"], prob["key"])


if __name__ == "__main__":
    main()
