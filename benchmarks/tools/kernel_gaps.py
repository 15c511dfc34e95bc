"""Host time between the kernels of one optimized CPU forward, gap by gap.

    python benchmarks/tools/kernel_gaps.py                          # ese_vovnet19b_dw, batch 1
    python benchmarks/tools/kernel_gaps.py --model mobilenet_v2 --forwards 20
    python benchmarks/tools/kernel_gaps.py --osa-per-op   # FusedOSA's per-op path, not its one call

``effops.optimize`` of the channels_last model (speed check on the benchmark input), then forwards
under torch.profiler in ``torch.inference_mode()``. Per position in the forward, the median time
from the end of one kernel range (effops' C++ ``EFFOPS_PROFILE_RANGE``s and oneDNN's ops) to the
start of the next: Python, the dispatcher, argument conversion and whatever C++ runs outside the
ranges (allocation, weight-cache lookups, small un-ranged kernels such as the SE excitation).
The profiler adds a few µs per recorded op; compare gaps with each other, not with plain timings.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the effops of this checkout
sys.path.insert(0, str(HERE.parent))  # cpu_run

import torch  # noqa: E402
from torch.profiler import profile, record_function  # noqa: E402

import cpu_run  # noqa: E402

KERNELS = ("effops::", "mkldnn::")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ese_vovnet19b_dw")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forwards", type=int, default=15)
    ap.add_argument("--osa-per-op", action="store_true",
                    help="FusedOSA's steady state op by op from Python (its first-call path), not osa_block_steps")
    args = ap.parse_args(argv)

    import effops

    if args.osa_per_op:
        effops.FusedOSA._native_steps = lambda self, x, identity: None

    torch.set_num_threads(args.threads)
    cl = torch.channels_last
    model = cpu_run.build_model(args.model).eval().to(memory_format=cl)
    x = cpu_run.make_input(args.batch).contiguous(memory_format=cl)
    with torch.no_grad():
        fast = effops.optimize(model, example_inputs=(x,))
    with torch.inference_mode():
        for _ in range(10):
            fast(x)
        with profile() as prof:
            for _ in range(args.forwards):
                with record_function("forward"):
                    fast(x)
    events = sorted((e for e in prof.events() if e.name == "forward" or e.name.startswith(KERNELS)),
                    key=lambda e: e.time_range.start)
    forwards = [e for e in events if e.name == "forward"][2:]  # the first two: profiler warm-up
    gaps = collections.defaultdict(list)
    for fw in forwards:
        r = fw.time_range
        kernels = [e for e in events if e.name != "forward" and e.time_range.start >= r.start
                   and e.time_range.end <= r.end]
        end, prev = r.start, "(forward starts)"
        for i, k in enumerate(kernels):
            gaps[(i, prev, k.name)].append(k.time_range.start - end)
            end, prev = k.time_range.end, k.name
        gaps[(len(kernels), prev, "(forward returns)")].append(r.end - end)
    total = 0.0
    for (i, a, b), v in sorted(gaps.items()):
        g = statistics.median(v)
        total += g
        print(f"{i:3d} {a:<32} -> {b:<32} {g:8.1f} us")
    wall = statistics.median(fw.time_range.elapsed_us() for fw in forwards)
    print(f"gaps {total:.0f} us of a {wall:.0f} us forward (median of {len(forwards)} profiled forwards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
