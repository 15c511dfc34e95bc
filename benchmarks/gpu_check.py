"""Every GPU measurement of effops in one command, sized for one short GPU call.

    python benchmarks/gpu_check.py                   # at most 8 min on a GPU; all stages below
    python benchmarks/gpu_check.py --max-autotune    # a second call: torch.compile max-autotune + freezing
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc   # the same code path on a CPU, tiny problems
    python benchmarks/gpu_check.py --budget 300 --stages conv,osa

Stages, most important first; each gets a share of the overall budget (``--budget``,
default 450 s, counted from the script's start) plus whatever earlier stages left unused,
and a case that would not fit (its estimate: the longest case of its kind so far) is
recorded as skipped, with the reason, instead of run. A case that overruns anyway is cut
off ``--grace`` (25) s after the budget: the files are written with a ``cut off`` row and
the script exits, so the whole run stays within 8 minutes (give the call 500 s or more):

1. ``tests``: a pytest subset in a subprocess (at most 2 minutes) that launches every
   kernel family on the GPU at least once: conv 1x1 / 3x3 / strided / dilated / grouped /
   depthwise, fp16 / bf16 / fp32, the TMA conv kernel (sm_90), the OSA aggregation (flat,
   eSE, identity), the fused depthwise + pointwise kernel, FusedOSA and FusedConvBNAct
   modules, a traced fusion, torch.compile over a FusedOSA, and the int64 address paths.
   The tests run with ``EFFOPS_AUTOTUNE=0`` (heuristic tiles), as everywhere.
2. ``conv``: conv+BN+ReLU on the VoVNet-39 shapes of ``benchmarks/test_conv_bn_act.py``,
   batch 32, fp16, channels_last: eager (Conv2d -> BatchNorm2d -> ReLU modules), eager with
   BN folded (``F.conv2d`` with folded weight and bias, then in-place ReLU), cuDNN's fused
   ``torch.cudnn_convolution_relu`` on the folded weights, torch.compile (default), effops.
3. ``osa``: the VoVNet-39 OSA blocks of ``benchmarks/test_osa.py``, batch 32, fp16: eager,
   effops (FusedOSA), torch.compile (default), effops + torch.compile, with peak memory.
4. ``models``: whole VoVNet-39 (classic modules vs ``effops.optimize``), timm
   ``ese_vovnet39b`` (when timm is installed), torchvision ResNet-50 and MobileNetV2
   (random weights), batch 32, fp16, 224x224, channels_last: eager, eager with BN folded
   into the convs, effops, torch.compile (default), effops + torch.compile; peak memory.
5. ``graphs``: the same models at batch 1: eager and effops plain and replayed from a
   captured CUDA graph (captured after warm-up calls, so effops' tiles are tuned first),
   and torch.compile(mode="reduce-overhead") of both.

``--max-autotune`` runs one stage instead: whole VoVNet-39 and the OSA blocks at batch 32,
fp16, with eager, effops and torch.compile(mode="max-autotune") under inductor's
``freezing=True`` (and effops + that compile, last).

Every timing stage first runs the cheap providers of every case, then the torch.compile
ones, so a short budget still covers every case. Times are medians in ms from
``effops.benchmark.time_ms`` (``triton.testing.do_bench``, L2 flushed, host included; a
CUDA-graph row times ``graph.replay()``). Each provider's output is compared with the
same module run in float32 on the same input (TF32 off): ``max_abs_err`` and
``rel_err`` (``||out - ref|| / ||ref||``); an effops row whose ``rel_err`` exceeds
2x eager's own + 1e-3 (fp16; + 8e-3 bf16; above 1e-4 in fp32) is marked MISMATCH.
Timing stages use the tile tuner as users get it (``EFFOPS_AUTOTUNE`` unset: tiles are
tuned on first use, and ``first_call_s`` includes that, or torch.compile's compile time).

Output: ``gpu_check_<device>_torch<v>_triton<v>_<date>`` ``.csv``, ``.json`` (stamped with
device, torch / Triton / CUDA versions and UTC date), ``_summary.md`` (printed last) and
``.log`` (everything printed) plus ``_tests.log`` (the pytest output), rewritten after
every case so that a run cut short keeps what it measured. They go to ``$OUT`` when it is
set *and* to ``benchmarks/results/`` (logs under ``benchmarks/results/logs/``); ``--out
DIR`` writes to DIR only. ``--dry-run`` writes to ``--out`` or a new temporary folder.

``--dry-run`` (no GPU needed; about 30 s on 2 idle cores, budget 150 s): the same stages
and code on the CPU with tiny problems (channels / 16, small maps, batch 1-2, 32x32
models, float32, one thread, 2 timing repetitions);
stage 1 checks that every selected test id exists and runs two of them; effops runs its
Triton kernels under the interpreter (``TRITON_INTERPRET=1``) in stages 2-3 and its
reference backend for whole models (the interpreter would take minutes); torch.compile
uses dynamo's ``eager`` backend (no inductor code generation) on each stage's first case.

Exit status: 0 when every check passed (cases skipped for time included); 1 when a
correctness check failed (a failing test in stage 1, or an effops row marked MISMATCH):
the results are written all the same; 2 for bad arguments (e.g. no GPU without
``--dry-run``); 3 when the script itself broke.
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

T_START = time.monotonic()
REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

STAGES = ["tests", "conv", "osa", "models", "graphs"]
# Nominal share of the budget of each stage (seconds out of 450); scaled to --budget.
SHARES = {"tests": 120, "conv": 70, "osa": 80, "models": 120, "graphs": 60, "max_autotune": 450}
TITLES = {
    "tests": "1. correctness: pytest subset on the device",
    "conv": "2. conv+BN+ReLU, VoVNet-39 shapes",
    "osa": "3. VoVNet-39 OSA blocks",
    "models": "4. whole models",
    "graphs": "5. whole models at batch 1: CUDA graphs, reduce-overhead",
    "max_autotune": "torch.compile max-autotune + freezing",
}
WHOLE_MODELS = ["vovnet39", "ese_vovnet39b", "resnet50", "mobilenet_v2"]

# Stage 1: tests that launch every kernel family once (ids checked by tests/test_gpu_check.py
# through the dry run, which collects all of them).
TEST_SELECTION = [
    # conv+BN+act implicit-GEMM kernel: 1x1, 3x3, strided NCHW, dilated, grouped, depthwise via the
    # generic entry, K/N larger than a tile, every dtype, epilogue variants, views, strides
    "tests/test_conv_kernel.py::test_geometry_fp32[1x5x7x7x6x1x1x0x1x1-nhwc]",
    "tests/test_conv_kernel.py::test_geometry_fp32[3x5x7x7x6x3x1x1x1x1-nhwc]",
    "tests/test_conv_kernel.py::test_geometry_fp32[1x13x13x13x9x3x2x1x1x1-nchw]",
    "tests/test_conv_kernel.py::test_geometry_fp32[2x8x9x9x8x3x1x2x2x1-nhwc]",
    "tests/test_conv_kernel.py::test_geometry_fp32[1x8x9x9x12x3x1x1x1x4-nhwc]",
    "tests/test_conv_kernel.py::test_geometry_fp32[1x6x9x9x6x3x2x1x1x6-nhwc]",
    "tests/test_conv_kernel.py::test_geometry_fp32[1x70x8x8x33x1x2x0x1x1-nhwc]",
    "tests/test_conv_kernel.py::test_dtypes",
    "tests/test_conv_kernel.py::test_activations_and_residual[silu-after]",
    "tests/test_conv_kernel.py::test_activations_and_residual[hardswish-before]",
    "tests/test_conv_kernel.py::test_activations_and_residual[gelu-None]",
    "tests/test_conv_kernel.py::test_activations_and_residual[leaky_relu-None]",
    "tests/test_conv_kernel.py::test_every_output_element_written",
    "tests/test_conv_kernel.py::test_non_contiguous_input",
    "tests/test_conv_kernel.py::test_int64_indexing_path",
    "tests/test_views.py::test_conv_writes_into_channel_view",
    "tests/test_views.py::test_conv_reads_channel_view_input",
    # depthwise kernel
    "tests/test_conv_kernel.py::test_depthwise_kernel[2x6x9x9x3x1x1x1-torch.float16]",
    "tests/test_conv_kernel.py::test_depthwise_kernel[1x13x11x7x3x2x1x1-torch.bfloat16]",
    "tests/test_conv_kernel.py::test_depthwise_kernel[2x8x13x13x7x2x3x1-torch.float32]",
    "tests/test_conv_kernel.py::test_depthwise_residual_nchw_and_channel_view_output",
    # TMA conv kernel (sm_90+)
    "tests/test_conv_kernel.py::test_tma_kernel[2x16x5x7x24x3x1x1-torch.float16]",
    "tests/test_conv_kernel.py::test_tma_kernel[2x8x7x6x16x1x0x1-torch.float16]",
    "tests/test_conv_kernel.py::test_tma_kernel[1x24x6x5x8x3x1x1-torch.bfloat16]",
    "tests/test_conv_kernel.py::test_tma_kernel[1x8x9x9x8x3x2x2-torch.float32]",
    "tests/test_conv_kernel.py::test_tma_kernel_reads_and_writes_channel_views",
    "tests/test_conv_kernel.py::test_tma_eligibility",
    # FusedConvBNAct module (eval with autograd, half precision, depthwise)
    "tests/test_module.py::test_eval_matches_and_grads",
    "tests/test_module.py::test_eval_half_precision",
    "tests/test_module.py::test_depthwise_module_eval",
    # OSA: aggregation (flat, eSE, identity), dw+pw, FusedOSA module
    "tests/test_osa.py::test_eval_matches_classic_module[torch.float16-v1]",
    "tests/test_osa.py::test_eval_matches_classic_module[torch.float16-identity]",
    "tests/test_osa.py::test_eval_matches_classic_module[torch.float16-ese]",
    "tests/test_osa.py::test_eval_matches_classic_module[torch.float16-v2]",
    "tests/test_osa.py::test_eval_matches_classic_module[torch.float16-dw_reduced]",
    "tests/test_osa.py::test_eval_matches_classic_module[torch.float16-dw_identity]",
    "tests/test_osa.py::test_eval_matches_classic_module[torch.float16-one_layer]",
    "tests/test_osa.py::test_eval_matches_classic_module[torch.float32-v2]",
    "tests/test_osa.py::test_eval_matches_classic_module[torch.bfloat16-dw_identity]",
    "tests/test_osa.py::test_nchw_and_odd_sizes_through_the_kernel",
    "tests/test_osa.py::test_no_concat_is_materialised",
    "tests/test_osa.py::test_autocast_runs_in_the_autocast_dtype[torch.float16-v2-triton]",
    "tests/test_freshness.py::test_fused_osa_sees_data_writes_everywhere",
    # N-segment aggregation: separate tensors and channel views, 3 and 8 segments, eSE
    "tests/test_segments.py::test_segment_counts_and_layouts[3-nhwc]",
    "tests/test_segments.py::test_segment_counts_and_layouts[8-views]",
    "tests/test_segments.py::test_dtypes_with_residual[torch.float16]",
    "tests/test_segments.py::test_ese_gate_and_residual[torch.float16]",
    # traced fusion of a hand-written forward; torch.compile over FusedOSA
    "tests/test_traced.py::test_traced_block_through_the_kernel",
    "tests/test_traced.py::test_timm_mobilenetv3_through_the_kernels",
    "tests/test_compile.py::test_compile_fullgraph_osa_block",
    # int64 addressing (8 GiB views of address space)
    "tests/test_int64.py::test_conv_pointwise[dense]",
    "tests/test_int64.py::test_conv_3x3_with_residual",
    "tests/test_int64.py::test_depthwise",
    "tests/test_int64.py::test_osa_aggregation_flat",
    "tests/test_int64.py::test_osa_aggregation_per_image_ese_and_gate_residual",
    "tests/test_int64.py::test_osa_dw_pw",
]
# The dry run collects the whole selection (every id must exist) and runs only these.
DRY_RUN_TESTS_K = "test_int64_indexing_path or test_tma_eligibility"

# Fallback copies of the benchmark definitions (used only when benchmarks/test_*.py can't be imported).
_SHAPES = [("s2_3x3", 128, 128, 3, 56), ("s2_agg1x1", 768, 256, 1, 56), ("s3_3x3", 160, 160, 3, 28),
           ("s3_first3x3", 256, 160, 3, 28), ("s3_agg1x1", 1056, 512, 1, 28), ("s4_3x3", 192, 192, 3, 14),
           ("s4_agg1x1", 1472, 768, 1, 14), ("s5_3x3", 224, 224, 3, 7), ("s5_agg1x1", 1888, 1024, 1, 7)]
_BLOCKS = [("s2_osa", 128, 128, 256, 56, False, False), ("s3_osa", 256, 160, 512, 28, False, False),
           ("s4_osa", 512, 192, 768, 14, False, False), ("s4_osa_v2_identity_ese", 768, 192, 768, 14, True, True),
           ("s5_osa", 768, 224, 1024, 7, False, False), ("s5_osa_v2_identity_ese", 1024, 224, 1024, 7, True, True)]
OSA_LAYERS = 5

COLUMNS = ["stage", "case", "provider", "status", "shape", "dtype", "batch", "ms", "speedup_vs_eager", "tflops",
           "pct_roofline", "peak_mem_mb", "peak_mem_vs_eager", "max_abs_err", "rel_err", "numerics", "first_call_s",
           "seconds", "timing", "note", "error"]


class Skip(Exception):
    """A case that can't run here (missing package, no CUDA...): recorded as skipped with its reason."""


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


class Tee:
    """stdout / stderr copied into the log files as they are written."""

    def __init__(self, stream, files):
        self.stream, self.files = stream, files

    def write(self, s):
        self.stream.write(s)
        for f in self.files:
            try:
                f.write(s)
            except ValueError:  # closed by the watchdog's exit
                pass
        return len(s)

    def flush(self):
        self.stream.flush()
        for f in self.files:
            try:
                f.flush()
            except ValueError:
                pass

    def isatty(self):
        return False

    def fileno(self):
        return self.stream.fileno()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Check:
    def __init__(self, args):
        import torch

        self.args = args
        self.torch = torch
        self.cuda = torch.cuda.is_available() and not args.dry_run
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        self.dry = args.dry_run
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.budget = args.budget
        self.deadline = T_START + self.budget
        self.rows: List[dict] = []
        self.lock = threading.RLock()
        self.current = ""
        self.done = False
        self.cut_off = False
        self.child: Optional[subprocess.Popen] = None
        self.observed: Dict[str, float] = {}
        self.ctx_cache: Dict[tuple, object] = {}
        self.peaks = None
        self.tests_info: dict = {}
        self.stage_info: Dict[str, dict] = {}
        self.stage_end = self.deadline
        self.stage = ""
        self.effops_backend_whole = "reference" if self.dry else None  # dry run: the interpreter is too slow for models

        from effops.benchmark import device_stamp

        self.stamp = device_stamp(self.dev)
        self.meta = self._meta()
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.stamp["device"]).strip("-").lower()
        kind = "gpu_check" + ("_dry_run" if self.dry else "") + ("_max_autotune" if args.max_autotune else "")
        self.base = (f"{kind}_{slug}_torch{self.stamp['torch'].split('+')[0]}_triton{self.stamp['triton']}"
                     f"_{self.stamp['date'][:10]}")
        self.base = re.sub(r"[^A-Za-z0-9._-]", "-", self.base)
        # (folder for csv/json/summary, folder for the logs)
        if args.out:
            self.dirs = [(Path(args.out), Path(args.out))]
        elif self.dry:
            d = Path(tempfile.mkdtemp(prefix="gpu_check_dry_run_"))
            self.dirs = [(d, d)]
        else:
            self.dirs = []
            if os.environ.get("OUT"):
                self.dirs.append((Path(os.environ["OUT"]), Path(os.environ["OUT"])))
            self.dirs.append((BENCH / "results", BENCH / "results" / "logs"))
        for data_dir, log_dir in self.dirs:
            data_dir.mkdir(parents=True, exist_ok=True)
            log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [open(log_dir / f"{self.base}.log", "w") for _, log_dir in self.dirs]
        sys.stdout = Tee(sys.__stdout__, self.logs)
        sys.stderr = Tee(sys.__stderr__, self.logs)

    # ---------------------------------------------------------------- bookkeeping
    def _meta(self):
        torch = self.torch
        meta = {"python": sys.version.split()[0], "mode": "dry-run" if self.dry else "gpu",
                "max_autotune": bool(self.args.max_autotune), "budget_s": self.budget,
                "argv": sys.argv[1:], "dtype": str(self.dtype).replace("torch.", ""),
                "EFFOPS_AUTOTUNE": os.environ.get("EFFOPS_AUTOTUNE", "unset (tiles tuned on first use)"),
                "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
                "grad_mode": "torch.no_grad", "tf32": "off", "cudnn_benchmark": torch.backends.cudnn.benchmark}
        for name in ("torchvision", "timm"):
            try:
                meta[name] = __import__(name).__version__
            except Exception as e:  # noqa: BLE001
                meta[name] = f"missing ({type(e).__name__})"
        try:
            meta["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                                text=True, timeout=10).stdout.strip() or "unknown"
        except Exception:  # noqa: BLE001
            meta["git_commit"] = "unknown"
        if self.cuda:
            meta["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
        return meta

    def log(self, msg: str):
        print(f"[{time.monotonic() - T_START:6.1f}s] {msg}", flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, row: dict):
        with self.lock:
            self.rows.append(row)
            self.flush()

    def flush(self, final=False):
        with self.lock:
            rows = self.rendered_rows()
            doc = {"stamp": self.stamp, "meta": self.meta, "tests": self.tests_info, "stages": self.stage_info,
                   "complete": final and not self.cut_off, "cut_off": self.cut_off, "rows": rows}
            summary = self.summary(rows)
            for data_dir, _ in self.dirs:
                with open(data_dir / f"{self.base}.json", "w") as f:
                    json.dump(doc, f, indent=1, default=str)
                with open(data_dir / f"{self.base}.csv", "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(self.stamp) + COLUMNS, extrasaction="ignore")
                    w.writeheader()
                    for r in rows:
                        w.writerow({**self.stamp, **{k: _fmt_csv(r.get(k)) for k in COLUMNS}})
                with open(data_dir / f"{self.base}_summary.md", "w") as f:
                    f.write(summary)
            for f in self.logs:
                try:
                    f.flush()
                except ValueError:
                    pass
            return summary

    def rendered_rows(self) -> List[dict]:
        """Rows with the columns that depend on other rows of the case (ratios to eager, numerics verdict)."""
        eager = {(r["stage"], r["case"]): r for r in self.rows if r["provider"] == "eager" and r["status"] == "ok"}
        eps = {"float16": 1e-3, "bfloat16": 8e-3}
        out = []
        for r in self.rows:
            r = dict(r)
            e = eager.get((r["stage"], r["case"]))
            if e and r.get("ms") and e.get("ms"):
                r["speedup_vs_eager"] = e["ms"] / r["ms"]
            if e and r.get("peak_mem_mb") and e.get("peak_mem_mb"):
                r["peak_mem_vs_eager"] = r["peak_mem_mb"] / e["peak_mem_mb"]
            if r["provider"].startswith("effops") and r.get("rel_err") is not None and r["status"] == "ok":
                if r.get("dtype") in eps:
                    base = e.get("rel_err") if e else None
                    if base is not None:
                        r["numerics"] = "ok" if r["rel_err"] <= 2 * base + eps[r["dtype"]] else "MISMATCH"
                else:
                    r["numerics"] = "ok" if r["rel_err"] <= 1e-4 else "MISMATCH"
            out.append(r)
        return out

    # ---------------------------------------------------------------- summary
    def summary(self, rows) -> str:
        """Markdown: per stage, one line per case with every provider's time (and x eager), effops' error next
        to eager's, peak memory where measured; then what failed or was skipped, and why. All columns: the CSV."""
        st, m = self.stamp, self.meta
        lines = [f"# effops GPU check{' (dry run)' if self.dry else ''}{' (--max-autotune)' if self.args.max_autotune else ''}",
                 "",
                 f"{st['device']} | torch {st['torch']} | Triton {st['triton']} | CUDA {st['cuda']} | "
                 f"torchvision {m.get('torchvision')} | timm {m.get('timm')} | {st['date']} | commit {m.get('git_commit')}",
                 "",
                 f"`python benchmarks/gpu_check.py{''.join(' ' + a for a in m['argv'])}` | budget {self.budget:.0f} s | "
                 f"elapsed {time.monotonic() - T_START:.0f} s | EFFOPS_AUTOTUNE {m['EFFOPS_AUTOTUNE']}"
                 + (" | **cut off at the deadline**" if self.cut_off else "")
                 + ("" if self.done or self.cut_off else " | **in progress**"),
                 "", f"**Verdict: {self.verdict(rows)}**", ""]
        stages = getattr(self, "stages", None) or (["max_autotune"] if self.args.max_autotune else STAGES)
        f = lambda v, spec: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)  # noqa: E731
        problems = []
        for s in stages:
            info = self.stage_info.get(s, {})
            srows = [r for r in rows if r["stage"] == s]
            lines += [f"## {TITLES[s]}" + (f" ({info['what']})" if info.get("what") else ""), ""]
            if info.get("status"):
                lines += [f"{info['status']}; {info.get('spent_s', 0):.0f} s of a {info.get('budget_s', 0):.0f} s share", ""]
            if s == "tests":
                lines += [f"- {r['status']}: {r.get('note', '')}" + (f" — {r['error']}" if r.get("error") else "")
                          for r in srows] + [""]
                continue
            cases = list(dict.fromkeys(r["case"] for r in srows if r["provider"] != "-"))
            provs = list(dict.fromkeys(r["provider"] for r in srows if r["provider"] != "-"))
            if not cases:
                lines += ["(no rows)", ""]
            else:
                at = {(r["case"], r["provider"]): r for r in srows}
                mem = any(r.get("peak_mem_mb") for r in srows)
                lines.append("| case | " + " | ".join(f"{p} ms" + (" (x eager)" if p != "eager" else "") for p in provs) + " | effops rel err (eager's) |"
                             + (" peak MB " + " / ".join(provs) + " |" if mem else ""))
                lines.append("|---|" + "---:|" * len(provs) + "---|" + ("---|" if mem else ""))
                for c in cases:
                    cells = []
                    for p in provs:
                        r = at.get((c, p))
                        if r is None:
                            cells.append("")
                        elif r["status"] != "ok":
                            cells.append({"skipped": "skip", "failed": "FAIL"}.get(r["status"], r["status"]))
                        elif p == "eager":
                            cells.append(f(r.get("ms"), ".3f"))
                        else:
                            cells.append(f"{f(r.get('ms'), '.3f')} ({f(r.get('speedup_vs_eager'), '.2f')}x)")
                    e, o = at.get((c, "eager"), {}), at.get((c, "effops"), {})
                    err = (f"{f(o.get('rel_err'), '.1e')} ({f(e.get('rel_err'), '.1e')})"
                           + (f" {o['numerics']}" if o.get("numerics") else ""))
                    line = f"| {c} | " + " | ".join(cells) + f" | {err} |"
                    if mem:
                        line += " " + " / ".join(f(at.get((c, p), {}).get("peak_mem_mb"), ".0f") for p in provs) + " |"
                    lines.append(line)
                lines.append("")
            for r in srows:
                if r["status"] == "failed" or r.get("numerics") == "MISMATCH":
                    problems.append(f"- {s} {r['case']} / {r['provider']}: {r.get('error') or 'numerics MISMATCH'}")
                elif r["status"] not in ("ok", "skipped"):
                    problems.append(f"- {s} {r['case']}: {r['status']}: {r.get('note', '')}")
            skipped: Dict[str, list] = {}
            for r in srows:
                if r["status"] == "skipped":
                    skipped.setdefault(re.sub(r"\d+", "N", r.get("note", "")), []).append(r)
            for group in skipped.values():
                problems.append(f"- {s}: {len(group)} skipped ({group[0].get('note', '')}): "
                                + ", ".join(f"{r['case']}/{r['provider']}" for r in group))
        if problems:
            lines += ["## Failed or skipped", ""] + problems + [""]
        if self.meta.get("tuned_tiles"):
            lines += ["Tuned problems (TMA tiles and cuDNN paths among them): " + ", ".join(
                f"after {k}: {v['tiles']} ({v['tma']} TMA, {v.get('cudnn', 0)} cuDNN)" for k, v in self.meta["tuned_tiles"].items()), ""]
        names = [f"{self.base}{suffix}" for suffix in (".csv", ".json", "_summary.md", ".log")]
        if "tests" in stages:
            names.append(f"{self.base}_tests.log")
        lines += ["Files: " + ", ".join(f"`{n}`" for n in names) + " (every column: the CSV)", ""]
        return "\n".join(lines)

    def verdict(self, rows) -> str:
        bad = []
        t = self.tests_info
        if t.get("failed") or t.get("errors"):
            bad.append(f"{t.get('failed', 0)} test(s) failed, {t.get('errors', 0)} error(s)")
        mism = [f"{r['case']}/{r['provider']}" for r in rows if r.get("numerics") == "MISMATCH"]
        if mism:
            bad.append("numerics MISMATCH: " + ", ".join(mism))
        if bad:
            return "FAILED — " + "; ".join(bad)
        n_fail = sum(r["status"] == "failed" for r in rows)
        n_skip = sum(r["status"] == "skipped" for r in rows)
        return (f"correctness checks passed; {sum(r['status'] == 'ok' for r in rows)} rows ok, "
                f"{n_fail} provider(s) failed to run, {n_skip} skipped")

    def exit_code(self) -> int:
        rows = self.rendered_rows()
        t = self.tests_info
        return 1 if (t.get("failed") or t.get("errors") or any(r.get("numerics") == "MISMATCH" for r in rows)) else 0

    # ---------------------------------------------------------------- budget and jobs
    def begin_stage(self, stage: str, later: List[str], what: str = ""):
        now = time.monotonic()
        remaining = max(0.0, self.deadline - now)
        scale = self.budget / 450.0
        nominal = SHARES[stage] * scale
        later_s = sum(SHARES[s] * scale for s in later)
        share = max(nominal / (nominal + later_s) * remaining, remaining - later_s) if remaining > 0 else 0.0
        self.stage, self.stage_start, self.stage_end = stage, now, now + share
        self.stage_info[stage] = {"budget_s": share, "spent_s": 0.0, "status": "running", "what": what}
        self.log(f"=== stage {stage}: {share:.0f} s share ({remaining:.0f} s left overall) {what}")
        self.flush()

    def end_stage(self, status="done"):
        if self.stage != "tests":
            self.tuned_tiles()
        info = self.stage_info[self.stage]
        info["spent_s"] = time.monotonic() - self.stage_start
        info["status"] = status
        self.log(f"=== stage {self.stage} {status} in {info['spent_s']:.0f} s")
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
        self.flush()

    def estimate(self, kind: str) -> float:
        gpu = {"cheap": 4, "effops": 10, "compile": 15, "compile_osa": 20, "compile_model": 60,
               "ma_block": 120, "ma_model": 240, "model_setup": 5, "graph": 5}
        cpu = {"cheap": 1, "effops": 2, "compile": 3, "compile_osa": 3, "compile_model": 6,
               "ma_block": 3, "ma_model": 6, "model_setup": 2, "graph": 1}
        # the longest job of the same kind so far, once there is one (the first pays for warm-up: conservative)
        return self.observed.get(kind, (cpu if self.dry else gpu).get(kind, 5))

    def job(self, case: str, provider: str, kind: str, fn: Callable[[], dict], **fields):
        """Run one (case, provider) measurement unless the time left can't fit it; record a row either way."""
        row = {"stage": self.stage, "case": case, "provider": provider, "status": "ok", **fields}
        est = self.estimate(kind)
        now = time.monotonic()
        if self.cut_off:
            return None
        if now + est > self.deadline:
            row.update(status="skipped", note=f"overall deadline near ({self.deadline - now:.0f} s left, needs ~{est:.0f} s)")
        elif now + est > self.stage_end:
            row.update(status="skipped", note=f"stage share spent ({self.stage_end - now:.0f} s left, needs ~{est:.0f} s)")
        if row["status"] == "skipped":
            self.log(f"skip {case} / {provider}: {row['note']}")
            self.add(row)
            return row
        self.current = f"{case} / {provider}"
        self.log(f"run  {case} / {provider}")
        t0 = time.monotonic()
        try:
            with self.torch.no_grad():
                row.update(fn())
        except Skip as e:
            row.update(status="skipped", note=(row.get("note", "") + " " + str(e)).strip())
        except Exception as e:  # noqa: BLE001 - every case is guarded; the error is the result
            row.update(status="failed", error=_short(e))
            self.log(f"FAILED {case} / {provider}: {_short(e)}\n{traceback.format_exc()}")
        finally:
            if self.cuda:
                try:
                    self.torch.cuda.synchronize()
                except Exception:  # noqa: BLE001
                    pass
        row["seconds"] = time.monotonic() - t0
        if row["status"] == "ok":
            self.observed[kind] = max(self.observed.get(kind, 0.0), row["seconds"])
            self.log(f"     {case} / {provider}: {_fmt_ms(row.get('ms'))} ms, first call {row.get('first_call_s', 0):.1f} s, "
                     f"rel err {_fmt_e(row.get('rel_err'))} ({row['seconds']:.1f} s)")
        self.current = ""
        self.add(row)
        return row

    def ctx(self, key, build):
        """Per-case objects (models, inputs, reference output), built once; a build error is re-raised for every job."""
        hit = self.ctx_cache.get(key)
        if hit is None:
            try:
                hit = ("ok", build())
            except Exception as e:  # noqa: BLE001
                hit = ("err", e)
            self.ctx_cache[key] = hit
        if hit[0] == "err":
            raise hit[1]
        return hit[1]

    # ---------------------------------------------------------------- measuring
    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def compare(self, out, ref) -> dict:
        torch = self.torch
        if isinstance(out, (tuple, list)):
            out = out[0]
        a, b = out.detach().float(), ref.detach().float()
        if a.shape != b.shape:
            raise RuntimeError(f"output shape {tuple(a.shape)} != reference {tuple(b.shape)}")
        if not torch.isfinite(a).all():
            return {"max_abs_err": float("nan"), "rel_err": float("nan"), "note": "non-finite values in the output"}
        d = (a.double() - b.double())
        return {"max_abs_err": d.abs().max().item(), "rel_err": (d.norm() / b.double().norm().clamp_min(1e-30)).item()}

    def measure(self, fn, ref, *, flops=None, min_bytes=None, memory=False, output=None, timing=None) -> dict:
        """First call (compiles / tunes), error against ``ref``, median time, optional peak memory."""
        from effops.benchmark import peak_memory_mb, roofline_ms, time_ms

        t0 = time.monotonic()
        out = fn()
        self.sync()
        first = time.monotonic() - t0
        res = {"first_call_s": first}
        res.update(self.compare(output() if output else out, ref))
        del out
        res["ms"] = time_ms(fn, self.dev, cpu_iters=2 if self.dry else 10)
        res["timing"] = timing or ("do_bench median" if self.cuda else "cpu wall-clock median")
        if flops:
            res["tflops"] = flops / res["ms"] / 1e9
            if self.peaks:
                res["pct_roofline"] = 100 * roofline_ms(flops, min_bytes or 0, self.peaks) / res["ms"]
        if memory and self.cuda:
            res["peak_mem_mb"] = peak_memory_mb(fn, self.dev)
        return res

    def compiled(self, module, mode: Optional[str] = None, freezing: bool = False, first_case: bool = True):
        """``torch.compile(module, mode=mode)``; on the dry run dynamo's eager backend on each stage's first case."""
        torch = self.torch
        torch._dynamo.reset()  # every case compiles a new module: stay clear of dynamo's recompile limit
        if self.dry:
            if not first_case:
                raise Skip("dry run: torch.compile runs on each stage's first case only (CPU compiles are slow)")
            return torch.compile(module, backend="eager")
        if freezing:  # compiled (on the first call) under freezing=True, as effops.benchmark.compiled_providers does
            import torch._inductor.config as inductor_config

            c = torch.compile(module, mode=mode)
            state = {"compiled": False}

            def call(*a):
                if state["compiled"]:
                    return c(*a)
                with inductor_config.patch(freezing=True):
                    out = c(*a)
                state["compiled"] = True
                return out
            return call
        return torch.compile(module, mode=mode) if mode else torch.compile(module)

    def whole_backend(self, fn):
        """effops providers of whole models: on the dry run its reference backend (the interpreter is too slow)."""
        if not self.effops_backend_whole:
            return fn
        import effops

        def run():
            with effops.use_backend(self.effops_backend_whole):
                return fn()
        return run

    def capture(self, fn):
        """Capture ``fn`` in a CUDA graph after warm-up calls (which tune effops' tiles); returns (graph, output)."""
        torch = self.torch
        if not self.cuda:
            raise Skip("CUDA graphs need a CUDA device")
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
        torch.cuda.synchronize()
        return g, out

    # ---------------------------------------------------------------- stage 1
    def stage_tests(self):
        torch = self.torch
        self.begin_stage("tests", self.later("tests"), "pytest subset; EFFOPS_AUTOTUNE=0")
        limit = max(5.0, min(120.0, self.stage_end - time.monotonic(), self.left() - 10))
        cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "--no-header",
               "-o", "console_output_style=classic"]
        if self.dry:
            cmd += ["-k", DRY_RUN_TESTS_K]
        else:
            import importlib.util

            if importlib.util.find_spec("xdist") is not None:
                cmd += ["-n", "6"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
        env.update(EFFOPS_AUTOTUNE="0", PYTHONPATH=os.pathsep.join(
            [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        if not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "1"
        primary_log = self.dirs[0][1] / f"{self.base}_tests.log"
        row = {"stage": "tests", "case": "pytest selection", "provider": "pytest", "status": "ok"}
        t0 = time.monotonic()
        self.current = "tests: pytest"
        ids = list(TEST_SELECTION)
        missing: List[str] = []
        try:
            for attempt in range(2):
                rc, output, timed_out = self._run_pytest(cmd + ids, env, limit - (time.monotonic() - t0), primary_log)
                if rc == 4 and "not found:" in output and attempt == 0:
                    # ids renamed since the selection was written: collect what exists, run that
                    files = sorted({i.split("::")[0] for i in ids if (REPO / i.split("::")[0]).is_file()})
                    _, listing, _ = self._run_pytest(
                        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"] + files, env,
                        max(5.0, limit - (time.monotonic() - t0)), primary_log)
                    found = set(re.findall(r"^(tests/\S+::\S+)$", listing, re.M))
                    missing = [i for i in ids if i not in found and not any(f.startswith(i + "[") for f in found)]
                    ids = [i for i in ids if i not in missing]
                    self.log(f"test ids not found, left out: {missing}")
                    if ids:
                        continue
                break
            counts = _pytest_counts(output)
            tail = output.splitlines()
            cut = next((i for i, ln in enumerate(tail) if "short test summary info" in ln), max(0, len(tail) - 8))
            self.log("pytest output (end):\n" + "\n".join(tail[cut:][-40:]))
            failed_ids = sorted(set(re.findall(r"^(?:FAILED|ERROR) (tests/\S+)", output, re.M)))
            self.tests_info = {"cmd": " ".join(cmd[1:3] + ["<selection>"] + cmd[3:]), "selection": TEST_SELECTION,
                               "dry_run_k": DRY_RUN_TESTS_K if self.dry else None, "rc": rc,
                               "timed_out": timed_out, "limit_s": limit, "missing_ids": missing,
                               "failed_ids": failed_ids, "log": primary_log.name, **counts}
            note = (", ".join(f"{v} {k}" for k, v in counts.items() if v and k != "complete") or "no tests ran") + \
                f" (rc {rc}, {time.monotonic() - t0:.0f} s{', cut at the ' + format(limit, '.0f') + ' s limit' if timed_out else ''})"
            if missing:
                note += f"; ids not found: {', '.join(missing)}"
            if self.dry:
                note += f"; dry run: {len(ids)} of {len(TEST_SELECTION)} ids collected, ran -k '{DRY_RUN_TESTS_K}'"
            row["note"] = note
            if counts.get("failed") or counts.get("errors") or (rc not in (0, 5) and not timed_out):
                row["status"] = "failed"
                row["error"] = "; ".join(failed_ids[:20]) or f"pytest exit status {rc}"
                if not counts.get("failed") and not counts.get("errors"):
                    self.tests_info["errors"] = 1  # pytest itself failed (usage / collection error)
        except Exception as e:  # noqa: BLE001
            row.update(status="failed", error=_short(e))
            self.tests_info = {"errors": 1, "exception": _short(e)}
            self.log(traceback.format_exc())
        row["seconds"] = time.monotonic() - t0
        self.current = ""
        for _, log_dir in self.dirs[1:]:
            try:
                shutil.copy(primary_log, log_dir / primary_log.name)
            except OSError:
                pass
        self.log(f"tests: {row.get('note')}")
        self.add(row)
        self.guard_tma()
        self.end_stage()

    def guard_tma(self):
        """A TMA test that failed on this GPU may mean a kernel that faults, and a fault ends every later case
        of this process: then the tuner is not offered the TMA tiles in the timing stages (recorded in meta)."""
        if not self.cuda or not any("tma" in i.lower() for i in self.tests_info.get("failed_ids", [])):
            return
        try:
            from effops.ops import conv

            orig = conv._candidates
            conv._candidates = lambda ci, co, *a, **k: orig(ci, co)
            self.meta["tma_tiles"] = "left out of the tuner: TMA tests failed in stage 1"
        except Exception as e:  # noqa: BLE001
            self.meta["tma_tiles"] = f"TMA tests failed; could not leave TMA tiles out: {_short(e)}"
        self.log(self.meta["tma_tiles"])

    def tuned_tiles(self):
        """How many problems the tuner has cached, and how many chose a TMA tile or a cuDNN path (meta,
        after each timing stage)."""
        try:
            from effops import tuning

            cfgs = [c for c in tuning._CACHE.values() if isinstance(c, dict)]
            self.meta.setdefault("tuned_tiles", {})[self.stage] = {
                "tiles": len(cfgs), "tma": sum(bool(c.get("TMA")) for c in cfgs),
                "cudnn": sum(bool(c.get("VENDOR")) for c in cfgs)}
        except Exception:  # noqa: BLE001
            pass

    def _run_pytest(self, cmd, env, limit, log_path):
        with open(log_path, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            start = f.tell()
            self.child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True)
            timed_out = False
            try:
                rc = self.child.wait(timeout=max(1.0, limit))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(self.child)
                rc = self.child.wait()
            self.child = None
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        return rc, text, timed_out

    # ---------------------------------------------------------------- stage 2
    def conv_shapes(self):
        try:
            import test_conv_bn_act as t

            shapes, src = list(t.SHAPES), "benchmarks/test_conv_bn_act.py"
            if not self.cuda and set(shapes) <= set(_SHAPES):  # that file keeps the small maps only on a CPU
                shapes, src = list(_SHAPES), "built-in copy (a superset of that file's CPU list)"
        except Exception as e:  # noqa: BLE001
            shapes, src = list(_SHAPES), f"built-in copy ({_short(e)})"
        self.meta["conv_shapes_from"] = src
        return shapes

    def stage_conv(self):
        torch = self.torch
        import torch.nn.functional as F
        from torch import nn

        from effops import FusedConvBNAct
        from effops.ops.reference import fold_bn

        batch = 2 if self.dry else 32
        self.begin_stage("conv", self.later("conv"), f"batch {batch}, {self.meta['dtype']}, channels_last")
        dt, dev = self.dtype, self.dev
        cl = torch.channels_last
        cases = []
        for name, cin, cout, k, hw in self.conv_shapes():
            if self.dry:
                cin, cout, hw = max(4, cin // 16), max(4, cout // 16), max(2, hw // 7)
            cases.append((name, cin, cout, k, hw))

        def build(cin, cout, k, hw):
            from effops.benchmark import randomize_bn

            seq = randomize_bn(nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))).eval()
            x32 = torch.randn(batch, cin, hw, hw, device=dev).contiguous(memory_format=cl)
            ref = copy.deepcopy(seq).to(dev)(x32.clone())
            seq = seq.to(dev, dt).to(memory_format=cl)
            x = x32.to(dt).contiguous(memory_format=cl)
            conv, bn = seq[0], seq[1]
            wf, bf = fold_bn(conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
            wf = wf.to(dt).contiguous(memory_format=cl)
            fused = FusedConvBNAct.from_modules(*copy.deepcopy(list(seq))).eval()
            return dict(seq=seq, x=x, ref=ref, wf=wf, bf=bf.to(dt), fused=fused)

        first = True
        for compile_pass in (False, True):
            for i, (name, cin, cout, k, hw) in enumerate(cases):
                key = ("conv", name)
                flops = 2 * batch * hw * hw * cout * cin * k * k
                min_bytes = (2 if dt != torch.float32 else 4) * (batch * hw * hw * (cin + cout) + cout * cin * k * k)
                fields = dict(shape=f"{batch}x{cin}x{hw}x{hw} k{k} -> {cout}", dtype=self.meta["dtype"], batch=batch)
                get = lambda key=key, a=(cin, cout, k, hw): self.ctx(key, lambda: build(*a))  # noqa: E731
                m = lambda fn, get=get, flops=flops, mb=min_bytes: self.measure(fn, get()["ref"], flops=flops,  # noqa: E731
                                                                                min_bytes=mb)
                pad = k // 2
                if not compile_pass:
                    self.job(name, "eager", "cheap", lambda get=get, m=m: m(lambda c=get(): c["seq"](c["x"])), **fields)
                    self.job(name, "eager_folded", "cheap",
                             lambda get=get, m=m, pad=pad: m(lambda c=get(): F.relu_(F.conv2d(c["x"], c["wf"], c["bf"], 1, pad))),
                             note="F.conv2d(folded w, b) + relu_", **fields)
                    if self.cuda:
                        self.job(name, "cudnn_folded_relu", "cheap", lambda get=get, m=m, pad=pad: m(
                            lambda c=get(): torch.cudnn_convolution_relu(c["x"], c["wf"], c["bf"], (1, 1), (pad, pad),
                                                                         (1, 1), 1)),
                            note="torch.cudnn_convolution_relu", **fields)
                    self.job(name, "effops", "effops" if i < 2 else "cheap",
                             lambda get=get, m=m: m(lambda c=get(): c["fused"](c["x"])), **fields)
                else:
                    def comp(get=get, m=m, first=first):
                        c = get()
                        f = self.compiled(copy.deepcopy(c["seq"]), first_case=first)
                        return m(lambda: f(c["x"]))
                    self.job(name, "compile_default", "compile", comp, **fields)
                    first = False
        self.drop_ctx("conv")
        self.end_stage()

    def drop_ctx(self, prefix):
        for k in [k for k in self.ctx_cache if k[0] == prefix]:
            del self.ctx_cache[k]
        self.torch._dynamo.reset()
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    # ---------------------------------------------------------------- stage 3
    def osa_blocks(self):
        try:
            import test_osa as t

            blocks, src = list(t.BLOCKS), "benchmarks/test_osa.py"
        except Exception as e:  # noqa: BLE001
            blocks, src = list(_BLOCKS), f"built-in copy ({_short(e)})"
        self.meta["osa_blocks_from"] = src
        return blocks

    def osa_case(self, block, batch):
        torch = self.torch
        import effops
        from effops.benchmark import randomize_bn
        from effops.models.classic_vovnet import OSAModule

        name, cin, sc, cc, hw, identity, ese = block
        if self.dry:
            cin, sc, cc, hw = max(4, cin // 16), max(4, sc // 16), max(4, cc // 16), max(2, hw // 7)
        L = OSA_LAYERS
        pix = batch * hw * hw
        flops = 2 * pix * (9 * sc * cin + (L - 1) * 9 * sc * sc + cc * (cin + L * sc))
        esize = 2 if self.dtype != torch.float32 else 4

        def build():
            model = randomize_bn(OSAModule(cin, sc, cc, L, "OSA", identity=identity, ese=ese)).eval()
            x32 = torch.randn(batch, cin, hw, hw, device=self.dev).contiguous(memory_format=torch.channels_last)
            ref = copy.deepcopy(model).to(self.dev).to(memory_format=torch.channels_last)(x32)
            model = model.to(self.dev, self.dtype).to(memory_format=torch.channels_last)
            fast = effops.FusedOSA.from_module(copy.deepcopy(model)).eval()
            return dict(model=model, fast=fast, x=x32.to(self.dtype).contiguous(memory_format=torch.channels_last),
                        ref=ref)

        weights = sum(p.numel() for p in OSAModule(cin, sc, cc, L, "OSA", identity=identity, ese=ese).parameters())
        min_bytes = esize * (pix * (cin + 2 * L * sc + cc) + weights)
        fields = dict(shape=f"{batch}x{cin}x{hw}x{hw} -> {L}x{sc} -> {cc}", dtype=self.meta["dtype"], batch=batch)
        return name, build, flops, min_bytes, fields

    def stage_osa(self):
        batch = 2 if self.dry else 32
        self.begin_stage("osa", self.later("osa"), f"batch {batch}, {self.meta['dtype']}, channels_last")
        cases = [self.osa_case(b, batch) for b in self.osa_blocks()]
        for compile_pass in (False, True):
            for i, (name, build, flops, mb, fields) in enumerate(cases):
                get = lambda name=name, build=build: self.ctx(("osa", name), build)  # noqa: E731
                m = lambda fn, get=get, flops=flops, mb=mb: self.measure(fn, get()["ref"], flops=flops, min_bytes=mb,  # noqa: E731
                                                                         memory=True)
                if not compile_pass:
                    self.job(name, "eager", "cheap", lambda get=get, m=m: m(lambda c=get(): c["model"](c["x"])), **fields)
                    self.job(name, "effops", "effops" if i < 2 else "cheap",
                             lambda get=get, m=m: m(lambda c=get(): c["fast"](c["x"])), **fields)
                else:
                    for prov, attr in (("compile_default", "model"), ("effops_compile", "fast")):
                        def comp(get=get, m=m, attr=attr, first=i == 0):
                            c = get()
                            f = self.compiled(c[attr] if attr == "fast" else copy.deepcopy(c[attr]), first_case=first)
                            return m(lambda: f(c["x"]))
                        self.job(name, prov, "compile_osa", comp, **fields)
        self.drop_ctx("osa")
        self.end_stage()

    # ---------------------------------------------------------------- stages 4 and 5
    def build_model(self, name):
        from effops.models import VOVNET_CONFIGS, classic_vovnet

        if name in VOVNET_CONFIGS:
            return classic_vovnet(name)
        if name in ("resnet50", "mobilenet_v2"):
            try:
                import torchvision
            except ImportError as e:
                raise Skip(f"torchvision not installed ({e})")
            return getattr(torchvision.models, name)(weights=None)
        try:
            import timm
        except ImportError as e:
            raise Skip(f"timm not installed ({e})")
        return timm.create_model(name, pretrained=False)

    def model_ctx(self, name, batch):
        """Model objects (shared by every batch size) plus an input and its float32 reference output."""
        torch = self.torch
        size = 32 if self.dry else 224

        def build():
            base = self.ctx(("model_base", name), lambda: self._model_base(name))
            x32 = torch.randn(batch, 3, size, size, device=self.dev).contiguous(memory_format=torch.channels_last)
            ref = base["model32"](x32)
            return dict(base, x=x32.to(self.dtype).contiguous(memory_format=torch.channels_last), ref=ref)

        return self.ctx(("model", name, batch), build)

    def _model_base(self, name):
        torch = self.torch
        import effops
        from effops.benchmark import randomize_bn

        model = randomize_bn(self.build_model(name)).eval()
        model32 = copy.deepcopy(model).to(self.dev).to(memory_format=torch.channels_last)
        model = model.to(self.dev, self.dtype).to(memory_format=torch.channels_last)
        fast = effops.optimize(model)
        rep = fast.effops_report
        folded, n_folded, n_bn = fold_batchnorms(copy.deepcopy(model32))
        folded = folded.to(self.dev, self.dtype).to(memory_format=torch.channels_last)
        return dict(model=model, model32=model32, fast=fast, folded=folded,
                    report=f"{len(rep.swapped)} swapped, {len(rep.skipped)} skipped",
                    fold_note=f"folded {n_folded} of {n_bn} BatchNorms into their convs")

    def model_flops(self, c) -> float:
        """FLOPs of one forward of the eager model on the case's input (torch.utils.flop_counter), cached."""
        if "flops" not in c:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                c["model"](c["x"])
            c["flops"] = fc.get_total_flops()
        return c["flops"]

    def model_fields(self, name, batch, size):
        return dict(shape=f"{batch}x3x{size}x{size}", dtype=self.meta["dtype"], batch=batch)

    def stage_models(self):
        torch = self.torch
        batch = 1 if self.dry else 32
        size = 32 if self.dry else 224
        what = f"batch {batch}, {self.meta['dtype']}, {size}x{size}, channels_last"
        if self.dry:
            what += "; dry run: effops on its reference backend"
        self.begin_stage("models", self.later("models"), what)
        names = WHOLE_MODELS
        for compile_pass in (False, True):
            for i, name in enumerate(names):
                fields = self.model_fields(name, batch, size)
                get = lambda name=name: self.model_ctx(name, batch)  # noqa: E731

                def m(fn, get=get):
                    c = get()
                    return self.measure(fn, c["ref"], flops=self.model_flops(c), memory=True)

                if not compile_pass:
                    self.job(name, "eager", "model_setup", lambda get=get, m=m: m(lambda c=get(): c["model"](c["x"])),
                             **fields)
                    self.job(name, "eager_folded_bn", "cheap", lambda get=get, m=m: dict(
                        m(lambda c=get(): c["folded"](c["x"])), note=get()["fold_note"]), **fields)
                    self.job(name, "effops", "effops", lambda get=get, m=m: dict(
                        m(self.whole_backend(lambda c=get(): c["fast"](c["x"]))), note=get()["report"]), **fields)
                else:
                    for prov, attr in (("compile_default", "model"), ("effops_compile", "fast")):
                        def comp(get=get, m=m, attr=attr, first=i == 0):
                            c = get()
                            f = self.compiled(c[attr] if attr == "fast" else copy.deepcopy(c[attr]), first_case=first)
                            return m(self.whole_backend(lambda: f(c["x"])))
                        self.job(name, prov, "compile_model", comp, **fields)
        # the model objects stay for stage 5 (batch 1); drop the batch-32 inputs and outputs
        for k in [k for k in self.ctx_cache if k[0] == "model"]:
            del self.ctx_cache[k]
        torch._dynamo.reset()
        self.end_stage()

    def stage_graphs(self):
        torch = self.torch
        batch = 1
        size = 32 if self.dry else 224
        what = f"batch 1, {self.meta['dtype']}, {size}x{size}, channels_last"
        if self.dry:
            what += "; dry run: no CUDA graphs on CPU, effops on its reference backend"
        self.begin_stage("graphs", self.later("graphs"), what)
        for compile_pass in (False, True):
            for i, name in enumerate(WHOLE_MODELS):
                fields = self.model_fields(name, batch, size)
                get = lambda name=name: self.model_ctx(name, batch)  # noqa: E731

                def m(fn, get=get, **kw):
                    c = get()
                    return self.measure(fn, c["ref"], flops=self.model_flops(c), **kw)

                def graph(attr, get=get):
                    c = get()
                    fn = self.whole_backend(lambda: c[attr](c["x"]))
                    g, out = self.capture(fn)
                    return self.measure(g.replay, c["ref"], flops=self.model_flops(c), output=lambda: out,
                                        timing="do_bench median of graph.replay()")

                if not compile_pass:
                    self.job(name, "eager", "model_setup", lambda get=get, m=m: m(lambda c=get(): c["model"](c["x"])),
                             **fields)
                    self.job(name, "effops", "effops", lambda get=get, m=m: m(
                        self.whole_backend(lambda c=get(): c["fast"](c["x"]))), **fields)
                    self.job(name, "eager_cuda_graph", "graph", lambda graph=graph: graph("model"), **fields)
                    self.job(name, "effops_cuda_graph", "graph", lambda graph=graph: graph("fast"), **fields)
                else:
                    for prov, attr in (("compile_reduce_overhead", "model"), ("effops_compile_reduce_overhead", "fast")):
                        def comp(get=get, m=m, attr=attr, first=i == 0):
                            c = get()
                            f = self.compiled(c[attr] if attr == "fast" else copy.deepcopy(c[attr]),
                                              mode="reduce-overhead", first_case=first)

                            def call():
                                mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
                                if mark is not None and self.cuda:
                                    mark()
                                return f(c["x"])
                            res = m(self.whole_backend(call))
                            if self.dry:
                                res["note"] = "dry run: dynamo eager backend (mode ignored)"
                            return res
                        self.job(name, prov, "compile_model", comp, **fields)
        self.drop_ctx("model")
        self.drop_ctx("model_base")
        self.end_stage()

    # ---------------------------------------------------------------- --max-autotune
    def stage_max_autotune(self):
        batch = 2 if self.dry else 32
        self.begin_stage("max_autotune", [], f"batch {batch}, {self.meta['dtype']}, channels_last, inductor freezing=True")
        mbatch = 1 if self.dry else 32
        size = 32 if self.dry else 224
        jobs_cheap, jobs_compile = [], []
        # whole VoVNet-39
        get_m = lambda: self.model_ctx("vovnet39", mbatch)  # noqa: E731
        mfields = self.model_fields("vovnet39", mbatch, size)
        mm = lambda fn: self.measure(fn, get_m()["ref"], flops=self.model_flops(get_m()), memory=True)  # noqa: E731
        jobs_cheap.append(("vovnet39", "eager", "model_setup", lambda: mm(lambda c=get_m(): c["model"](c["x"])), mfields))
        jobs_cheap.append(("vovnet39", "effops", "effops",
                           lambda: mm(self.whole_backend(lambda c=get_m(): c["fast"](c["x"]))), mfields))

        def ma(get, m, attr, first, whole=False):
            c = get()
            f = self.compiled(c[attr] if attr == "fast" else copy.deepcopy(c[attr]), mode="max-autotune",
                              freezing=True, first_case=first)
            fn = (lambda: f(c["x"]))
            return m(self.whole_backend(fn) if whole else fn)

        jobs_compile.append(("vovnet39", "compile_max_autotune_freezing", "ma_model",
                             lambda: ma(get_m, mm, "model", True, True), mfields))
        for i, (name, build, flops, mb, fields) in enumerate(self.osa_case(b, batch) for b in self.osa_blocks()):
            get = lambda name=name, build=build: self.ctx(("osa", name), build)  # noqa: E731
            m = lambda fn, get=get, flops=flops, mb=mb: self.measure(fn, get()["ref"], flops=flops, min_bytes=mb,  # noqa: E731
                                                                     memory=True)
            jobs_cheap.append((name, "eager", "cheap", lambda get=get, m=m: m(lambda c=get(): c["model"](c["x"])), fields))
            jobs_cheap.append((name, "effops", "effops", lambda get=get, m=m: m(lambda c=get(): c["fast"](c["x"])), fields))
            jobs_compile.append((name, "compile_max_autotune_freezing", "ma_block",
                                 lambda get=get, m=m, first=i == 0: ma(get, m, "model", first), fields))
        jobs_compile.append(("vovnet39", "effops_compile_max_autotune_freezing", "ma_model",
                             lambda: ma(get_m, mm, "fast", True, True), mfields))
        for case, prov, kind, fn, fields in jobs_cheap + jobs_compile:
            self.job(case, prov, kind, fn, **fields)
        self.drop_ctx("osa")
        self.drop_ctx("model")
        self.end_stage()

    # ---------------------------------------------------------------- driver
    def later(self, stage):
        order = self.stages
        return order[order.index(stage) + 1:]

    def run(self):
        torch = self.torch
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.manual_seed(0)
        self.log(f"{self.stamp['device']} | torch {self.stamp['torch']} | triton {self.stamp['triton']} | "
                 f"{'dry run' if self.dry else 'GPU run'} | budget {self.budget:.0f} s | output {self.base}.* in "
                 + ", ".join(str(d) for d, _ in self.dirs))
        self.stages = ["max_autotune"] if self.args.max_autotune else [s for s in STAGES if s in self.args.stages]
        self.flush()
        if self.cuda and self.stages != ["tests"]:
            try:
                from effops.benchmark import measured_peaks

                self.peaks = measured_peaks(self.dev, self.dtype)
                self.meta["peak_tflops_measured"], self.meta["peak_gbps_measured"] = self.peaks
            except Exception as e:  # noqa: BLE001
                self.meta["peaks_error"] = _short(e)
        for stage in self.stages:
            if self.cut_off:
                break
            getattr(self, f"stage_{stage}")()
        self.done = True
        summary = self.flush(final=True)
        print("\n" + summary, flush=True)
        return self.exit_code()

    # ---------------------------------------------------------------- watchdog
    def watchdog(self, grace: float):
        """At deadline + grace: record the cut-off, write the files, stop (the device call may end any moment)."""
        def wait():
            while not self.done:
                if time.monotonic() > self.deadline + grace:
                    self.cut_off = True
                    try:
                        if self.child is not None:
                            _kill_group(self.child)
                        with self.lock:
                            self.rows.append({"stage": self.stage, "case": self.current or "-", "provider": "-",
                                              "status": "cut off",
                                              "note": f"cut off {grace:.0f} s after the {self.budget:.0f} s budget"})
                            if self.stage in self.stage_info:
                                self.stage_info[self.stage]["status"] = "cut off"
                            summary = self.flush()
                        sys.__stdout__.write("\n" + summary + "\n")
                        sys.__stdout__.flush()
                    finally:
                        os._exit(0 if not self.exit_code() else 1)
                time.sleep(0.5)
        threading.Thread(target=wait, daemon=True).start()


def fold_batchnorms(model):
    """Eager with BN folded into the conv before it: a Conv2d directly followed, among its parent's
    children, by a BatchNorm2d is folded (weight, bias) and the BN replaced by ``nn.Identity`` (timm's
    ``BatchNormAct2d``: by its drop + act). Assumes children run in registration order, which holds
    for the benchmarked models; the error column checks it. Returns (model, folded, total BNs)."""
    import torch
    from torch import nn

    from effops.ops.reference import fold_bn

    total = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = 0
    for parent in list(model.modules()):
        kids = list(parent.named_children())
        for (_, a), (bname, b) in zip(kids, kids[1:]):
            if not (type(a) is nn.Conv2d and isinstance(b, nn.BatchNorm2d) and b.running_mean is not None
                    and a.out_channels == b.num_features):
                continue
            cls = type(b).__name__
            if type(b) is nn.BatchNorm2d:
                repl = nn.Identity()
            elif cls == "BatchNormAct2d":
                repl = nn.Sequential(b.drop, b.act)
            else:
                continue
            with torch.no_grad():
                w, bias = fold_bn(a.weight, a.bias, b.weight, b.bias, b.running_mean, b.running_var, b.eps)
                a.weight.copy_(w.to(a.weight.dtype))
                if a.bias is None:
                    a.bias = nn.Parameter(bias.to(a.weight.dtype))
                else:
                    a.bias.copy_(bias.to(a.weight.dtype))
            setattr(parent, bname, repl)
            folded += 1
    return model, folded, total


def _kill_group(p: subprocess.Popen):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        try:
            p.kill()
        except OSError:
            pass


def _pytest_counts(output: str) -> dict:
    """Counts from pytest's final line, or from the per-test lines of a run that was cut short."""
    keys = {"passed": "passed", "failed": "failed", "error": "errors", "errors": "errors", "skipped": "skipped",
            "xfailed": "xfailed", "xpassed": "xpassed", "deselected": "deselected"}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0, "xpassed": 0, "deselected": 0}
    final = [ln for ln in output.splitlines() if re.match(r"^=+ .*\b(passed|failed|error|errors|skipped|deselected|"
                                                           r"no tests ran)\b.* in [\d.]+s", ln)]
    if final:
        for n, k in re.findall(r"(\d+) (passed|failed|errors|error|skipped|xfailed|xpassed|deselected)", final[-1]):
            counts[keys[k]] += int(n)
        counts["complete"] = True
        return counts
    for k, word in (("passed", "PASSED"), ("failed", "FAILED"), ("errors", "ERROR"), ("skipped", "SKIPPED")):
        counts[k] = len(re.findall(rf"(?:::\S+ {word}\b|\] {word} tests/)", output))
    counts["complete"] = False
    return counts


def _fmt_csv(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def _fmt_ms(v):
    return "-" if v is None else f"{v:.4f}"


def _fmt_e(v):
    return "-" if v is None else f"{v:.2e}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=None,
                   help="overall deadline in seconds (default 450; 150 for --dry-run); cases that would not fit are skipped")
    p.add_argument("--out", default=None, help="write every file to this folder only")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny problems: checks the script itself, no GPU needed")
    p.add_argument("--max-autotune", action="store_true",
                   help="only torch.compile max-autotune + freezing (OSA blocks, whole VoVNet-39) with eager / effops")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list out of {','.join(STAGES)} (default: all)")
    p.add_argument("--grace", type=float, default=25.0, help="seconds past the budget before the run is cut off")
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = set(args.stages) - set(STAGES)
    if bad:
        p.error(f"unknown stages {sorted(bad)}; choose from {','.join(STAGES)}")
    if args.budget is None:
        args.budget = 150.0 if args.dry_run else 450.0

    import torch

    if not torch.cuda.is_available():
        if not args.dry_run:
            print("gpu_check.py: no CUDA device here; use --dry-run to check the script on a CPU", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before effops is imported: kernels run on CPU tensors
    if args.dry_run:
        torch.set_num_threads(1)  # tiny problems: threads only add contention on a small, shared machine

    check = Check(args)
    check.watchdog(args.grace)
    try:
        return check.run()
    except Exception:  # noqa: BLE001 - the script itself broke: say so, keep what was measured
        check.log("gpu_check.py broke:\n" + traceback.format_exc())
        check.done = True
        try:
            check.flush(final=False)
        except Exception:  # noqa: BLE001
            pass
        return 3
    finally:
        check.done = True
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
