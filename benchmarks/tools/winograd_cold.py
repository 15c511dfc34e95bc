"""Winograd F(4x4, 3x3) against oneDNN on 3x3 convs, with the caches warm and evicted.

    python benchmarks/tools/winograd_cold.py [--threads 2] [--reps 7]

Per shape (VoVNet-39, ResNet-50, RepVGG-A2 stage convs and RegNetY-016's grouped ones, group
width 24, at 224² input, batch 1): the native conv
with ``set_winograd_policy(0)`` (oneDNN) and ``(1)`` (Winograd), timed back to back ("warm": the
weights stay in the cache) and with a 64 MB write before every call ("cold": as in a model, where
the other layers' weights and activations pass through the cache between two calls of a conv).
Winograd's transformed weight is 4x the conv weight, so it loses more of its lead cold; the
measured choice in csrc/conv.cpp times cold for that reason, and takes Winograd only where it is
at least 15% faster (``kWinogradMargin``; the last column says which side that picks). Medians in ms.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # the effops of this checkout

import torch  # noqa: E402

# (in channels, out channels, map size, groups)
SHAPES = [(128, 128, 56, 1), (160, 160, 28, 1), (192, 192, 14, 1), (224, 224, 7, 1), (768, 224, 7, 1), (64, 64, 56, 1),
          (256, 256, 14, 1), (384, 384, 14, 1), (512, 512, 7, 1),
          (48, 48, 56, 2), (120, 120, 28, 5), (336, 336, 14, 14), (888, 888, 7, 37)]
MARGIN = 0.85  # csrc/conv.cpp kWinogradMargin


def main(argv=None) -> int:
    import effops

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    m = effops.native.module()
    if m is None:
        raise SystemExit(f"the native backend is unavailable: {effops.native.status()[1]}")
    junk = torch.empty(16 << 20)  # 64 MB

    def median_ms(fn, cold):
        fn()
        ts = []
        for _ in range(args.reps):
            if cold:
                junk.fill_(1.0)
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    before = m.winograd_policy()
    try:
        for c, k, hw, g in SHAPES:
            x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(k, c // g, 3, 3) / (c // g * 9) ** 0.5, torch.randn(k)

            def conv():
                return m.conv_scale_bias_act(x, w, None, b, None, None, [1, 1], [1, 1], [1, 1], g, "relu", 0.0, False)

            r = {}
            for cold in (False, True):
                for policy in (0, 1):
                    m.set_winograd_policy(policy)
                    r[cold, policy] = median_ms(conv, cold)
            pick = "Winograd" if r[True, 1] <= MARGIN * r[True, 0] else "oneDNN"
            print(f"{c:4d} -> {k:4d} @ {hw:3d}² g{g:<3d} warm: oneDNN {r[False, 0]:6.3f}  Winograd {r[False, 1]:6.3f} "
                  f"({r[False, 0] / r[False, 1]:4.2f}x)   cold: oneDNN {r[True, 0]:6.3f}  Winograd {r[True, 1]:6.3f} "
                  f"({r[True, 0] / r[True, 1]:4.2f}x)  {pick}", flush=True)
    finally:
        m.set_winograd_policy(before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
