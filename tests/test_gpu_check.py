"""benchmarks/gpu_check.py --dry-run: the one-call GPU check runs end to end on a CPU.

The GPU run can't be tried here, so its dry run takes the same code path with tiny
problems: every stage must leave rows (measured, or skipped with a reason), nothing may
fail, every pytest id of stage 1 must exist, and the result files must be stamped. The
target verdicts and the CUDA-fault guard, which the dry run can't reach with real numbers,
are checked on hand-made rows."""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["tests", "fusions", "conv", "osa", "models", "graphs", "shuffle", "se", "fusion_models"]
# stage 2's cases (their names start with these) and the effops op each must have dispatched
FUSION_CASES = {
    "effops.se_gate": "se_gate",
    "effops.se_apply": "se_apply",
    "SqueezeExcite.forward_residual": "se_gate",
    "effops.channel_shuffle g=2": "channel_shuffle",
    "effops.channel_shuffle g=4": "channel_shuffle",
    "conv_bn_act(gate=)": "conv_bn_act",
    "conv_bn_act(out_shuffle_groups=2)": "conv_bn_act",
    "FusedShuffleV2Block stride 1": "conv_bn_act",
    "FusedShuffleV2Block stride 2": "conv_bn_act",
    "FusedGhostModule ghost1": "conv_bn_act",
    "FusedGhostModule ghost2": "conv_bn_act",
    "traced ELAN": "aggregate",
    "FusedRepVGGBlock identity": "conv_bn_act",
    "FusedRepVGGBlock stride 2": "conv_bn_act",
}
TARGETS = ["newer kernels match the fp64 reference", "channel shuffle GB/s >= 80% of a plain copy's",
           "SE + residual + ReLU >= 70% of the bandwidth roofline", "SE + residual + ReLU >= 2x eager",
           "whole model >= 1.5x eager", "whole model >= torch.compile"]


def _gpu_check():
    """benchmarks/gpu_check.py as a module. It puts benchmarks/ first on sys.path, whose test_se.py,
    test_osa.py ... would then shadow tests/' own modules of those names in this session: restored."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("gpu_check_under_test", REPO / "benchmarks" / "gpu_check.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    env.pop("OUT", None)
    # Twice the dry run's default budget: under a loaded test run (xdist workers beside it) a stage's
    # share can run out before its first case, and this test is about the code path, not the time.
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--budget", "300", "--out",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 5, files  # the device tool returns at most 8 files (stage 2's subprocess adds none)
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for n in files)
    base = files[0].rsplit(".", 1)[0]
    assert base.startswith("gpu_check_dry_run_") and "_torch" in base and "_triton" in base, files
    for suffix in (".csv", ".json", "_summary.md", ".log", "_tests.log"):
        assert (tmp_path / f"{base}{suffix}").is_file(), (suffix, files)

    doc = json.loads((tmp_path / f"{base}.json").read_text())
    for key in ("device", "torch", "triton", "cuda", "date"):
        assert doc["stamp"].get(key), doc["stamp"]
    assert doc["complete"] and not doc["cut_off"]
    assert list(doc["stages"]) == STAGES
    rows = doc["rows"]
    for stage in STAGES:
        srows = [r for r in rows if r["stage"] == stage]
        assert srows, f"no rows for stage {stage}"
        assert any(r["status"] == "ok" for r in srows), (stage, srows)
        assert all(r["status"] == "skipped" and r.get("note") for r in srows if r["status"] != "ok"), \
            [r for r in srows if r["status"] != "ok"]
    # stage 1: every selected test id exists (the GPU run depends on it) and the dry-run subset passed
    tests = doc["tests"]
    assert tests["missing_ids"] == [] and tests["passed"] >= 2 and not tests["failed"] and not tests["errors"], tests
    # stage 2 ran in its subprocess: every case, each matching by the fp64 rule, each through its effops op
    frows = [r for r in rows if r["stage"] == "fusions"]
    assert doc["meta"]["fusions_subprocess"]["rc"] == 0 and "fusions_fault" not in doc["meta"], doc["meta"]
    for prefix, op in FUSION_CASES.items():
        [r] = [r for r in frows if r["case"].startswith(prefix)]
        assert r["status"] == "ok" and r["numerics"] == "ok", r
        assert r["rel_err"] <= 1e-5 and r["eager_rel_err"] is not None, r  # the dry run is float32
        assert f"effops ops: {op}" in r["note"] or f", {op}" in r["note"], r
    # timing stages measured every provider that runs on a CPU, effops included, and effops matched
    for stage in ("conv", "osa", "models", "se", "fusion_models"):
        provs = {r["provider"] for r in rows if r["stage"] == stage and r["status"] == "ok"}
        assert {"eager", "effops"} <= provs, (stage, provs)
        assert any(p.startswith("compile") for p in provs), (stage, provs)
    shuffle = [r for r in rows if r["stage"] == "shuffle"]
    assert {r["provider"] for r in shuffle if r["status"] == "ok"} == {"copy", "eager", "torch_channel_shuffle", "effops"}
    assert all(r["gbps"] > 0 for r in shuffle if r["status"] == "ok"), shuffle
    models = {r["case"]: r for r in rows if r["stage"] == "fusion_models" and r["provider"] == "effops"}
    assert sorted(models) == ["ghostnet_100", "resnetrs50", "shufflenet_v2_x1_0"], models
    # the dry run compiles the first model only, and not with max-autotune (no CPU counterpart)
    first = {r["provider"]: r for r in rows if r["stage"] == "fusion_models" and r["case"] == next(iter(models))}
    assert first["compile_default"]["status"] == "ok" and first["compile_max_autotune_freezing"]["status"] == "skipped"
    effops_rows = [r for r in rows if r["provider"].startswith("effops") and r["status"] == "ok"]
    assert effops_rows and all(r["numerics"] == "ok" for r in effops_rows), effops_rows
    # every target is stated, per case, with a verdict; the rows a measured target rests on carry it
    targets = doc["targets"]
    for text in TARGETS:
        assert any(t["target"].startswith(text) for t in targets), (text, targets)
    assert all(t["status"] in ("met", "NOT met", "not measured") and t["value"] for t in targets), targets
    assert [t["status"] for t in targets if t["stage"] == "fusions"] == ["met"]
    assert len([t for t in targets if t["stage"] == "shuffle"]) == 3 and len([t for t in targets if t["stage"] == "se"]) == 8
    assert any(r.get("target") for r in rows if r["stage"] == "fusion_models" and r["provider"] == "effops")

    with open(tmp_path / f"{base}.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and table[0]["device"] == doc["stamp"]["device"]
    assert {"gbps", "eager_rel_err", "target"} <= set(table[0])
    summary = (tmp_path / f"{base}_summary.md").read_text()
    assert "Verdict: correctness checks passed" in summary
    assert "## Targets of the newer fusions" in summary and all(text in summary for text in TARGETS)
    assert summary.strip() in out  # printed last


def _check(gc, rows, stages, peaks=True):
    """A Check with hand-made rows, without __init__ (which opens log files and redirects stdout)."""
    c = gc.Check.__new__(gc.Check)
    c.rows, c.stages, c.meta, c.args, c.dry = rows, stages, {}, None, False
    return c


def _row(stage, case, provider, **kw):
    return dict(stage=stage, case=case, provider=provider, status="ok", dtype="float16", **kw)


def test_targets_verdicts_on_hand_made_rows():
    """Synthetic numbers (not measurements): each target's met / NOT met / not measured logic."""
    gc = _gpu_check()
    rows = [
        _row("fusions", "a", "effops", rel_err=0.0, numerics="ok"),
        _row("fusions", "b", "effops", rel_err=0.5, numerics="MISMATCH"),
        _row("shuffle", "s", "copy", ms=1.0, gbps=100.0),
        _row("shuffle", "s", "effops", ms=1.2, gbps=83.3, rel_err=0.0, numerics="ok"),  # 83% of the copy
        _row("shuffle", "t", "copy", ms=1.0, gbps=100.0),
        dict(_row("shuffle", "t", "effops"), status="skipped", note="stage share spent"),
        _row("se", "x", "eager", ms=3.0, rel_err=1e-3),
        _row("se", "x", "effops", ms=1.0, rel_err=1e-3, pct_roofline=69.0, gbps=1.0),
        _row("fusion_models", "m", "eager", ms=3.0, rel_err=1e-3),
        _row("fusion_models", "m", "effops", ms=2.0, rel_err=1e-3),
        _row("fusion_models", "m", "compile_default", ms=2.5),
        _row("fusion_models", "n", "eager", ms=3.0, rel_err=1e-3),
        _row("fusion_models", "n", "effops", ms=1.0, rel_err=1e-3),
        _row("fusion_models", "n", "compile_default", ms=2.5),
        _row("fusion_models", "n", "compile_max_autotune_freezing", ms=0.9),
    ]
    c = _check(gc, rows, ["fusions", "shuffle", "se", "fusion_models"])
    rendered = c.rendered_rows()
    got = {(t["stage"], t["case"], t["target"].split(" >= ")[-1] if ">=" in t["target"] else t["target"]): t
           for t in c.targets(rendered)}
    status = {k: t["status"] for k, t in got.items()}
    assert status[("fusions", "all cases", "newer kernels match the fp64 reference (_numerics.py rule)")] == "NOT met"
    assert status[("shuffle", "s", "80% of a plain copy's")] == "met"
    assert status[("shuffle", "t", "80% of a plain copy's")] == "not measured"
    assert "effops skipped: stage share spent" in got[("shuffle", "t", "80% of a plain copy's")]["value"]
    assert status[("se", "x", "70% of the bandwidth roofline")] == "NOT met"
    assert status[("se", "x", "2x eager")] == "met"
    assert status[("fusion_models", "m", "1.5x eager")] == "met"
    assert status[("fusion_models", "n", "1.5x eager")] == "met"
    # against max-autotune when it was measured, else the default mode, and the value says which
    m, n = got[("fusion_models", "m", "torch.compile")], got[("fusion_models", "n", "torch.compile")]
    assert m["status"] == "met" and "default mode (max-autotune not measured)" in m["value"]
    assert n["status"] == "NOT met" and "max-autotune" in n["value"] and "default" not in n["value"]
    # the verdict rests on a row, which carries it in the CSV's target column
    assert "1.5x eager: met" in rendered[9]["target"] and "torch.compile: met" in rendered[9]["target"]
    # a stage-2 case that raised fails the run like a mismatch does
    failed = dict(_row("fusions", "c", "effops"), status="failed", error="CompilationError: ...")
    c2 = _check(gc, [failed], ["fusions"])
    c2.tests_info = {}
    assert c2.exit_code() == 1 and "stage 2 case(s) failed: c" in c2.verdict(c2.rendered_rows())


def test_cuda_fault_in_stage_2_keeps_effops_out_of_later_stages():
    gc = _gpu_check()
    ok = [_row("fusions", "a", "effops", numerics="ok")]
    assert gc._fault_of(0, False, ok) is None
    assert gc._fault_of(1, False, ok + [dict(_row("fusions", "b", "effops"), status="failed",
                                             error="AssertionError: relative error")]) is None
    assert gc._fault_of(-9, True, ok) is None  # killed by the parent at its time limit: not a fault
    assert "signal 11" in gc._fault_of(-11, False, ok)
    fault = gc._fault_of(0, False, ok + [dict(_row("fusions", "b", "effops"), status="failed",
                                              error="RuntimeError: CUDA error: an illegal memory access was encountered")])
    assert fault.startswith("b: RuntimeError: CUDA error")
    c = _check(gc, [], ["shuffle"])
    c.fusions_fault = None
    c.no_fault()
    c.fusions_fault = fault
    with pytest.raises(gc.Skip, match="stage 2 hit a CUDA fault"):
        c.no_fault()
