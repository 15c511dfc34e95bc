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

# fp32 means fp32: TF32 off, as in tests/conftest.py (effops' kernel follows cudnn.allow_tf32
# too), so that fp32 cases can be held to the fp32 rule in _numerics.py. fp16/bf16 don't use it.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

OUT_DIR = Path(os.environ.get("EFFOPS_BENCH_OUT", Path(__file__).parent / "results"))


class _Results(list):
    """Rows of one session; ``flush()`` rewrites the CSV and JSON files."""

    def __init__(self, prefix: str):
        super().__init__()
        from effops.benchmark import device_stamp

        self.stamp = device_stamp(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.stamp["device"]).strip("-").lower()
        tag = os.environ.get("EFFOPS_BENCH_TAG", "")
        self.path = OUT_DIR / (f"{prefix}_{slug}_torch{self.stamp['torch'].split('+')[0]}"
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


@pytest.fixture(scope="module")
def results(request):
    """One result file per benchmark module: ``test_osa.py`` -> ``results/osa_<device>_<versions>.csv``."""
    prefix = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    if prefix not in _SESSION:
        _SESSION[prefix] = _Results(prefix)
    return _SESSION[prefix]


def pytest_sessionfinish(session, exitstatus):
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    for res in _SESSION.values():
        if res:
            res.flush()
            if tr is not None:
                _print_table(tr, res)


def _print_table(tr, res):
    st = res.stamp
    tr.write_line(f"\n{st['device']} | torch {st['torch']} | triton {st['triton']} -> {res.path}.csv")
    tr.write_line(f"{'case':<34}{'provider':<31}{'ms':>9}{'speedup':>9}{'TFLOP/s':>9}{'GB/s':>8}{'%roof':>7}"
                  f"{'graph ms':>10}{'g-speedup':>10}{'peak MB':>9}{'err64':>10}")
    f = lambda v, spec, suffix="": "-" if v is None else f"{v:{spec}}{suffix}"
    for r in res:
        tr.write_line(f"{r['case']:<34}{r['provider']:<31}{f(r['ms'], '.4f'):>9}{f(r['speedup_vs_eager'], '.2f', 'x'):>9}"
                      f"{f(r['tflops'], '.1f'):>9}{f(r['gbps'], '.0f'):>8}{f(r['pct_roofline'], '.0f'):>7}"
                      f"{f(r['ms_cuda_graph'], '.4f'):>10}{f(r['graph_speedup_vs_eager'], '.2f', 'x'):>10}"
                      f"{f(r.get('peak_mem_mb'), '.1f'):>9}{f(_err64(r), '.1e'):>10}"
                      + (f"  [{r['error']}]" if r["error"] else ""))


def _err64(row):
    """Relative error against the fp64 reference, for the rows _numerics.py checked."""
    return {"eager": row.get("eager_rel_err_vs_fp64"), "effops": row.get("effops_rel_err_vs_fp64")}.get(row["provider"])
