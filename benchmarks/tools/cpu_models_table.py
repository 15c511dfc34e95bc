"""Markdown tables of a whole-model CPU benchmark run (``benchmarks/test_cpu_models.py``'s JSON),
one per batch size, with effops' ratios against every other provider and the issue's targets::

    python benchmarks/tools/cpu_models_table.py benchmarks/results/cpu_models_<stamp>.json

Ratios are speedups (the other provider's ms / effops' ms: above 1 means effops is faster).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

COLUMNS = (("eager", "eager NCHW"), ("eager_cl", "eager channels_last"), ("compile_freeze", "torch.compile + freezing"),
           ("onnxruntime", "ONNX Runtime"), ("openvino", "OpenVINO"), ("effops", "effops"),
           ("effops_compile", "effops + compile"))


def tables(rows) -> str:
    ms = defaultdict(dict)
    for r in rows:
        if r.get("ms") is not None and not r.get("error") and not r.get("skipped"):
            ms[(r["batch"], r["model"])][r["provider"]] = r["ms"]
    out = []
    for batch in sorted({b for b, _ in ms}):
        out.append(f"**Batch {batch}** (ms per forward; ratios are speedups of effops)\n")
        head = [name for _, name in COLUMNS] + ["vs faster eager", "vs compile", "vs ORT", "vs OpenVINO",
                                                "effops+compile vs effops"]
        out.append("| model | " + " | ".join(head) + " |")
        out.append("|---|" + "---:|" * len(head))
        met = defaultdict(int)
        n = 0
        for (b, model), p in sorted(ms.items(), key=lambda kv: kv[0]):
            if b != batch or "effops" not in p:
                continue
            n += 1
            e = p["effops"]
            eager = min(p[k] for k in ("eager", "eager_cl") if k in p) if ("eager" in p or "eager_cl" in p) else None

            def ratio(other):
                return f"{other / e:.2f}×" if other else "–"

            cells = [f"{p[k]:.1f}" if k in p else "–" for k, _ in COLUMNS]
            cells += [ratio(eager), ratio(p.get("compile_freeze")), ratio(p.get("onnxruntime")),
                      ratio(p.get("openvino")),
                      f"{e / p['effops_compile']:.2f}×" if "effops_compile" in p else "–"]
            out.append(f"| {model} | " + " | ".join(cells) + " |")
            met["eager"] += eager is not None and eager / e >= 1.0
            met["compile"] += "compile_freeze" in p and p["compile_freeze"] / e >= 1.0
            met["effops_compile"] += "effops_compile" in p and e / p["effops_compile"] >= 1.0
        out.append("")
        out.append(f"effops ≥ 1.0× the faster eager layout on {met['eager']} of {n}; ≥ 1.0× torch.compile + "
                   f"freezing on {met['compile']} of {n}; effops + compile ≥ effops on {met['effops_compile']} of {n}.\n")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    with open(argv[0]) as f:
        data = json.load(f)
    print(tables(data["rows"] if isinstance(data, dict) else data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
