"""The native CPU backend's per-problem choices, measured side by side in one process.

    python benchmarks/tools/native_choices.py                       # 2 threads, every study
    python benchmarks/tools/native_choices.py --models mobilenet_v2,resnet50 --threads 2

1. depthwise convs: oneDNN (policy 0) against effops' NHWC kernel (policy 2), whole models;
2. 1x1 convs: oneDNN (0), GEMM (1), measured per problem (2, the default), whole models;
3. dense 3x3 stride-1 convs: oneDNN (0), Winograd F(4x4, 3x3) (1), measured (2, the default);
4. expand 1x1 -> depthwise pairs (models that have them): the two convs one after the other (0),
   banded (1), banded up to 128 input channels (2, the default);
5. stem convs (at most 4 input channels): oneDNN (0), effops' direct kernel (1), measured (2, the
   default), whole models;
6. VoVNet-39's aggregations (block input + 5 stage outputs -> 1x1 conv + BN + ReLU): GEMMs over
   the segments against an NHWC concat + oneDNN's 1x1 conv (and the concat alone).

Whole-model rows alternate the variants call by call (after a warm-up per variant), so drift on
a shared machine hits them alike; medians of ``--reps`` calls. Writes
``benchmarks/results/native_choices_<cpu>-<threads>-threads_torch<v>.csv``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import re
import time
from pathlib import Path

import torch

import effops
from effops.benchmark import device_stamp, randomize_bn

MODELS = ["mobilenet_v2", "efficientnet_b0", "ghostnet_100", "shufflenet_v2_x1_0", "mobilenetv3_large_100",
          "resnet50", "vovnet39", "repvgg_a2"]


def build(name: str) -> torch.nn.Module:
    if name.startswith("vovnet"):
        from effops.models.classic_vovnet import classic_vovnet

        return classic_vovnet(name)
    import torchvision

    if hasattr(torchvision.models, name):
        return getattr(torchvision.models, name)()
    import timm

    return timm.create_model(name, pretrained=False)


def has_pairs(model: torch.nn.Module) -> bool:
    """Whether the optimized model runs an expand -> depthwise pair anywhere."""
    from effops.nn.conv_bn_act import PointwiseDepthwise
    from effops.nn.traced import PairStep, traced_forward_of

    mods = list(model.modules())
    mods += [g for m in mods if traced_forward_of(m) is not None for g in traced_forward_of(m).graph_module.modules()]
    return any(isinstance(m, PairStep) or any(isinstance(s, PointwiseDepthwise)
                                              for s in [*getattr(m, "_steps", []), *getattr(m, "_prefix_steps", [])])
               for m in mods)


def median_ms(ts) -> float:
    ts = sorted(ts)
    return ts[len(ts) // 2] * 1e3


def side_by_side(fm, x, setters: dict, reps: int) -> dict:
    times = {k: [] for k in setters}
    with torch.inference_mode():
        for k, set_ in setters.items():
            set_()
            fm(x)
            fm(x)
        for _ in range(reps):
            for k, set_ in setters.items():
                set_()
                t = time.perf_counter()
                fm(x)
                times[k].append(time.perf_counter() - t)
    return {k: median_ms(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    nat = effops.native.module()
    if nat is None:
        raise SystemExit(f"the native backend is unavailable: {effops.native.status()[1]}")
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        m = randomize_bn(build(name).eval())
        fm = effops.optimize(copy.deepcopy(m)).to(memory_format=torch.channels_last)
        x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        # First, so that the measured choices of the other studies' first calls are made with the
        # default pair policy.
        pr = {}
        if has_pairs(fm):
            pr = side_by_side(fm, x, {"pairs default": lambda: nat.set_pair_policy(2),
                                      "pairs separate": lambda: nat.set_pair_policy(0),
                                      "pairs banded": lambda: nat.set_pair_policy(1)}, args.reps)
        dw = side_by_side(fm, x, {"depthwise oneDNN": lambda: nat.set_depthwise_policy(0),
                                  "depthwise effops": lambda: nat.set_depthwise_policy(2)}, args.reps)
        pw = side_by_side(fm, x, {"1x1 oneDNN": lambda: nat.set_pointwise_policy(0),
                                  "1x1 GEMM": lambda: nat.set_pointwise_policy(1),
                                  "1x1 measured": lambda: nat.set_pointwise_policy(2)}, args.reps)
        wg = side_by_side(fm, x, {"3x3 oneDNN": lambda: nat.set_winograd_policy(0),
                                  "3x3 Winograd": lambda: nat.set_winograd_policy(1),
                                  "3x3 measured": lambda: nat.set_winograd_policy(2)}, args.reps)
        st = side_by_side(fm, x, {"stem oneDNN": lambda: nat.set_direct_policy(0),
                                  "stem direct": lambda: nat.set_direct_policy(1),
                                  "stem measured": lambda: nat.set_direct_policy(2)}, args.reps)
        nat.set_depthwise_policy(2)
        nat.set_pointwise_policy(2)
        nat.set_winograd_policy(2)
        nat.set_pair_policy(2)
        nat.set_direct_policy(2)
        for k, v in {**pr, **dw, **pw, **wg, **st}.items():
            rows.append({"study": "whole model", "case": name, "variant": k, "ms": round(v, 3)})
            print(f"{name:24s} {k:18s} {v:8.2f} ms", flush=True)
    for hw, cin, cs, cout in [(56, 128, 128, 256), (28, 256, 160, 512), (14, 512, 192, 768), (7, 768, 224, 1024)]:
        segs = [torch.randn(1, cin, hw, hw).contiguous(memory_format=torch.channels_last)]
        segs += [torch.randn(1, cs, hw, hw).contiguous(memory_format=torch.channels_last) for _ in range(5)]
        k = cin + 5 * cs
        w, s, b = torch.randn(cout, k, 1, 1) / k ** 0.5, torch.rand(cout) + 0.5, torch.randn(cout)
        variants = {
            "segments GEMM": lambda: nat.conv_scale_bias_act_segments(segs, w, s, b, None, None, "relu", 0.0, True),
            "concat + oneDNN 1x1": lambda: nat.conv_scale_bias_act(torch.cat(segs, 1), w, s, b, None, None, [1, 1],
                                                                   [0, 0], [1, 1], 1, "relu", 0.0, True),
            "concat alone": lambda: torch.cat(segs, 1),
        }
        times = {v: [] for v in variants}
        with torch.inference_mode():
            nat.set_pointwise_policy(1)  # the segments as GEMMs, not the measured choice
            for f in variants.values():
                f()
            for _ in range(args.reps):
                for v, f in variants.items():
                    nat.set_pointwise_policy(1 if v == "segments GEMM" else 0)
                    t = time.perf_counter()
                    f()
                    times[v].append(time.perf_counter() - t)
            nat.set_pointwise_policy(2)
        case = f"{hw}x{hw} K={k} Cout={cout}"
        for v, ts in times.items():
            rows.append({"study": "aggregation", "case": case, "variant": v, "ms": round(median_ms(ts), 3)})
            print(f"{case:28s} {v:22s} {median_ms(ts):8.3f} ms", flush=True)
    stamp = device_stamp(torch.device("cpu"))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stamp["device"]).strip("-").lower()
    out = Path(os.environ.get("EFFOPS_BENCH_OUT", Path(__file__).resolve().parent.parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"native_choices_{slug}_torch{stamp['torch'].split('+')[0]}.csv"
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(stamp) + ["study", "case", "variant", "ms"])
        wr.writeheader()
        wr.writerows({**stamp, **r} for r in rows)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
