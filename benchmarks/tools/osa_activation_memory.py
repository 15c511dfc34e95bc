"""Peak activation memory of each VoVNet-39 OSA block, eager vs FusedOSA, on any machine.

Counts the bytes of every tensor allocated inside one eval forward and alive at the
same time (effops.benchmark.LiveTensorBytes: an allocation model read from the ATen
calls, no GPU needed; without a GPU the Triton kernels run under the interpreter).
Activation sizes scale with N*H*W for every tensor in the block, so the ratio does
not depend on the spatial size; a 3x3 input at batch 2 keeps the interpreter fast
while the channel counts are VoVNet-39's. Writes a CSV next to the other results.

    TRITON_INTERPRET=1 python benchmarks/tools/osa_activation_memory.py     # CPU
    python benchmarks/tools/osa_activation_memory.py                        # CUDA
"""
import copy
import csv
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import effops  # noqa: E402
from effops.benchmark import LiveTensorBytes, device_stamp  # noqa: E402
from effops.models.classic_vovnet import OSAModule  # noqa: E402

BLOCKS = [  # name, in_ch, stage_ch, concat_ch, identity, ese (VoVNet-39; V2 = identity + eSE)
    ("s2_osa", 128, 128, 256, False, False),
    ("s3_osa", 256, 160, 512, False, False),
    ("s4_osa", 512, 192, 768, False, False),
    ("s4_osa_v2_identity_ese", 768, 192, 768, True, True),
    ("s5_osa", 768, 224, 1024, False, False),
    ("s5_osa_v2_identity_ese", 1024, 224, 1024, True, True),
]


def measure(cin, sc, cc, identity, ese, device, n=2, hw=3):
    torch.manual_seed(0)
    ref = OSAModule(cin, sc, cc, 5, "OSA", identity=identity, ese=ese).eval().to(device)
    fused = effops.FusedOSA.from_module(copy.deepcopy(ref))
    x = torch.randn(n, cin, hw, hw, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), effops.use_backend("triton"):
        fused(x)  # warm-up: one-time work stays out of the measured forwards
        with LiveTensorBytes() as eager:
            y_ref = ref(x)
        with LiveTensorBytes() as ours:
            y = fused(x)
    err = ((y - y_ref).norm() / y_ref.norm()).item()
    return eager.peak, ours.peak, y.untyped_storage().nbytes(), err


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stamp = device_stamp(device)
    rows = []
    print(f"{'block':<26}{'eager B':>10}{'effops B':>10}{'ratio':>8}{'output B':>10}")
    for name, cin, sc, cc, identity, ese in BLOCKS:
        e, o, out, err = measure(cin, sc, cc, identity, ese, device)
        assert err < 1e-4, f"{name}: effops disagrees with eager ({err:.2e})"
        rows.append(dict(block=name, shape=f"2x{cin}x3x3 -> 5x{sc} -> {cc}", eager_peak_bytes=e, effops_peak_bytes=o,
                         ratio=round(o / e, 4), output_bytes=out, **stamp))
        print(f"{name:<26}{e:>10}{o:>10}{o / e:>8.2f}{out:>10}")
    path = Path(__file__).resolve().parents[1] / "results" / "osa_activation_memory_allocation_model.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
