"""benchmarks/gpu_check.py --dry-run: the one-call GPU check runs end to end on a CPU.

The GPU run can't be tried here, so its dry run takes the same code path with tiny
problems: every stage must leave rows (measured, or skipped with a reason), nothing may
fail, every pytest id of stage 1 must exist, and the result files must be stamped."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["tests", "conv", "osa", "models", "graphs"]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 5, files  # the device tool returns at most 8 files
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for n in files)
    base = files[0].rsplit(".", 1)[0]
    assert base.startswith("gpu_check_dry_run_") and "_torch" in base and "_triton" in base, files
    for suffix in (".csv", ".json", "_summary.md", ".log", "_tests.log"):
        assert (tmp_path / f"{base}{suffix}").is_file(), (suffix, files)

    doc = json.loads((tmp_path / f"{base}.json").read_text())
    for key in ("device", "torch", "triton", "cuda", "date"):
        assert doc["stamp"].get(key), doc["stamp"]
    assert doc["complete"] and not doc["cut_off"]
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
    # timing stages measured every provider that runs on a CPU, effops included, and effops matched
    for stage in ("conv", "osa", "models"):
        provs = {r["provider"] for r in rows if r["stage"] == stage and r["status"] == "ok"}
        assert {"eager", "effops"} <= provs, (stage, provs)
        assert any(p.startswith("compile") for p in provs), (stage, provs)
    effops_rows = [r for r in rows if r["provider"].startswith("effops") and r["status"] == "ok"]
    assert effops_rows and all(r["numerics"] == "ok" for r in effops_rows), effops_rows

    with open(tmp_path / f"{base}.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and table[0]["device"] == doc["stamp"]["device"]
    summary = (tmp_path / f"{base}_summary.md").read_text()
    assert "Verdict: correctness checks passed" in summary
    assert summary.strip() in out  # printed last
