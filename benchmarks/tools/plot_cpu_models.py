"""Bar chart of a ``benchmarks/test_cpu_models.py`` result: speedup over eager NCHW per model and
provider, one panel per batch size (above 1: faster than eager; the line at 1 is eager itself;
log axis). "n/a" marks a provider with no time in that case (error or skipped).

    python benchmarks/tools/plot_cpu_models.py benchmarks/results/cpu_models_<...>.json [-o chart.png]

Writes the PNG next to the JSON (same name, ``.png``) unless ``-o`` says otherwise. A provider
with no time in a case (error, skipped) has no bar there. Without matplotlib it prints why and
draws nothing (exit status 1 as a script; ``plot()`` returns None).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

PROVIDER_ORDER = ["eager", "eager_cl", "compile_freeze", "onnxruntime", "openvino", "effops", "effops_compile"]


def plot(json_path, png_path=None) -> Optional[Path]:
    """Draw the chart for the rows in ``json_path``; the PNG's path, or None (with the reason
    printed) when there is nothing to draw or matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on the benchmark machines
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("plot_cpu_models: matplotlib is not installed (pip install -e .[bench]); no chart")
        return None
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    rows = [r for r in data["rows"] if "model" in r and "batch" in r]
    if not rows:
        print(f"plot_cpu_models: no CPU model rows in {json_path}; no chart")
        return None
    batches = sorted({r["batch"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    present = {r["provider"] for r in rows}
    providers = [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))
    speed = {(r["model"], r["batch"], r["provider"]): r.get("speedup_vs_eager") for r in rows}

    width = 0.8 / len(providers)
    fig, axes = plt.subplots(len(batches), 1, figsize=(max(8.0, 0.35 * len(models) * len(providers) + 2), 4.2 * len(batches)),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, batch in zip(axes[:, 0], batches):
        for i, prov in enumerate(providers):
            xs, ys = [], []
            for j, m in enumerate(models):
                v = speed.get((m, batch, prov))
                if v is not None:
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=prov, color=cmap(i % 10),
                   edgecolor="black" if prov.startswith("effops") else None)
            for j, m in enumerate(models):  # say where a bar is missing rather than leave a silent gap
                if (m, batch, prov) in speed and speed[(m, batch, prov)] is None:
                    ax.text(j + (i - (len(providers) - 1) / 2) * width, 1.0, "n/a", rotation=90, ha="center",
                            va="bottom", fontsize="x-small")
        # Speedups are ratios: a log axis puts 0.5x and 2x the same distance from eager.
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=30, ha="right")
        ax.set_ylabel("speedup vs eager NCHW (x)")
        ax.set_title(f"batch {batch}")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    st = data.get("stamp", {})
    threads = {r.get("threads") for r in rows} - {None}
    fig.suptitle(f"CPU, fp32, 224x224: {st.get('device', '?')}, torch {st.get('torch', '?')}"
                 + (f", {'/'.join(map(str, sorted(threads)))} threads" if threads else "")
                 + (f", {st['date']}" if st.get("date") else ""), fontsize="medium")
    fig.tight_layout()
    png = Path(png_path) if png_path else json_path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="a cpu_models_*.json written by benchmarks/test_cpu_models.py")
    p.add_argument("-o", "--output", help="PNG path (default: the JSON's path with .png)")
    args = p.parse_args(argv)
    png = plot(args.json, args.output)
    if png:
        print(png)
    return 0 if png else 1


if __name__ == "__main__":
    sys.exit(main())
