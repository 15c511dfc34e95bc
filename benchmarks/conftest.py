"""Benchmark session: collects one row per (case, provider) and writes them,
stamped with device and versions, to benchmarks/results/ at the end."""
import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch

RESULTS = []
OUT_DIR = Path(os.environ.get("EFFOPS_BENCH_OUT", Path(__file__).parent / "results"))


@pytest.fixture(scope="session")
def results():
    return RESULTS


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS:
        return
    from effops.benchmark import device_stamp

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stamp = device_stamp(dev)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stamp["device"]).strip("-").lower()
    tag = os.environ.get("EFFOPS_BENCH_TAG", "")
    name = f"conv_bn_act_{slug}_torch{stamp['torch'].split('+')[0]}_triton{stamp['triton']}{('_' + tag) if tag else ''}"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    rows = [{**stamp, **r} for r in RESULTS]
    with open(OUT_DIR / f"{name}.json", "w") as f:
        json.dump({"stamp": stamp, "rows": RESULTS}, f, indent=1)
    with open(OUT_DIR / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"\n{stamp['device']} | torch {stamp['torch']} | triton {stamp['triton']} -> {OUT_DIR / name}.csv")
        hdr = f"{'case':<34}{'provider':<31}{'ms':>9}{'speedup':>9}{'TFLOP/s':>9}{'GB/s':>8}{'%roof':>7}{'graph ms':>10}{'g-speedup':>10}"
        tr.write_line(hdr)
        for r in RESULTS:
            roof = f"{r['pct_roofline']:.0f}" if r["pct_roofline"] is not None else "-"
            g = f"{r['ms_cuda_graph']:>10.4f}{r['graph_speedup_vs_eager']:>9.2f}x" if r["ms_cuda_graph"] else ""
            tr.write_line(f"{r['case']:<34}{r['provider']:<31}{r['ms']:>9.4f}{r['speedup_vs_eager']:>8.2f}x"
                          f"{r['tflops']:>9.1f}{r['gbps']:>8.0f}{roof:>7}{g}")
