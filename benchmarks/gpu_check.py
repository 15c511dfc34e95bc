"""Every GPU measurement of effops in one command, sized for one short GPU call.

    python benchmarks/gpu_check.py                   # at most 8 min on a GPU; all stages below
    python benchmarks/gpu_check.py --stages fusions,shuffle,se,fusion_models   # stages 2 and 7-9: the fusions' targets
    python benchmarks/gpu_check.py --max-autotune    # a second call: torch.compile max-autotune + freezing
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc   # the same code path on a CPU, tiny problems
    python benchmarks/gpu_check.py --budget 300 --stages conv,osa

Stages, most important first; each gets a share of the overall budget (``--budget``,
default 450 s, counted from the script's start; nominal shares in ``SHARES``) plus whatever
earlier stages left unused, and a case that would not fit (its estimate: the longest case of
its kind so far, or a conservative first guess, ``Check.estimate``) is recorded as skipped,
with the reason, instead of run. A case that overruns anyway is cut
off ``--grace`` (25) s after the budget: the files are written with a ``cut off`` row and
the script exits, so the whole run stays within 8 minutes (give the call 500 s or more):

1. ``tests``: a pytest subset in a subprocess (at most 2 minutes) that launches every
   kernel family on the GPU at least once: conv 1x1 / 3x3 / strided / dilated / grouped /
   depthwise, fp16 / bf16 / fp32, the TMA conv kernel (sm_90), the OSA aggregation (flat,
   eSE, identity), the fused depthwise + pointwise kernel, FusedOSA and FusedConvBNAct
   modules, a traced fusion, torch.compile over a FusedOSA, and the int64 address paths
   (the SE, gated-conv, shuffled-write and channel-shuffle kernels' included).
   The tests run with ``EFFOPS_AUTOTUNE=0`` (heuristic tiles), as everywhere.
2. ``fusions``: the numerics of the newer kernels on the device, in a subprocess (a kernel
   that faults can't take the CUDA context of the later stages with it; after a fault the
   effops providers of stages 7-9 are skipped, with that reason), ``EFFOPS_AUTOTUNE=0``:
   ``effops.se_gate``, ``effops.se_apply`` (+ residual + ReLU), ``SqueezeExcite.forward_residual``
   (fp16 / bf16 / fp32), the conv kernel's ``gate=`` and ``out_shuffle_groups=``,
   ``effops.channel_shuffle`` (bit-exact), the traced ELAN block (its concat → 1x1 as one
   N-segment aggregation), ``FusedGhostModule``, ``FusedShuffleV2Block`` (stride 1 and 2) and
   ``FusedRepVGGBlock`` (when effops/ops/reparam.py exists), each on the triton backend against
   the PyTorch expression run in float64 on the same values, by benchmarks/_numerics.py's rule
   (fp32 results: relative error <= 1e-5; fp16/bf16: <= 2x eager PyTorch's own same-dtype
   error + eps). A case that fails or mismatches fails the run (exit status 1).
3. ``conv``: conv+BN+ReLU on the VoVNet-39 shapes of ``benchmarks/test_conv_bn_act.py``,
   batch 32, fp16, channels_last: eager (Conv2d -> BatchNorm2d -> ReLU modules), eager with
   BN folded (``F.conv2d`` with folded weight and bias, then in-place ReLU), cuDNN's fused
   ``torch.cudnn_convolution_relu`` on the folded weights, torch.compile (default), effops.
4. ``osa``: the VoVNet-39 OSA blocks of ``benchmarks/test_osa.py``, batch 32, fp16: eager,
   effops (FusedOSA), torch.compile (default), effops + torch.compile, with peak memory.
5. ``models``: whole VoVNet-39 (classic modules vs ``effops.optimize``), timm
   ``ese_vovnet39b`` (when timm is installed), torchvision ResNet-50 and MobileNetV2
   (random weights), batch 32, fp16, 224x224, channels_last: eager, eager with BN folded
   into the convs, effops, torch.compile (default), effops + torch.compile; peak memory.
6. ``graphs``: the same models at batch 1: eager and effops plain and replayed from a
   captured CUDA graph (captured after warm-up calls, so effops' tiles are tuned first),
   and torch.compile(mode="reduce-overhead") of both.
7. ``shuffle``: the standalone channel shuffle (g=2, NHWC) at the ShuffleNetV2 x1.0 shapes of
   ``benchmarks/test_shufflenet.py``, batch 32, fp16: a plain ``dst.copy_(x)`` of the same
   tensor, eager (view -> transpose -> reshape), ``torch.channel_shuffle``, effops; GB/s
   (bytes read + written once). Target: effops >= 80% of the copy's GB/s.
8. ``se``: SE + residual + ReLU (timm ``SEModule``, ``relu(se(x) + shortcut)``) at the ResNet-RS
   stage shapes of ``benchmarks/test_se.py``, batch 32, fp16, NHWC: eager, effops
   (``SqueezeExcite.forward_residual``), torch.compile (default); GB/s and % of the bandwidth
   roofline (that file's byte count; the peak is the 512 MiB copy measured at the start).
   Targets: effops >= 70% of the roofline and >= 2x eager.
9. ``fusion_models``: whole ResNet-RS-50 (timm ``resnetrs50``; without timm
   ``effops.models.resnet_rs(50)``, its SE run as plain modules for eager), torchvision
   ShuffleNetV2 x1.0 and timm GhostNet-100, batch 32, fp16, 224x224, channels_last: eager, effops, then
   torch.compile (default), then torch.compile max-autotune + freezing where the time left
   fits its estimate (in a full run it doesn't: the row says so, and the target compares with
   the default mode, labelled as such). Targets: effops >= 1.5x eager and >= torch.compile.

The summary ends with the targets of stages 2 and 7-9, each stated with the measured value
and whether it was met (``json["targets"]``, and the ``target`` column of the row it rests
on). Targets are performance goals: a missed one is reported, not an error.
In a full run stages 7-9 have 115 s of nominal share: stages 7 and 8 (most torch.compile rows
of stage 8 skipped for time) and, in stage 9, eager of the three models and effops of the first
(a network's first effops call tunes all its conv problems: estimated at a minute each) but no
torch.compile.
``--stages fusions,shuffle,se,fusion_models`` runs only stages 2 and 7-9 in the same budget:
stage 9 then gets about 330 s, for effops and torch.compile (default) of the three models as far
as they fit; max-autotune, estimated at 4 minutes a model, runs only if it still fits.

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

``--dry-run`` (no GPU needed; about 45 s on 2 cores, budget 150 s): the same stages
and code on the CPU with tiny problems (channels / 16, small maps, batch 1-2, 32x32
models, float32, one thread, 2 timing repetitions);
stage 1 checks that every selected test id exists and runs two of them; effops runs its
Triton kernels under the interpreter (``TRITON_INTERPRET=1``) in stages 2-4 and 7-8 and its
reference backend for whole models (the interpreter would take minutes); torch.compile
uses dynamo's ``eager`` backend (no inductor code generation) on each stage's first case
(stage 9's max-autotune rows are skipped). Stage 2 runs in its subprocess as on a GPU.
The targets are evaluated on those CPU numbers too (plumbing only: they say nothing about a GPU).

Exit status: 0 when every check passed (cases skipped for time included); 1 when a
correctness check failed (a failing test in stage 1, a stage-2 case that failed or
mismatched, or an effops row marked MISMATCH):
the results are written all the same; 2 for bad arguments (e.g. no GPU without
``--dry-run``); 3 when the script itself broke.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
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

STAGES = ["tests", "fusions", "conv", "osa", "models", "graphs", "shuffle", "se", "fusion_models"]
# Nominal share of the budget of each stage (seconds out of 450); scaled to --budget. Estimates behind
# the new stages' shares (H100, cold Triton and inductor caches, conservative): fusions 8-10 s of
# subprocess start-up plus ~30 kernel variants compiled at 1-2 s each; shuffle 3 shapes x 4 cheap
# providers plus the shuffle tiles' tuning; se 4 shapes x (eager + effops: pool / excitation / apply
# tiles tuned on the first shape, ~20 s), its torch.compile rows only if time is left; fusion_models
# 3 x (build + optimize + fp32 reference + eager ~10 s, effops up to ~60 s: every conv problem of a
# new network tuned), torch.compile ~60 s a model and max-autotune ~240 s only if time is left.
# Stages 1 and 3-6 keep 290 s: their cheap providers fit it, and their torch.compile rows (run last
# in each stage) are what gets skipped for time first.
SHARES = {"tests": 95, "fusions": 45, "conv": 45, "osa": 50, "models": 75, "graphs": 25, "shuffle": 15, "se": 30,
          "fusion_models": 70, "max_autotune": 450}
TITLES = {
    "tests": "1. correctness: pytest subset on the device",
    "fusions": "2. correctness of the newer kernels on the device (subprocess, fp64 rule)",
    "conv": "3. conv+BN+ReLU, VoVNet-39 shapes",
    "osa": "4. VoVNet-39 OSA blocks",
    "models": "5. whole models",
    "graphs": "6. whole models at batch 1: CUDA graphs, reduce-overhead",
    "shuffle": "7. standalone channel shuffle vs a plain copy",
    "se": "8. SE + residual + ReLU, ResNet-RS stage shapes",
    "fusion_models": "9. whole ResNet-RS-50, ShuffleNetV2 x1.0, GhostNet-100",
    "max_autotune": "torch.compile max-autotune + freezing",
}
# The GPU targets of the newer fusions (checked in the summary; a miss is reported, not an error)
TARGET_SHUFFLE_VS_COPY_PCT = 80.0
TARGET_SE_ROOFLINE_PCT = 70.0
TARGET_SE_SPEEDUP = 2.0
TARGET_MODEL_SPEEDUP = 1.5
# Cheapest first-call tuning first: in a full run stage 5's ResNet-50 has compiled ResNet-RS-50's conv variants
# and stage 8 its SE kernels; ShuffleNetV2's shuffled writes and GhostNet's gated and depthwise convs are new.
FUSION_MODELS = ["resnetrs50", "shufflenet_v2_x1_0", "ghostnet_100"]
# Errors that mean the CUDA context of the process is gone (every later CUDA call fails)
CUDA_FAULT = re.compile(r"CUDA error|illegal memory access|misaligned address|device-side assert|unspecified launch "
                        r"failure|illegal instruction", re.I)
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
    # the newer kernels' int64 address paths and the TMA kernel's shuffled write (their numerics
    # at ordinary sizes: stage 2)
    "tests/test_se.py::test_int64_addressing",
    "tests/test_conv_gate.py::test_gated_int64_addressing_path[1x1]",
    "tests/test_conv_gate.py::test_gated_conv_on_views_past_2_31_elements",
    "tests/test_conv_shuffled_write.py::test_shuffled_int64_addressing_path[3x3_g3]",
    "tests/test_conv_shuffled_write.py::test_shuffled_write_into_views_past_2_31_elements",
    "tests/test_conv_shuffled_write.py::test_tma_kernel_writes_shuffled",
    "tests/test_shuffle.py::test_int64_addressing",
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
           "seconds", "timing", "note", "error", "gbps", "eager_rel_err", "target"]


class Skip(Exception):
    """A case that can't run here (missing package, no CUDA...): recorded as skipped with its reason."""


def _bench_module(name: str):
    """``benchmarks/<name>.py`` imported, for its shape lists and builders; :class:`Skip` (with the
    reason) when it can't be: those files ``pytest.importorskip`` timm / torchvision, which raises
    pytest's ``Skipped``, a BaseException, outside of pytest too."""
    import importlib

    try:
        return importlib.import_module(name)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001
        raise Skip(f"benchmarks/{name}.py can't be imported here ({_short(e)})") from None


_PLAIN_SE: dict = {}


def _plain_se(model) -> int:
    """Make ``model``'s effops ``SqueezeExcite`` modules run their children (``forward_unfused``, the
    torch.nn computation) in eval too: the eager baseline of ``effops.models.resnet_rs``. Returns how many."""
    if "cls" not in _PLAIN_SE:
        from effops.nn.se import SqueezeExcite

        class PlainSqueezeExcite(SqueezeExcite):
            def forward(self, x):
                return self.forward_unfused(x)
        _PLAIN_SE["cls"] = PlainSqueezeExcite
        _PLAIN_SE["base"] = SqueezeExcite
    n = 0
    for m in model.modules():
        if type(m) is _PLAIN_SE["base"]:
            m.__class__ = _PLAIN_SE["cls"]
            n += 1
    return n


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
        self.fusions_fault: Optional[str] = None  # a CUDA fault in stage 2's subprocess: no effops in stages 7-9
        self.ops_seen: List[str] = []  # effops ops a stage-2 case dispatched

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
                   "complete": final and not self.cut_off, "cut_off": self.cut_off, "rows": rows,
                   "targets": [{k: v for k, v in t.items() if k != "row"} for t in self.targets(rows)]}
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
            if r["provider"].startswith("effops") and r.get("rel_err") is not None and r["status"] == "ok" \
                    and not r.get("numerics"):  # stage 2 and bit-exact checks set their own verdict
                if r.get("dtype") in eps:
                    base = e.get("rel_err") if e else None
                    if base is not None:
                        r["numerics"] = "ok" if r["rel_err"] <= 2 * base + eps[r["dtype"]] else "MISMATCH"
                else:
                    r["numerics"] = "ok" if r["rel_err"] <= 1e-4 else "MISMATCH"
            out.append(r)
        for t in self.targets(out):
            if t.get("row") is not None:
                r = out[t["row"]]
                r["target"] = "; ".join(x for x in (r.get("target"), f"{t['target']}: {t['status']} ({t['value']})") if x)
        return out

    # ---------------------------------------------------------------- targets
    def targets(self, rows) -> List[dict]:
        """The GPU targets of the newer fusions, from the rendered rows: one entry per target
        and case, ``{"stage", "target", "case", "value", "status": met / NOT met / not measured,
        "row": index of the row it rests on}``. Only for the stages this run selected."""
        stages = getattr(self, "stages", None) or []
        at = {(r["stage"], r["case"], r["provider"]): (i, r) for i, r in enumerate(rows)}
        # a row a target can rest on: measured, and (effops) not a numerics MISMATCH: a wrong answer meets nothing
        ok = lambda key: (at.get(key, (None, {}))[1].get("status") == "ok"  # noqa: E731
                          and at[key][1].get("numerics") != "MISMATCH")
        out: List[dict] = []

        def add(stage, target, case, value, met, row=None, why=""):
            status = "not measured" if met is None else ("met" if met else "NOT met")
            out.append({"stage": stage, "target": target, "case": case, "value": value if met is not None else why,
                        "status": status, "row": row})

        def why_not(*keys):
            """Why the rows a target needs are missing: each one that is not ok, with its reason."""
            parts = []
            for key in keys:
                r = at.get(key, (None, None))[1]
                if r is None:
                    parts.append(f"{key[2]}: no row")
                elif r["status"] != "ok":
                    parts.append(f"{key[2]} {r['status']}: {r.get('error') or r.get('note') or ''}".strip().rstrip(":"))
                elif r.get("numerics") == "MISMATCH":
                    parts.append(f"{key[2]} numerics MISMATCH")
            return "; ".join(parts) or "not measured"

        if "fusions" in stages:
            frows = [r for r in rows if r["stage"] == "fusions" and r["provider"] == "effops"]
            bad = [r["case"] for r in frows if r["status"] == "failed" or r.get("numerics") == "MISMATCH"]
            good = [r for r in frows if r["status"] == "ok" and r.get("numerics") == "ok"]
            skipped = [r for r in frows if r["status"] == "skipped"]
            value = f"{len(good)} of {len(frows)} cases ok" + (f", {len(skipped)} skipped" if skipped else "") + \
                (f"; failed or MISMATCH: {', '.join(bad)}" if bad else "")
            add("fusions", "newer kernels match the fp64 reference (_numerics.py rule)", "all cases", value,
                None if not frows or (not good and not bad) else not bad, why="no case ran")
        if "shuffle" in stages:
            for case in dict.fromkeys(r["case"] for r in rows if r["stage"] == "shuffle" and r["provider"] != "-"):
                ke, kc = ("shuffle", case, "effops"), ("shuffle", case, "copy")
                if ok(ke) and ok(kc) and at[ke][1].get("ms") and at[kc][1].get("ms"):
                    pct = 100 * at[kc][1]["ms"] / at[ke][1]["ms"]
                    add("shuffle", f"channel shuffle GB/s >= {TARGET_SHUFFLE_VS_COPY_PCT:.0f}% of a plain copy's", case,
                        f"{pct:.0f}% ({at[ke][1].get('gbps') or 0:.4g} vs {at[kc][1].get('gbps') or 0:.4g} GB/s)",
                        pct >= TARGET_SHUFFLE_VS_COPY_PCT, at[ke][0])
                else:
                    add("shuffle", f"channel shuffle GB/s >= {TARGET_SHUFFLE_VS_COPY_PCT:.0f}% of a plain copy's", case,
                        None, None, why=why_not(ke, kc))
        if "se" in stages:
            for case in dict.fromkeys(r["case"] for r in rows if r["stage"] == "se" and r["provider"] != "-"):
                ke = ("se", case, "effops")
                e = at.get(ke, (None, {}))[1]
                t_roof = f"SE + residual + ReLU >= {TARGET_SE_ROOFLINE_PCT:.0f}% of the bandwidth roofline"
                t_speed = f"SE + residual + ReLU >= {TARGET_SE_SPEEDUP:g}x eager"
                if ok(ke) and e.get("pct_roofline") is not None:
                    add("se", t_roof, case, f"{e['pct_roofline']:.0f}% ({e.get('gbps') or 0:.4g} GB/s)",
                        e["pct_roofline"] >= TARGET_SE_ROOFLINE_PCT, at[ke][0])
                else:
                    add("se", t_roof, case, None, None,
                        why=(self.meta.get("peaks_error") or "no measured bandwidth peak (CPU)") if ok(ke) else why_not(ke))
                if ok(ke) and e.get("speedup_vs_eager") is not None:
                    add("se", t_speed, case, f"{e['speedup_vs_eager']:.2f}x", e["speedup_vs_eager"] >= TARGET_SE_SPEEDUP,
                        at[ke][0])
                else:
                    add("se", t_speed, case, None, None, why=why_not(ke, ("se", case, "eager")))
        if "fusion_models" in stages:
            for case in dict.fromkeys(r["case"] for r in rows if r["stage"] == "fusion_models" and r["provider"] != "-"):
                ke = ("fusion_models", case, "effops")
                e = at.get(ke, (None, {}))[1]
                t_speed = f"whole model >= {TARGET_MODEL_SPEEDUP:g}x eager"
                if ok(ke) and e.get("speedup_vs_eager") is not None:
                    add("fusion_models", t_speed, case, f"{e['speedup_vs_eager']:.2f}x",
                        e["speedup_vs_eager"] >= TARGET_MODEL_SPEEDUP, at[ke][0])
                else:
                    add("fusion_models", t_speed, case, None, None, why=why_not(ke, ("fusion_models", case, "eager")))
                # against the strongest torch.compile measured: max-autotune if it ran, else the default mode
                comp = next((p for p in ("compile_max_autotune_freezing", "compile_default")
                             if ok(("fusion_models", case, p)) and at[("fusion_models", case, p)][1].get("ms")), None)
                if ok(ke) and e.get("ms") and comp:
                    cms = at[("fusion_models", case, comp)][1]["ms"]
                    label = "max-autotune + freezing" if comp.startswith("compile_max") else \
                        "default mode (max-autotune not measured)"
                    add("fusion_models", "whole model >= torch.compile", case,
                        f"effops {e['ms']:.3f} ms vs {cms:.3f} ms ({cms / e['ms']:.2f}x) of torch.compile {label}",
                        e["ms"] <= cms, at[ke][0])
                else:
                    add("fusion_models", "whole model >= torch.compile", case, None, None,
                        why=why_not(ke, ("fusion_models", case, "compile_default")))
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
            if s == "fusions":
                lines += self.fusions_table(srows, f)
                for r in srows:
                    if r["status"] == "failed" or r.get("numerics") == "MISMATCH":
                        problems.append(f"- {s} {r['case']}: {r.get('error') or r.get('note') or 'numerics MISMATCH'}")
                    elif r["status"] == "skipped":
                        problems.append(f"- {s} {r['case']}: skipped ({r.get('note', '')})")
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
        targets = self.targets(rows)
        if targets:
            lines += ["## Targets of the newer fusions" + (" (dry run: CPU timings of tiny problems — the verdicts "
                                                          "only exercise the plumbing)" if self.dry else ""), ""]
            groups: Dict[tuple, list] = {}
            for t in targets:
                groups.setdefault((t["stage"], t["target"]), []).append(t)
            for (stage, target), ts in groups.items():
                st = {t["status"] for t in ts}
                overall = ("NOT met" if "NOT met" in st else "met" if st == {"met"} else
                           "not measured" if st == {"not measured"} else "met where measured")
                lines.append(f"- **{overall}** — {target} (stage {TITLES[stage].split('.')[0]}): " + "; ".join(
                    (f"{t['case']} " if t["case"] != "all cases" else "") + f"{t['value']}"
                    + (f" ({t['status']})" if len(ts) > 1 or t["status"] == "not measured" else "") for t in ts))
            lines.append("")
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

    def fusions_table(self, srows, f) -> List[str]:
        """Stage 2's rows: one line per case, effops' error against fp64 next to eager PyTorch's own."""
        if not srows:
            return ["(no rows)", ""]
        lines = ["| case | dtype | shape | effops rel err vs fp64 | eager's (same dtype) | verdict |",
                 "|---|---|---|---:|---:|---|"]
        for r in srows:
            verdict = r.get("numerics") or {"ok": "-", "skipped": "skip", "failed": "FAIL"}.get(r["status"], r["status"])
            lines.append(f"| {r['case']} | {r.get('dtype', '')} | {r.get('shape', '')} | {f(r.get('rel_err'), '.1e')} | "
                         f"{f(r.get('eager_rel_err'), '.1e')} | {verdict} |")
        return lines + [""]

    @staticmethod
    def fusions_failures(rows) -> List[str]:
        """Stage 2 cases that raised (a kernel that doesn't build or run on this device is a correctness failure)."""
        return [r["case"] for r in rows if r["stage"] == "fusions" and r["status"] == "failed"]

    def verdict(self, rows) -> str:
        bad = []
        t = self.tests_info
        if t.get("failed") or t.get("errors"):
            bad.append(f"{t.get('failed', 0)} test(s) failed, {t.get('errors', 0)} error(s)")
        fails = self.fusions_failures(rows)
        if fails:
            bad.append("stage 2 case(s) failed: " + ", ".join(fails))
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
        return 1 if (t.get("failed") or t.get("errors") or any(r.get("numerics") == "MISMATCH" for r in rows)
                     or self.fusions_failures(rows)) else 0

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
        if self.stage not in ("tests", "fusions"):
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
        # The newer stages have kinds of their own: "effops" jobs of earlier stages include cold conv
        # compiles that say nothing about these. numerics: one stage-2 case, its kernels compiled cold;
        # shuffle_effops / se_effops: the first shape, its tiles compiled and tuned (se: pool, excitation
        # and apply), se_effops_warm: a later shape (new problem keys, kernels already compiled);
        # model_effops: every conv problem of a network no earlier stage ran, ~15 tiles per new
        # kernel specialisation (shuffled writes, gated loads, channel sums) compiled and timed.
        gpu = {"cheap": 4, "effops": 10, "compile": 15, "compile_osa": 20, "compile_model": 60,
               "ma_block": 120, "ma_model": 240, "model_setup": 5, "graph": 5,
               "numerics": 10, "shuffle_effops": 8, "se_effops": 20, "se_effops_warm": 5, "model_effops": 60}
        cpu = {"cheap": 1, "effops": 2, "compile": 3, "compile_osa": 3, "compile_model": 6,
               "ma_block": 3, "ma_model": 6, "model_setup": 2, "graph": 1,
               "numerics": 2, "shuffle_effops": 1, "se_effops": 2, "se_effops_warm": 1, "model_effops": 3}
        # the longest job of the same kind so far, once there is one (the first pays for warm-up: conservative);
        # a whole network's first effops call compiles kernel variants of its own: never below the first guess
        first_guess = (cpu if self.dry else gpu).get(kind, 5)
        if kind == "model_effops":
            return max(first_guess, self.observed.get(kind, 0.0))
        return self.observed.get(kind, first_guess)

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

    def measure(self, fn, ref, *, flops=None, min_bytes=None, memory=False, output=None, timing=None,
                exact=False) -> dict:
        """First call (compiles / tunes), error against ``ref`` (None: not compared, e.g. the copy a
        permutation is measured against; ``exact``: the numerics verdict is bit equality), median time,
        GB/s of ``min_bytes``, optional peak memory."""
        from effops.benchmark import peak_memory_mb, roofline_ms, time_ms

        t0 = time.monotonic()
        out = fn()
        self.sync()
        first = time.monotonic() - t0
        res = {"first_call_s": first}
        if ref is not None:
            got = output() if output else out
            res.update(self.compare(got, ref))
            if exact:
                got = got[0] if isinstance(got, (tuple, list)) else got
                res["numerics"] = "ok" if self.torch.equal(got, ref) else "MISMATCH"
        del out
        res["ms"] = time_ms(fn, self.dev, cpu_iters=2 if self.dry else 10)
        res["timing"] = timing or ("do_bench median" if self.cuda else "cpu wall-clock median")
        if min_bytes:
            res["gbps"] = min_bytes / res["ms"] / 1e6
        if flops:
            res["tflops"] = flops / res["ms"] / 1e9
        if (flops or min_bytes) and self.peaks:
            res["pct_roofline"] = 100 * roofline_ms(flops or 0, min_bytes or 0, self.peaks) / res["ms"]
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
        # (hypothesis' plugin, when installed, costs a second of start-up per process and no test uses it)
        cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
               "--no-header", "-o", "console_output_style=classic"]
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
        if name in ("resnet50", "mobilenet_v2", "shufflenet_v2_x1_0"):
            try:
                import torchvision
            except ImportError as e:
                raise Skip(f"torchvision not installed ({e})")
            return getattr(torchvision.models, name)(weights=None)
        try:
            import timm
        except ImportError as e:
            if name == "resnetrs50":  # effops' own ResNet-RS (timm's layout and keys); eager runs its SE unfused
                from effops.models import resnet_rs

                return resnet_rs(50)
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
        eager_note = ""
        if _plain_se(model) + _plain_se(model32):  # a model built with effops' SE: eager computes it with torch.nn
            eager_note = "effops.models.resnet_rs(50) (timm not installed); its SqueezeExcite modules run unfused"
        rep = fast.effops_report
        folded, n_folded, n_bn = fold_batchnorms(copy.deepcopy(model32))
        folded = folded.to(self.dev, self.dtype).to(memory_format=torch.channels_last)
        return dict(model=model, model32=model32, fast=fast, folded=folded, eager_note=eager_note,
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

    # ---------------------------------------------------------------- stage 2 (newer kernels' numerics)
    @contextlib.contextmanager
    def kernels(self):
        """The context effops' side of a stage-2 case runs in: the triton backend (the interpreter on the
        dry run), so that a case checks the kernels, not a fallback; the ops it dispatches are recorded
        in ``self.ops_seen`` (``effops.dispatch.run`` wrapped, as tests/helpers.py's count_dispatch does)."""
        import effops
        from effops import dispatch

        run = dispatch.run

        def recording(op, *a, **k):
            self.ops_seen.append(op)
            return run(op, *a, **k)
        dispatch.run = recording
        try:
            with effops.use_backend("triton"):
                yield
        finally:
            dispatch.run = run

    def numerics_case(self, fn, exact: bool, needs_op: Optional[str] = None) -> dict:
        """Run one stage-2 case and judge it; the row's note lists the effops ops it ran on the device."""
        self.ops_seen = []
        out, ref64, eager = fn()
        ops = collections.Counter(self.ops_seen)
        if not ops:
            raise RuntimeError("no effops op ran: the case never reached a kernel")
        if needs_op and needs_op not in ops:
            raise RuntimeError(f"effops.{needs_op} never ran (ops: {dict(ops)})")
        res = self.numerics(out, ref64, eager, exact=exact)
        listed = "effops ops: " + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in ops.items())
        res["note"] = "; ".join(x for x in (res.get("note"), listed) if x)
        return res

    def numerics(self, out, ref64, eager, exact: bool = False) -> dict:
        """benchmarks/_numerics.py's rule for one stage-2 case (``exact``: also bit-equal to eager, for
        permutations); the errors and the verdict for the row."""
        from _numerics import check_numerics, rel_err

        res = {}
        try:
            res["rel_err"], res["eager_rel_err"] = rel_err(out, ref64), rel_err(eager, ref64)
            d = out.detach().double().cpu() - ref64.detach().double().cpu()
            res["max_abs_err"] = d.abs().max().item() if d.numel() else 0.0
            check_numerics(out, ref64, eager)
            if exact and not self.torch.equal(out, eager):
                raise AssertionError("not bit-equal to PyTorch's result (a permutation must be exact)")
            res["numerics"] = "ok"
        except AssertionError as e:
            res["numerics"] = "MISMATCH"
            res["note"] = str(e)[:300]
        return res

    def fusion_cases(self) -> List[tuple]:
        """Stage 2's cases, most important first: ``(case, dtype, shape, batch, fn, exact, needs_op)`` with ``fn()``
        returning ``(effops output, float64 reference, eager PyTorch in the same dtype)``. Shapes: layers of
        the benchmarked networks at small batch (CUDA) or tiny (dry run); builders from benchmarks/test_*.py."""
        torch = self.torch
        import torch.nn.functional as F

        import effops
        from effops.benchmark import randomize_bn
        from effops.ops.conv import conv_bn_act

        from _numerics import fp64_reference

        dev, dry, cl = self.dev, self.dry, torch.channels_last
        main = self.dtype
        cases: List[tuple] = []

        def tensor(shape, dtype, layout):
            t = torch.randn(*shape, device=dev).to(dtype)
            return t.contiguous(memory_format=cl) if layout == "nhwc" else t.contiguous()

        def add(name, dtype, layout, shape, fn, exact=False, needs_op=None):
            case = f"{name} [{str(dtype).replace('torch.', '')}, {layout}]"
            shape = "x".join(str(v) for v in shape) if isinstance(shape, tuple) else shape
            cases.append((case, dtype, shape, int(re.match(r"\d+", shape).group()), fn, exact, needs_op))

        def module_case(build, convert, shape, dtype, layout):
            """The original module (BN statistics randomised) against ``convert(module)`` on one input."""
            model = randomize_bn(build()).eval().to(dev, dtype)
            if layout == "nhwc":
                model = model.to(memory_format=cl)
            fast = convert(model)
            x = tensor(shape, dtype, layout)
            ref64, eager = fp64_reference(model, x), model(x)
            with self.kernels():
                out = fast(x)
            return out, ref64, eager

        # -- squeeze-excite ops and module (ResNet-RS / SE-ResNet tail; timm SEModule weights of test_se.py)
        n, c, hw = (2, 32, 4) if dry else (4, 256, 14)

        def se_gate_case(dtype=main, layout="nhwc"):
            t = _bench_module("test_se")
            se = t._se_module(c, dtype).to(dev)
            x = tensor((n, c, hw, hw), dtype, layout)

            def torch_gate(v, m):
                return m.gate(m.fc2(m.act(m.bn(m.fc1(v.mean((2, 3), keepdim=True)))))).flatten(1)
            # effops' gate is float32 (computed in fp32 from x's exact values): the fp32 rule applies;
            # PyTorch's own gate (in x's dtype, widened exactly) is reported beside it
            ref64, eager = torch_gate(x.double(), copy.deepcopy(se).double()), torch_gate(x, se).float()
            with self.kernels():
                out = effops.se_gate(x, se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias, act="relu",
                                     gate="sigmoid")
            return out, ref64, eager

        def se_apply_case(dtype=main, layout="nhwc"):
            x, res = tensor((n, c, hw, hw), dtype, layout), tensor((n, c, hw, hw), dtype, layout)
            g = torch.rand(n, c, device=dev)
            ref64 = torch.relu(x.double() * g.double()[:, :, None, None] + res.double())
            eager = torch.relu(x * g.to(dtype)[:, :, None, None] + res)  # an SE module's gate is in x's dtype
            with self.kernels():
                out = effops.se_apply(x, g, res, act="relu")
            return out, ref64, eager

        def se_module_case(dtype=main, layout="nhwc"):
            from effops.nn.se import SqueezeExcite

            t = _bench_module("test_se")
            _, sc, shw = next((s for s in t.SHAPES if s[0] == "s4"), t.SHAPES[-1])
            sc, shw = (64, 2) if dry else (sc, shw)
            se = t._se_module(sc, dtype).to(dev)
            x, shortcut = tensor((2, sc, shw, shw), dtype, layout), tensor((2, sc, shw, shw), dtype, layout)
            model = t._SEResidualReLU(se, shortcut).eval()
            fast = SqueezeExcite.from_module(copy.deepcopy(se)).eval()
            ref64, eager = fp64_reference(model, x), model(x)
            with self.kernels():
                out = fast.forward_residual(x, shortcut, "relu")
            return out, ref64, eager

        add("effops.se_gate (SE pool + excitation)", main, "nhwc", (n, c, hw, hw), se_gate_case)
        add("effops.se_apply + residual + relu", main, "nhwc", (n, c, hw, hw), se_apply_case)
        add("SqueezeExcite.forward_residual (SE + residual + relu)", main, "nhwc",
            "2x64x2x2" if dry else "2x1024x14x14", se_module_case)

        # -- channel shuffle (exact), the conv kernel's gate= and out_shuffle_groups=
        def shuffle_case(cc, shw, g, dtype=main, layout="nhwc"):
            def fn():
                tsh = _bench_module("test_shufflenet")
                x = tensor((n, cc, shw, shw), dtype, layout)
                eager = tsh._view_transpose_reshape(x, g)
                with self.kernels():
                    out = effops.channel_shuffle(x, g)
                return out, eager.double(), eager
            return fn

        sh = [(12, 4, 2, "nhwc"), (16, 3, 4, "nchw")] if dry else [(116, 28, 2, "nhwc"), (232, 14, 4, "nchw")]
        for cc, shw, g, layout in sh:
            add(f"effops.channel_shuffle g={g}", main, layout, (n, cc, shw, shw), shuffle_case(cc, shw, g, main, layout),
                exact=True)

        def conv_gate_case(dtype=main, layout="nhwc"):
            # an inverted residual's project conv: SE gate on the operand load, BN, + shortcut
            cn, cin, cout, chw = (2, 12, 8, 5) if dry else (4, 96, 32, 14)
            x, res = tensor((cn, cin, chw, chw), dtype, layout), tensor((cn, cout, chw, chw), dtype, layout)
            w = (torch.randn(cout, cin, 1, 1, device=dev) / cin ** 0.5).to(dtype)
            scale, bias, g = torch.rand(cout, device=dev) + 0.5, torch.randn(cout, device=dev), torch.rand(cn, cin, device=dev)

            def torch_conv(x, w, scale, bias, g, res):
                y = F.conv2d(x * g.to(x.dtype)[:, :, None, None], w)
                return y * scale.to(x.dtype).view(1, -1, 1, 1) + bias.to(x.dtype).view(1, -1, 1, 1) + res
            ref64 = torch_conv(*(v.double() for v in (x, w, scale, bias, g, res)))
            eager = torch_conv(x, w, scale, bias, g, res)
            with self.kernels():
                out = conv_bn_act(x, w, scale, bias, res, gate=g)
            return out, ref64, eager

        def conv_shuffle_case(dtype=main, layout="nhwc"):
            tsh = _bench_module("test_shufflenet")
            cn, cc, chw = (2, 12, 4) if dry else (4, 116, 28)
            x = tensor((cn, cc, chw, chw), dtype, layout)
            w = (torch.randn(cc, cc, 1, 1, device=dev) / cc ** 0.5).to(dtype)
            scale, bias = torch.rand(cc, device=dev) + 0.5, torch.randn(cc, device=dev)

            def torch_conv(x, w, scale, bias):
                y = F.conv2d(x, w) * scale.to(x.dtype).view(1, -1, 1, 1) + bias.to(x.dtype).view(1, -1, 1, 1)
                return tsh._view_transpose_reshape(torch.relu(y), 2)
            ref64 = torch_conv(*(v.double() for v in (x, w, scale, bias)))
            eager = torch_conv(x, w, scale, bias)
            with self.kernels():
                out = conv_bn_act(x, w, scale, bias, act="relu", out_shuffle_groups=2)
            return out, ref64, eager

        add("conv_bn_act(gate=) 1x1 + residual", main, "nhwc", "2x12x5x5 -> 8" if dry else "4x96x14x14 -> 32",
            conv_gate_case)
        add("conv_bn_act(out_shuffle_groups=2) 1x1 + relu", main, "nhwc", "2x12x4x4" if dry else "4x116x28x28",
            conv_shuffle_case)

        # -- whole blocks: ShuffleNetV2 units, ghost modules, traced ELAN (aggregation), RepVGG
        def unit_case(want, dry_spec):
            def fn():
                from effops.nn.shufflenet import FusedShuffleV2Block

                tsh = _bench_module("test_shufflenet")
                _, inp, oup, stride, uhw = next((u for u in tsh.UNITS if u[0] == want), tsh.UNITS[0])
                inp, oup, stride, uhw = dry_spec if dry else (inp, oup, stride, uhw)
                return module_case(lambda: tsh.InvertedResidual(inp, oup, stride),
                                   lambda m: FusedShuffleV2Block.from_module(copy.deepcopy(m)).eval(),
                                   (2, inp, uhw, uhw), main, "nhwc")
            return fn

        add("FusedShuffleV2Block stride 1 (tv s3 repeat)", main, "nhwc", "2x16x4x4" if dry else "2x232x14x14",
            unit_case("s3_repeat_s1", (16, 16, 1, 4)))
        add("FusedShuffleV2Block stride 2 (tv s3 first)", main, "nhwc", "2x8x6x6 -> 16" if dry else "2x116x28x28 -> 232",
            unit_case("s3_first_s2", (8, 16, 2, 6)))

        def ghost_case(want, dry_spec):
            def fn():
                from effops.nn.ghost import FusedGhostModule

                tg = _bench_module("test_ghost")
                _, cin, cout, ghw, relu = next((b for b in tg.GHOST if b[0] == want), tg.GHOST[0])
                cin, cout, ghw = dry_spec if dry else (cin, cout, ghw)
                act = torch.nn.ReLU if relu else torch.nn.Identity
                return module_case(lambda: tg.GhostModule(cin, cout, act_layer=act),
                                   lambda m: FusedGhostModule.from_module(copy.deepcopy(m)).eval(),
                                   (2, cin, ghw, ghw), main, "nhwc")
            return fn

        add("FusedGhostModule ghost1 relu (ghostnet b6)", main, "nhwc", "2x10x5x5 -> 23" if dry else "2x80x14x14 -> 184",
            ghost_case("b6.ghost1_80-184_14", (10, 23, 5)))
        add("FusedGhostModule ghost2 no act (ghostnet b6)", main, "nhwc", "2x23x5x5 -> 10" if dry else "2x184x14x14 -> 80",
            ghost_case("b6.ghost2_184-80_14", (23, 10, 5)))

        def elan_case(dtype=main, layout="nhwc"):
            from effops.models.elan import ELAN

            c1, c_, c2, ehw = (8, 4, 8, 6) if dry else (128, 64, 256, 20)
            return module_case(lambda: ELAN(c1, c_, c2), effops.optimize, (2, c1, ehw, ehw), dtype, layout)

        add("traced ELAN (concat -> 1x1 as effops.ops.aggregate)", main, "nhwc",
            "2x8x6x6" if dry else "2x128x20x20 -> 4x64 -> 256", elan_case, needs_op="aggregate")

        def repvgg_case(want, n_img, dry_spec):
            def fn():
                if not (REPO / "effops" / "ops" / "reparam.py").is_file():
                    raise Skip("effops/ops/reparam.py does not exist (no RepVGG merge kernel)")
                from effops.nn.repvgg import FusedRepVGGBlock

                tg = _bench_module("test_ghost")
                _, cin, cout, rhw, stride = next((b for b in tg.REPVGG if b[0] == want), tg.REPVGG[0])
                cin, cout, rhw, stride = dry_spec if dry else (cin, cout, rhw, stride)
                return module_case(lambda: tg.RepVggBlock(cin, cout, stride=stride),
                                   lambda m: FusedRepVGGBlock.from_module(copy.deepcopy(m)).eval(),
                                   (n_img, cin, rhw, rhw), main, "nhwc")
            return fn

        add("FusedRepVGGBlock identity branch (repvgg_a2 s1.1)", main, "nhwc", "2x16x4x4" if dry else "2x192x28x28",
            repvgg_case("s1.1_192_28", 2, (16, 16, 4, 1)))
        add("FusedRepVGGBlock stride 2 (repvgg_a2 s1.0)", main, "nhwc", "1x8x6x6 -> 16" if dry else "1x96x56x56 -> 192",
            repvgg_case("s1.0_96-192_s2_56", 1, (8, 16, 6, 2)))

        # -- the other dtypes and layouts (CUDA only: the dry run is float32)
        if not dry:
            for dtype, layout in ((torch.bfloat16, "nchw"), (torch.float32, "nhwc")):
                add("SqueezeExcite.forward_residual (SE + residual + relu)", dtype, layout, "2x1024x14x14",
                    lambda d=dtype, lay=layout: se_module_case(d, lay))
            add("effops.se_gate (SE pool + excitation)", torch.bfloat16, "nchw", (n, c, hw, hw),
                lambda: se_gate_case(torch.bfloat16, "nchw"))
            add("conv_bn_act(gate=) 1x1 + residual", torch.bfloat16, "nhwc", "4x96x14x14 -> 32",
                lambda: conv_gate_case(torch.bfloat16, "nhwc"))
            add("traced ELAN (concat -> 1x1 as effops.ops.aggregate)", torch.float32, "nhwc", "2x128x20x20 -> 4x64 -> 256",
                lambda: elan_case(torch.float32, "nhwc"), needs_op="aggregate")
        return cases

    def stage_fusions(self):
        what = f"triton backend, EFFOPS_AUTOTUNE=0, {self.meta['dtype']}" + ("" if self.dry else " (+ bf16 / fp32 cases)")
        self.begin_stage("fusions", self.later("fusions"), what)
        if self.args.in_process:
            try:
                cases = self.fusion_cases()
            except Exception as e:  # noqa: BLE001
                self.add({"stage": "fusions", "case": "building the cases", "provider": "effops", "status": "failed",
                          "error": _short(e)})
                cases = []
            for case, dtype, shape, batch, fn, exact, needs_op in cases:
                self.job(case, "effops", "numerics", lambda fn=fn, exact=exact, op=needs_op: self.numerics_case(fn, exact, op),
                         shape=shape, dtype=str(dtype).replace("torch.", ""), batch=batch)
        else:
            self.fusions_subprocess()
        self.end_stage()

    def fusions_subprocess(self):
        """Stage 2 in a child process (this script, ``--in-process --stages fusions``): its rows join ours.
        A CUDA fault there (a signal, or a CUDA error in a row) keeps effops out of stages 7-9 here."""
        limit = max(5.0, min(self.stage_end - time.monotonic(), self.left() - 5))
        tmp = Path(tempfile.mkdtemp(prefix="gpu_check_fusions_"))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--in-process", "--stages", "fusions",
               "--budget", f"{max(3.0, limit - 5):.0f}", "--grace", "3", "--out", str(tmp)]
        if self.dry:
            cmd.append("--dry-run")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
        env.update(EFFOPS_AUTOTUNE="0", PYTHONPATH=os.pathsep.join(
            [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        t0 = time.monotonic()
        self.current = "fusions: subprocess"
        self.log(f"run  stage 2 in a subprocess (limit {limit:.0f} s): {' '.join(cmd[1:])}")
        rows: List[dict] = []
        try:
            with open(tmp / "output.txt", "w") as f:
                self.child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True)
                timed_out = False
                try:
                    rc = self.child.wait(timeout=limit + 5)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_group(self.child)
                    rc = self.child.wait()
                self.child = None
            text = (tmp / "output.txt").read_text(errors="replace")
            self.log("stage-2 subprocess output:\n" + "\n".join("  | " + ln for ln in text.splitlines()[-200:]))
            for doc_path in sorted(tmp.glob("*.json")):
                try:
                    rows = [r for r in json.loads(doc_path.read_text()).get("rows", []) if r.get("stage") == "fusions"]
                except (OSError, ValueError) as e:
                    self.log(f"stage-2 results unreadable: {_short(e)}")
            seconds = time.monotonic() - t0
            self.meta["fusions_subprocess"] = {"rc": rc, "timed_out": timed_out, "limit_s": limit, "seconds": seconds}
            for r in rows:
                r.pop("target", None)
                if r.get("status") == "cut off":  # the child's own deadline: nothing wrong with the kernels
                    r.update(status="skipped", note=f"stage-2 subprocess cut off at its {limit:.0f} s limit")
                self.add(r)
            self.fusions_fault = _fault_of(rc, timed_out, rows)
            if not rows:
                row = {"stage": "fusions", "case": "stage-2 subprocess", "provider": "effops", "seconds": seconds}
                last = (text.strip().splitlines() or [""])[-1][:300]
                if timed_out:
                    row.update(status="skipped", note=f"no result within the {limit:.0f} s limit (killed)")
                else:
                    row.update(status="failed", error=f"exit status {rc}, no results: {last}")
                self.add(row)
            if self.fusions_fault:
                self.meta["fusions_fault"] = self.fusions_fault
                self.log(f"CUDA fault in stage 2 ({self.fusions_fault}): effops is not run in stages 7-9")
        except Exception as e:  # noqa: BLE001 - the subprocess could not be run or read: say so, go on
            self.log(traceback.format_exc())
            self.add({"stage": "fusions", "case": "stage-2 subprocess", "provider": "effops", "status": "failed",
                      "error": _short(e), "seconds": time.monotonic() - t0})
        finally:
            self.current = ""
            shutil.rmtree(tmp, ignore_errors=True)

    def no_fault(self):
        """Stages 7-9: effops runs in this process only if stage 2's kernels didn't fault the device."""
        if self.fusions_fault:
            raise Skip(f"not run: stage 2 hit a CUDA fault ({self.fusions_fault[:200]}); running effops here could "
                       "end every later case of this process")

    def stage_unavailable(self, stage: str, reason: str):
        self.log(f"skip stage {stage}: {reason}")
        self.add({"stage": stage, "case": "-", "provider": "-", "status": "skipped", "note": reason})

    # ---------------------------------------------------------------- stage 7
    def stage_shuffle(self):
        torch = self.torch
        import effops

        batch = 2 if self.dry else 32
        self.begin_stage("shuffle", self.later("shuffle"), f"batch {batch}, {self.meta['dtype']}, NHWC, g=2")
        try:
            tsh = _bench_module("test_shufflenet")
        except Skip as e:
            self.stage_unavailable("shuffle", str(e))
            self.end_stage()
            return
        self.meta["shuffle_shapes_from"] = "benchmarks/test_shufflenet.py"
        for i, (name, c, hw) in enumerate(tsh.SHUFFLES):
            if self.dry:
                c, hw = 2 * max(2, c // 32), max(2, hw // 7)

            def build(c=c, hw=hw):
                x = torch.randn(batch, c, hw, hw, device=self.dev).to(self.dtype).contiguous(memory_format=torch.channels_last)
                return dict(x=x, dst=torch.empty_like(x), ref=tsh._view_transpose_reshape(x, 2))

            get = lambda name=name, build=build: self.ctx(("shuffle", name), build)  # noqa: E731
            min_bytes = 2 * batch * c * hw * hw * (2 if self.dtype != torch.float32 else 4)
            fields = dict(shape=f"{batch}x{c}x{hw}x{hw} g=2 NHWC", dtype=self.meta["dtype"], batch=batch)
            m = lambda fn, ref=True, exact=False, get=get, mb=min_bytes: self.measure(  # noqa: E731
                fn, get()["ref"] if ref else None, min_bytes=mb, exact=exact)
            self.job(name, "copy", "cheap", lambda get=get, m=m: dict(
                m(lambda c=get(): c["dst"].copy_(c["x"]), ref=False), note="dst.copy_(x): the bandwidth reference"),
                **fields)
            self.job(name, "eager", "cheap", lambda get=get, m=m: m(lambda c=get(): tsh._view_transpose_reshape(c["x"], 2)),
                     note="view -> transpose -> reshape", **fields)
            self.job(name, "torch_channel_shuffle", "cheap",
                     lambda get=get, m=m: m(lambda c=get(): torch.channel_shuffle(c["x"], 2)), **fields)

            def eff(get=get, m=m):
                self.no_fault()
                return m(lambda c=get(): effops.channel_shuffle(c["x"], 2), exact=True)
            self.job(name, "effops", "shuffle_effops" if i == 0 else "cheap", eff, **fields)
        self.drop_ctx("shuffle")
        self.end_stage()

    # ---------------------------------------------------------------- stage 8
    def stage_se(self):
        torch = self.torch
        from effops.nn.se import SqueezeExcite

        batch = 2 if self.dry else 32
        self.begin_stage("se", self.later("se"), f"batch {batch}, {self.meta['dtype']}, NHWC, relu(se(x) + shortcut)")
        try:
            t = _bench_module("test_se")
            from timm.layers import make_divisible
        except (Skip, ImportError) as e:
            self.stage_unavailable("se", str(e))
            self.end_stage()
            return
        cases = []
        for name, c, hw in t.SHAPES:
            if self.dry:
                c, hw = max(16, c // 16), max(2, hw // 7)

            def build(c=c, hw=hw):
                se = t._se_module(c, self.dtype).to(self.dev)
                x = torch.randn(batch, c, hw, hw, device=self.dev).to(self.dtype).contiguous(
                    memory_format=torch.channels_last)
                shortcut = torch.randn_like(x)
                model = t._SEResidualReLU(se, shortcut).eval()
                fast = SqueezeExcite.from_module(copy.deepcopy(se)).eval()
                ref = copy.deepcopy(model).float()(x.float())
                return dict(model=model, fast=fast, x=x, shortcut=shortcut, ref=ref)

            # test_se.py's count: read x and the shortcut once, write the output once, read the fc weights
            r = make_divisible(c * 0.25, 8, round_limit=0.0)  # the fc1 width of _se_module's SEModule
            esize = 2 if self.dtype != torch.float32 else 4
            pix = batch * hw * hw
            min_bytes = esize * (3 * pix * c + 2 * c * r + r + c)
            flops = batch * 4 * c * r + pix * c * 4
            fields = dict(shape=f"{batch}x{c}x{hw}x{hw}, rd {r}", dtype=self.meta["dtype"], batch=batch)
            cases.append((f"{name}_se_residual_relu", build, flops, min_bytes, fields))
        for compile_pass in (False, True):
            for i, (name, build, flops, mb, fields) in enumerate(cases):
                get = lambda name=name, build=build: self.ctx(("se", name), build)  # noqa: E731
                m = lambda fn, get=get, flops=flops, mb=mb: self.measure(fn, get()["ref"], flops=flops,  # noqa: E731
                                                                         min_bytes=mb)
                if not compile_pass:
                    self.job(name, "eager", "cheap", lambda get=get, m=m: m(lambda c=get(): c["model"](c["x"])), **fields)

                    def eff(get=get, m=m):
                        self.no_fault()
                        return m(lambda c=get(): c["fast"].forward_residual(c["x"], c["shortcut"], "relu"))
                    self.job(name, "effops", "se_effops" if i == 0 else "se_effops_warm", eff,
                             note="SqueezeExcite.forward_residual", **fields)
                else:
                    def comp(get=get, m=m, first=i == 0):
                        c = get()
                        f = self.compiled(copy.deepcopy(c["model"]), first_case=first)
                        return m(lambda: f(c["x"]))
                    self.job(name, "compile_default", "compile", comp, **fields)
        self.drop_ctx("se")
        self.end_stage()

    # ---------------------------------------------------------------- stage 9
    def stage_fusion_models(self):
        batch = 1 if self.dry else 32
        size = 32 if self.dry else 224
        what = f"batch {batch}, {self.meta['dtype']}, {size}x{size}, channels_last"
        if self.dry:
            what += "; dry run: effops on its reference backend"
        self.begin_stage("fusion_models", self.later("fusion_models"), what)
        for step in ("cheap", "compile_default", "max_autotune"):
            for i, name in enumerate(FUSION_MODELS):
                fields = self.model_fields(name, batch, size)
                get = lambda name=name: self.model_ctx(name, batch)  # noqa: E731

                def m(fn, get=get):
                    c = get()
                    return self.measure(fn, c["ref"], flops=self.model_flops(c), memory=True)

                if step == "cheap":
                    self.job(name, "eager", "model_setup", lambda get=get, m=m: dict(
                        m(lambda c=get(): c["model"](c["x"])), note=get()["eager_note"]), **fields)

                    def eff(get=get, m=m):
                        self.no_fault()
                        return dict(m(self.whole_backend(lambda c=get(): c["fast"](c["x"]))), note=get()["report"])
                    self.job(name, "effops", "model_effops", eff, **fields)
                else:
                    ma = step == "max_autotune"

                    def comp(get=get, m=m, first=i == 0, ma=ma):
                        if self.dry and ma:
                            raise Skip("dry run: no max-autotune on a CPU (dynamo's eager backend would ignore the mode)")
                        c = get()
                        # (the dry run skips every case but the first: no copy to make for those)
                        module = copy.deepcopy(c["model"]) if first or not self.dry else None
                        f = self.compiled(module, mode="max-autotune" if ma else None, freezing=ma, first_case=first)
                        return m(lambda: f(c["x"]))
                    self.job(name, "compile_max_autotune_freezing" if ma else "compile_default",
                             "ma_model" if ma else "compile_model", comp, **fields)
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
        if self.cuda and set(self.stages) - {"tests", "fusions"}:  # the roofline's peaks: timing stages only
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
        if self.args.in_process:  # stage 2's subprocess: its parent reports the rows; skip the interpreter's teardown
            sys.stdout.flush()
            for f in self.logs:
                f.close()
            os._exit(self.exit_code())
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


def _fault_of(rc: int, timed_out: bool, rows: List[dict]) -> Optional[str]:
    """Whether stage 2's subprocess hit a CUDA fault: it died of a signal (not killed by us for time), or
    a case failed with an error that means the process's CUDA context is gone. None otherwise."""
    if rc < 0 and not timed_out:
        return f"the stage-2 subprocess died of signal {-rc}"
    return next((f"{r['case']}: {r['error']}" for r in rows if CUDA_FAULT.search(r.get("error") or "")), None)


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
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # stage 2's subprocess
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
