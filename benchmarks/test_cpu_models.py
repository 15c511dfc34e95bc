"""Whole models on the CPU: effops against every way PyTorch runs a model, with ONNX Runtime and
OpenVINO as reference points. Every (model, provider, batch) is timed in a fresh Python process
(``benchmarks/cpu_run.py``), each provider alone in it: runtimes with their own thread pools
(ONNX Runtime, OpenVINO, torch's OpenMP pool) spin after a call and would take the cores from
whatever ran next in the same process.

    pytest benchmarks/test_cpu_models.py -p no:logging -s        # all models, batch 1 and 8 (hours)
    EFFOPS_BENCH_MODELS=mobilenet_v2,shufflenet_v2_x1_0 EFFOPS_BENCH_BATCHES=1 EFFOPS_BENCH_REPEATS=1 \\
        pytest benchmarks/test_cpu_models.py -p no:logging -s    # a few minutes
    python benchmarks/cpu_run.py --model resnet50 --provider openvino --batch 8   # one process by hand
    python benchmarks/tools/plot_cpu_models.py benchmarks/results/cpu_models_<...>.json   # redraw a chart

Environment: ``EFFOPS_BENCH_MODELS`` (comma list; default all below), ``EFFOPS_BENCH_BATCHES``
(default ``1,8``), ``EFFOPS_BENCH_PROVIDERS`` (default all seven), ``EFFOPS_BENCH_REPEATS``
(processes per provider, default 3), ``EFFOPS_BENCH_THREADS`` (default 2), ``EFFOPS_BENCH_RUNS`` /
``EFFOPS_BENCH_WARMUP`` (timed / untimed calls per process, default 20 / 5),
``EFFOPS_BENCH_PROCESS_TIMEOUT`` (seconds per process, default 1800), ``EFFOPS_BENCH_TAG`` and
``EFFOPS_BENCH_OUT`` as for every benchmark. The children compile into a private inductor cache
for the session (unless ``TORCHINDUCTOR_CACHE_DIR`` is set), so the first repeat's
``first_call_s`` is a cold compile, and share a private effops tuning file (unless
``EFFOPS_CACHE_DIR`` is set): the first effops child of a model measures the native convs'
per-problem choices, the later children reuse them. Skipped when a CUDA GPU is present. Needs
``pip install -e .[bench]`` for the ONNX Runtime / OpenVINO columns (a missing package is a
skipped provider, not a failure) and matplotlib for the chart.

Models: classic ``vovnet39`` (effops.models), timm ``ese_vovnet39b``, ``ese_vovnet19b_dw``,
``ghostnet_100``, ``resnetrs50``, ``regnety_016``, ``efficientnet_b0``, ``repvgg_a2``,
``mobilenetv3_large_100``, torchvision ``shufflenet_v2_x1_0``, ``mobilenet_v2``, ``resnet50``;
random weights from seed 0, BN statistics randomised, fp32, eval, input ``randn(B, 3, 224, 224)``.

Providers: ``eager`` (NCHW), ``eager_cl`` (model and input channels_last), ``compile_freeze``
(``torch.compile`` of the channels_last model with inductor's ``freezing``), ``onnxruntime``
(ONNX opset 17, ORT_ENABLE_ALL, ``intra_op_num_threads`` = threads, ``inter_op_num_threads`` = 1),
``openvino`` (LATENCY hint, f32 precision, ``INFERENCE_NUM_THREADS`` = threads), ``effops``
(``effops.optimize``, channels_last, as ``python -m effops``) and ``effops_compile`` (that model
through ``torch.compile`` with freezing). The repeats interleave providers (p1 .. p7, p1 .. p7, ...)
so that drift on the shared machine hits all of them alike.

Columns of ``results/cpu_models_<device>_<versions>.{csv,json}`` (one row per case and provider):
``ms`` median over the processes of each process's median wall-clock time per forward
(``ms_per_process`` lists them); ``speedup_vs_eager`` eager NCHW ms / this ms (above 1: faster);
``speedup_vs_best_eager`` the faster of eager / eager_cl over this; ``speedup_vs_compile_freeze``,
``speedup_vs_onnxruntime``, ``speedup_vs_openvino`` likewise (empty when that provider has no
time); ``rel_err_vs_fp64`` ``||out - ref|| / ||ref||`` against the original model in float64 on
the same input (``eager_rel_err_vs_fp64`` / ``effops_rel_err_vs_fp64`` repeat the eager and effops
values on every row of the case, for the shared table); ``first_call_s`` the untimed first call
(inductor compile, effops' first-use native build, runtime initialisation), ``prepare_s`` export /
conversion / optimize before it; ``process_s`` the longest child process of the provider, start to
exit (imports, model, float64 reference, all calls); ``loadavg_1m`` the highest 1-minute load seen by the case's
processes (above the thread count: a neighbour was busy and the times are suspect); ``error`` /
``skipped`` why a provider has no time. The CUDA-only columns of the shared table (graph ms, peak
MB, TFLOP/s) are empty. A ``cpu_models_....png`` next to the files plots ``speedup_vs_eager`` per
model and provider, one panel per batch.

Asserted: effops' and effops_compile's fp32 error against float64 is <= 1e-5 (_numerics.py's
rule), and neither fails to run. Performance is reported, not asserted: each case prints a
verdict line (effops >= 1.0x the faster eager layout? >= 1.0x compile_freeze? effops_compile >=
effops?).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from _numerics import FP32_TOL

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "cpu_run.py"

ALL_MODELS = ["vovnet39", "ese_vovnet39b", "ese_vovnet19b_dw", "ghostnet_100", "resnetrs50", "regnety_016",
              "efficientnet_b0", "repvgg_a2", "mobilenetv3_large_100", "shufflenet_v2_x1_0", "mobilenet_v2", "resnet50"]
ALL_PROVIDERS = ["eager", "eager_cl", "compile_freeze", "onnxruntime", "openvino", "effops", "effops_compile"]


def _env_list(name, default):
    return [s.strip() for s in os.environ.get(name, default).split(",") if s.strip()]


MODELS = _env_list("EFFOPS_BENCH_MODELS", ",".join(ALL_MODELS))
BATCHES = [int(b) for b in _env_list("EFFOPS_BENCH_BATCHES", "1,8")]
PROVIDERS = _env_list("EFFOPS_BENCH_PROVIDERS", ",".join(ALL_PROVIDERS))
REPEATS = int(os.environ.get("EFFOPS_BENCH_REPEATS", "3"))
THREADS = int(os.environ.get("EFFOPS_BENCH_THREADS", "2"))
RUNS = int(os.environ.get("EFFOPS_BENCH_RUNS", "20"))
WARMUP = int(os.environ.get("EFFOPS_BENCH_WARMUP", "5"))
PROCESS_TIMEOUT = float(os.environ.get("EFFOPS_BENCH_PROCESS_TIMEOUT", "1800"))
EFFOPS_PROVIDERS = ("effops", "effops_compile")
_CHILD_ENV = {}  # extra environment of every child process (set by the cpu_results fixture)
_unknown = set(PROVIDERS) - set(ALL_PROVIDERS)
if _unknown:
    raise ValueError(f"EFFOPS_BENCH_PROVIDERS: unknown {sorted(_unknown)}; use {', '.join(ALL_PROVIDERS)}")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CUDA GPU present: this is the CPU comparison (test_models.py covers the GPU)")


@pytest.fixture(scope="module")
def cpu_results(request):
    """The module's ``results`` (conftest.py), stamped with the benchmark's thread count rather than
    this parent process's (it only waits on the children); after the last case, the chart."""
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        res = request.getfixturevalue("results")
    finally:
        torch.set_num_threads(prev)
    # The children share one inductor cache of their own (they run one at a time). With the default
    # /tmp/torchinductor_<user>, shared with other jobs compiling at the same moment, one
    # compile_freeze child failed in inductor's generated code (NameError: functools) and the same
    # command alone did not; a private cache takes concurrent writers out of the picture.
    own_cache = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    if own_cache:
        _CHILD_ENV["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="effops_cpu_models_inductor_")
    # effops' tuning file too: the first effops child of a model measures the native convs'
    # per-problem choices and stores them, the later ones (effops and effops_compile) make the same
    # ones, as a user's later processes do; nothing stored by an earlier session takes part.
    own_tuning = "EFFOPS_CACHE_DIR" not in os.environ
    if own_tuning:
        _CHILD_ENV["EFFOPS_CACHE_DIR"] = tempfile.mkdtemp(prefix="effops_cpu_models_tuning_")
    yield res
    if own_cache:
        shutil.rmtree(_CHILD_ENV.pop("TORCHINDUCTOR_CACHE_DIR"), ignore_errors=True)
    if own_tuning:
        shutil.rmtree(_CHILD_ENV.pop("EFFOPS_CACHE_DIR"), ignore_errors=True)
    if res:
        res.flush()
        sys.path.insert(0, str(HERE / "tools"))
        from plot_cpu_models import plot

        png = plot(f"{res.path}.json")
        print(f"\ncpu_models chart: {png}" if png else "")


def run_one(model, provider, batch):
    """One fresh process for one (model, provider, batch): its JSON record (``error`` set if the
    process itself died or timed out)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), **_CHILD_ENV)  # torch's pool sized before torch starts
    cmd = [sys.executable, str(RUNNER), "--model", model, "--provider", provider, "--batch", str(batch),
           "--threads", str(THREADS), "--runs", str(RUNS), "--warmup", str(WARMUP), "--json"]
    base = {"model": model, "provider": provider, "batch": batch, "threads": THREADS}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"TimeoutExpired: process ran over {PROCESS_TIMEOUT:.0f} s"}
    base["process_s"] = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    err_tail = p.stderr.strip().splitlines()[-25:] or ["(no stderr)"]
    if p.returncode != 0 or not lines:
        rec = {**base, "error": f"ProcessFailed: exit {p.returncode}: {err_tail[-1][:300]}"}
    else:
        rec = {**json.loads(lines[-1]), "process_s": base["process_s"]}
    if "error" in rec:  # the record keeps one line; the traceback is here
        print(f"\n--- {model} {provider} b{batch}: {rec['error']}\n" + "\n".join(err_tail))
    return rec


def _ratio(a, b):
    return a / b if (a is not None and b) else None


def summarize(records):
    """Per provider, over its processes: the median of the per-process medians, and the rest."""
    out = {}
    for prov in PROVIDERS:
        recs = [r for r in records if r["provider"] == prov]
        meds = [r["median_ms"] for r in recs if "median_ms" in r]
        errs = [r["rel_err_vs_fp64"] for r in recs if r.get("rel_err_vs_fp64") is not None]
        problems = sorted({r["error"] for r in recs if "error" in r})
        skipped = sorted({r["skipped"] for r in recs if "skipped" in r})
        first = next((r for r in recs if "median_ms" in r), recs[0] if recs else {})
        out[prov] = {
            # A provider that failed in any of its processes has no time: a partial median would hide it.
            "ms": statistics.median(meds) if meds and not problems else None,
            "ms_per_process": meds,
            "min_ms": min((r["min_ms"] for r in recs if "min_ms" in r), default=None),
            "rel_err_vs_fp64": max(errs) if errs else None,
            "first_call_s": max((r["first_call_s"] for r in recs if "first_call_s" in r), default=None),
            "prepare_s": max((r["prepare_s"] for r in recs if "prepare_s" in r), default=None),
            "loadavg_1m": max((max(r.get("loadavg_1m_before", 0), r.get("loadavg_1m_after", 0)) for r in recs),
                              default=None),
            "max_rss_mb": max((r["max_rss_mb"] for r in recs if "max_rss_mb" in r), default=None),
            "process_s": max((r["process_s"] for r in recs if "process_s" in r), default=None),
            "versions": first.get("versions"),
            "info": {k: first[k] for k in ("effops_backend", "effops_swapped", "effops_skipped",
                                            "effops_kept_original", "effops_speed_check", "optimize_s",
                                            "onnx_exporter", "openvino_precision") if k in first},
            "error": "; ".join(problems),
            "skipped": "; ".join(skipped),
        }
    return out


def verdict(case, s):
    """One line: where effops stands in this case (the targets are reported, not asserted)."""
    ms = {p: v["ms"] for p, v in s.items()}
    eagers = {p: ms.get(p) for p in ("eager", "eager_cl") if ms.get(p) is not None}
    best_eager = min(eagers, key=eagers.get) if eagers else None
    yes = lambda r, t=1.0: "-" if r is None else ("YES" if r >= t else "NO")
    fx = lambda r: "n/a" if r is None else f"{r:.2f}x"
    e = ms.get("effops")
    r_eager = _ratio(eagers.get(best_eager), e)
    r_cf = _ratio(ms.get("compile_freeze"), e)
    r_ec = _ratio(e, ms.get("effops_compile"))
    parts = [f"effops {fx(r_eager)} faster eager layout ({best_eager or 'n/a'}) -> {yes(r_eager)}",
             f"{fx(r_cf)} compile_freeze -> {yes(r_cf)}",
             f"effops_compile {fx(r_ec)} effops -> {yes(r_ec)}",
             f"(reference: {fx(_ratio(ms.get('onnxruntime'), e))} onnxruntime, {fx(_ratio(ms.get('openvino'), e))} openvino)"]
    return f"VERDICT {case}: " + "; ".join(parts)


def rows_for(case, model, batch, s):
    ms = {p: v["ms"] for p, v in s.items()}
    eager_ms = [ms[p] for p in ("eager", "eager_cl") if ms.get(p) is not None]
    best_eager = min(eager_ms) if eager_ms else None
    err = lambda p: s[p]["rel_err_vs_fp64"] if p in s else None
    rows = []
    for prov, v in s.items():
        t = v["ms"]
        rows.append({
            "case": case, "shape": f"{batch}x3x224x224", "dtype": str(torch.float32), "model": model, "batch": batch,
            "threads": THREADS, "processes": REPEATS, "runs_per_process": RUNS, "warmup_per_process": WARMUP,
            "provider": prov, "ms": t,
            "speedup_vs_eager": _ratio(ms.get("eager"), t),
            "speedup_vs_best_eager": _ratio(best_eager, t),
            "speedup_vs_compile_freeze": _ratio(ms.get("compile_freeze"), t),
            "speedup_vs_onnxruntime": _ratio(ms.get("onnxruntime"), t),
            "speedup_vs_openvino": _ratio(ms.get("openvino"), t),
            "rel_err_vs_fp64": v["rel_err_vs_fp64"],
            "eager_rel_err_vs_fp64": err("eager"), "effops_rel_err_vs_fp64": err("effops"),
            "ms_per_process": v["ms_per_process"], "min_ms": v["min_ms"], "first_call_s": v["first_call_s"],
            "prepare_s": v["prepare_s"], "process_s": v["process_s"], "loadavg_1m": v["loadavg_1m"],
            "max_rss_mb": v["max_rss_mb"],
            "versions": json.dumps(v["versions"]) if v["versions"] else None, "info": json.dumps(v["info"]),
            # The shared table's CUDA / roofline columns: not measured here.
            "ms_cuda_graph": None, "graph_speedup_vs_eager": None, "tflops": None, "gbps": None,
            "pct_roofline": None, "peak_mem_mb": None, "peak_mem_vs_eager": None,
            "timing": f"cpu wall-clock, median of {REPEATS} per-process medians of {RUNS} calls",
            "skipped": v["skipped"],
            "error": v["error"] or (f"skipped: {v['skipped']}" if v["skipped"] else ""),
        })
    return rows


def _print_case(case, s):
    print(f"\n{case}  ({THREADS} threads, {REPEATS} process(es) per provider, {RUNS} timed calls each)")
    print(f"  {'provider':<16}{'ms':>10}{'vs eager':>10}{'err64':>10}{'1st call s':>12}{'proc s':>8}{'load1m':>8}"
          "  per-process ms / note")
    eager = s.get("eager", {}).get("ms")
    for prov, v in s.items():
        t = v["ms"]
        note = v["error"] or (f"skipped: {v['skipped']}" if v["skipped"] else
                              " ".join(f"{m:.2f}" for m in v["ms_per_process"]))
        f = lambda x, spec: "-" if x is None else format(x, spec)
        print(f"  {prov:<16}{f(t, '.3f'):>10}{f(_ratio(eager, t), '.2f'):>10}{f(v['rel_err_vs_fp64'], '.1e'):>10}"
              f"{f(v['first_call_s'], '.1f'):>12}{f(v['process_s'], '.0f'):>8}{f(v['loadavg_1m'], '.1f'):>8}  {note}")
    load = max((v["loadavg_1m"] or 0) for v in s.values())
    if load > THREADS + 0.5:
        print(f"  NOTE: 1-minute load reached {load:.1f} on a {THREADS}-thread benchmark: other work shared the cores, "
              "times are suspect")


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("model", MODELS)
def test_cpu_model(model, batch, cpu_results):
    case = f"{model}_b{batch}"
    records = []
    for _ in range(REPEATS):  # interleaved: p1 .. pN, p1 .. pN, ...
        for prov in PROVIDERS:
            records.append(run_one(model, prov, batch))
    s = summarize(records)
    cpu_results.extend(rows_for(case, model, batch, s))
    cpu_results.flush()  # a run cut short still leaves what it measured
    _print_case(case, s)
    print(verdict(case, s))
    if all(v["skipped"] for v in s.values()):
        pytest.skip(next(iter(s.values()))["skipped"])  # e.g. timm missing: the model itself can't be built
    for prov in EFFOPS_PROVIDERS:
        if prov not in s:
            continue
        v = s[prov]
        assert not v["error"] and not v["skipped"], f"{prov} did not run on {model}: {v['error'] or v['skipped']}"
        assert v["rel_err_vs_fp64"] <= FP32_TOL, (
            f"{prov} on {model} batch {batch}: fp32 relative error {v['rel_err_vs_fp64']:.2e} vs float64 > {FP32_TOL:.0e} "
            f"(eager's own: {s['eager']['rel_err_vs_fp64'] if 'eager' in s else 'n/a'})")
