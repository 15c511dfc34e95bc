"""What torch.compile adds to an effops-optimized model on the CPU, measured in one process.

    python benchmarks/tools/compile_overhead.py                                  # the mobile nets
    python benchmarks/tools/compile_overhead.py --models ghostnet_100,mobilenet_v2 --rounds 3
    python benchmarks/tools/compile_overhead.py --models resnet50 --batch 8 --runs 5
    python benchmarks/tools/compile_overhead.py --plain        # the models without effops, eager vs compiled

Per model: ``effops.optimize`` of the channels_last model (speed check on the benchmark input),
the same object compiled with inductor and ``freezing=True`` (called in ``torch.inference_mode()``,
as ``benchmarks/cpu_run.py`` times every provider), then rounds that time the eager and
the compiled model one after the other (median of ``--runs`` calls each), so drift on a shared
machine hits both alike. Prints one line per model with every round's medians, eager / compiled,
in ms, the number of guards Dynamo installed and their evaluation per compiled call (torch.profiler's
"TorchDynamo Cache Lookup", µs: inflated by the profiler, and paid from cold caches after the
kernels of the previous call), and the compiled model's time with guard evaluation skipped
(``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``): what the guards cost per call.
``benchmarks/test_cpu_models.py`` is the number of record (one process per provider); this tool
isolates the compiled path's own cost (guards, the wrapper, one dispatcher call per op).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the effops of this checkout
sys.path.insert(0, str(HERE.parent))  # cpu_run

import torch  # noqa: E402

import cpu_run  # noqa: E402

MODELS = ["mobilenet_v2", "ghostnet_100", "mobilenetv3_large_100", "efficientnet_b0", "shufflenet_v2_x1_0"]


def _median_ms(fn, runs: int) -> float:
    from effops.benchmark import time_ms

    for _ in range(2):
        fn()
    return time_ms(fn, torch.device("cpu"), cpu_iters=runs)


def measure(name: str, threads: int, rounds: int, runs: int, batch: int = 1, plain: bool = False) -> dict:
    import torch._inductor.config as inductor_config

    import effops

    torch.set_num_threads(threads)
    cl = torch.channels_last
    model = cpu_run.build_model(name).eval().to(memory_format=cl)
    x = cpu_run.make_input(batch).contiguous(memory_format=cl)
    torch._dynamo.reset()
    with torch.no_grad():  # as benchmarks/cpu_run.py prepares and then times every provider
        fast = model if plain else effops.optimize(model, example_inputs=(x,))
    with torch.inference_mode(), inductor_config.patch(freezing=True):
        compiled = torch.compile(fast)
        with _GuardCounter() as guards:
            compiled(x)
        eager, comp, unguarded = [], [], []
        for _ in range(rounds):
            eager.append(_median_ms(lambda: fast(x), runs))
            comp.append(_median_ms(lambda: compiled(x), runs))
            # The same compiled call with Dynamo's guard evaluation skipped (unsafe in general: here
            # nothing changes between calls): the difference is what evaluating the guards costs.
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                unguarded.append(_median_ms(lambda: compiled(x), runs))
        guards_us = _guard_us(lambda: compiled(x), runs)
    return {"model": name, "eager_ms": eager, "compiled_ms": comp, "unguarded_ms": unguarded, "guards_us": guards_us,
            "guards": guards.count}


class _GuardCounter:
    """The number of leaf guards Dynamo installs while the block runs (its guard tree as
    ``TORCH_LOGS=guards`` prints it: one ``+- KIND: ...`` line per guard)."""

    def __enter__(self):
        import logging

        self.count, self._lines = 0, []
        outer = self

        class _Handler(logging.Handler):
            def emit(self, record):
                outer._lines.append(record.getMessage())

        self._handler = _Handler()
        self._loggers = [logging.getLogger(n) for n in ("torch._dynamo.guards", "torch.__guards")]
        torch._logging.set_logs(guards=True)
        for lg in self._loggers:
            lg.addHandler(self._handler)
        return self

    def __exit__(self, *exc):
        import re

        torch._logging.set_logs()
        for lg in self._loggers:
            lg.removeHandler(self._handler)
        leaf = re.compile(r"^[| ]*\+- [A-Z_]+:")
        self.count = sum(1 for msg in self._lines for line in msg.splitlines() if leaf.match(line))
        return False


def _guard_us(fn, runs: int) -> float:
    """Dynamo's guard evaluation per call: torch.profiler's "TorchDynamo Cache Lookup" event."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    lookups = [e.cpu_time_total for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup"]
    return sum(lookups) / runs if lookups else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--plain", action="store_true", help="the channels_last model without effops (the baseline's guards)")
    args = ap.parse_args(argv)
    for name in args.models.split(","):
        r = measure(name, args.threads, args.rounds, args.runs, args.batch, args.plain)
        e, c = statistics.median(r["eager_ms"]), statistics.median(r["compiled_ms"])
        u = statistics.median(r["unguarded_ms"])
        rounds = " ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(r["eager_ms"], r["compiled_ms"]))
        print(f"{name:24s} eager {e:6.2f}  compiled {c:6.2f}  compiled/eager {c / e:4.2f}   rounds {rounds}   "
              f"guards {r['guards']} ({r['guards_us']:.0f} us/call; compiled without evaluating them {u:.2f})",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
