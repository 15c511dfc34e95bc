"""Benchmark session: collects one row per (case, provider) and writes them,
stamped with device and versions, to benchmarks/results/ after every case
(so a run cut short still leaves what it measured), then prints a table."""
import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch

OUT_DIR = Path(os.environ.get("EFFOPS_BENCH_OUT", Path(__file__).parent / "results"))


class _Results(list):
    """Rows of one session; ``flush()`` rewrites the CSV and JSON files."""

    def __init__(self):
        super().__init__()
        from effops.benchmark import device_stamp

        self.stamp = device_stamp(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.stamp["device"]).strip("-").lower()
        tag = os.environ.get("EFFOPS_BENCH_TAG", "")
        self.path = OUT_DIR / (f"conv_bn_act_{slug}_torch{self.stamp['torch'].split('+')[0]}"
                               f"_triton{self.stamp['triton']}{('_' + tag) if tag else ''}")

    def flush(self):
        if not self:
            return
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.json", "w") as f:
            json.dump({"stamp": self.stamp, "rows": list(self)}, f, indent=1)
        rows = [{**self.stamp, **r} for r in self]
        with open(f"{self.path}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


_SESSION = {}


@pytest.fixture(scope="session")
def results():
    _SESSION["results"] = _Results()
    return _SESSION["results"]


def pytest_sessionfinish(session, exitstatus):
    res = _SESSION.get("results")
    if not res:
        return
    res.flush()
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is None:
        return
    st = res.stamp
    tr.write_line(f"\n{st['device']} | torch {st['torch']} | triton {st['triton']} -> {res.path}.csv")
    tr.write_line(f"{'case':<34}{'provider':<31}{'ms':>9}{'speedup':>9}{'TFLOP/s':>9}{'GB/s':>8}{'%roof':>7}"
                  f"{'graph ms':>10}{'g-speedup':>10}")
    f = lambda v, spec, suffix="": "-" if v is None else f"{v:{spec}}{suffix}"
    for r in res:
        tr.write_line(f"{r['case']:<34}{r['provider']:<31}{f(r['ms'], '.4f'):>9}{f(r['speedup_vs_eager'], '.2f', 'x'):>9}"
                      f"{f(r['tflops'], '.1f'):>9}{f(r['gbps'], '.0f'):>8}{f(r['pct_roofline'], '.0f'):>7}"
                      f"{f(r['ms_cuda_graph'], '.4f'):>10}{f(r['graph_speedup_vs_eager'], '.2f', 'x'):>10}"
                      + (f"  [{r['error']}]" if r["error"] else ""))
