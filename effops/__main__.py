"""``python -m effops``: convert a model, check it matches, time it.

    python -m effops                                   # classic VoVNet-27-slim
    python -m effops --model vovnet39 --batch 32
    python -m effops --model vovnet39 --v2             # VoVNetV2 (eSE)
    python -m effops --model ese_vovnet19b_dw          # any timm model by name (random weights)
    python -m effops info [--json]                     # which implementation runs here, and why


Runs on the best device present (CUDA if available, else CPU, where effops
runs its native C++ backend, or the reference when that can't be built). BatchNorm statistics
are randomised so that folding is really exercised. Exits non-zero when the
optimized model does not match the original.
"""
from __future__ import annotations

import argparse
import sys

import torch

import effops
from effops.benchmark import device_stamp, randomize_bn, time_ms
from effops.models import VOVNET_CONFIGS, classic_vovnet


def build_model(name: str, v2: bool = False) -> torch.nn.Module:
    if name in VOVNET_CONFIGS:
        return classic_vovnet(name, v2=v2)
    if v2:
        raise SystemExit(f"--v2 applies to the built-in VoVNets ({', '.join(VOVNET_CONFIGS)}), not {name!r}")
    try:
        import timm
    except ImportError:
        raise SystemExit(f"{name!r} is not a built-in model ({', '.join(VOVNET_CONFIGS)}) and timm is not installed")
    return timm.create_model(name, pretrained=False)


def info_main(argv=None) -> int:
    """``python -m effops info``: every op's backends with their reasons on each device, cuDNN,
    versions, and the tuning files with the implementation chosen per problem."""
    p = argparse.ArgumentParser(prog="effops info", description=info_main.__doc__)
    p.add_argument("--json", action="store_true", help="print effops.info() as JSON")
    args = p.parse_args(argv)
    from effops.diagnostics import format_info, info

    data = info()
    if args.json:
        import json

        print(json.dumps(data, indent=1, default=str))
    else:
        print(format_info(data))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["info"]:
        return info_main(argv[1:])
    p = argparse.ArgumentParser(prog="effops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vovnet27_slim", help="vovnet27_slim | vovnet39 | vovnet57 | any timm model name")
    p.add_argument("--batch", type=int, default=None, help="default: 32 on CUDA, 1 on CPU")
    p.add_argument("--size", type=int, default=None, help="input resolution (default: 224 on CUDA, 128 on CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--v2", action="store_true", help="VoVNetV2 form of a built-in VoVNet (eSE on each stage's last block)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = p.parse_args(argv)

    dev = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                       ("cpu" if args.device == "auto" else args.device))
    on_cuda = dev.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.float16 if on_cuda else torch.float32)
    batch = args.batch or (32 if on_cuda else 1)
    size = args.size or (224 if on_cuda else 128)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    torch.manual_seed(0)
    model = build_model(args.model, args.v2).eval()
    randomize_bn(model)
    fast = effops.optimize(model)
    rep = fast.effops_report
    n_osa = sum(e.what.startswith("OSA") for e in rep.swapped)
    n_pool = sum(e.what.startswith("max pool") for e in rep.swapped)
    n_linear = sum(e.what.startswith("linear") for e in rep.swapped)
    print(f"model {args.model}: {len(rep.swapped)} blocks swapped ({n_osa} OSA, "
          f"{len(rep.swapped) - n_osa - n_pool - n_linear} conv+BN+act, {n_pool} max pool, {n_linear} linear), "
          f"{len(rep.skipped)} skipped")
    for e in rep.skipped[:10]:
        print(f"  skipped {e.path}: {e.what}")

    x32 = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        # fp64 on CPU is the oracle for both the eager model and effops in the run dtype.
        ref = model.double()(x32.double()).float()
        model = model.float()
        model.to(dev, dtype).to(memory_format=torch.channels_last)
        fast.to(dev, dtype).to(memory_format=torch.channels_last)
        x = x32.to(dev, dtype).contiguous(memory_format=torch.channels_last)
        y_eager = model(x).float().cpu()
        y_fast = fast(x).float().cpu()
    # The first eval call ran the speed check (CPU): blocks measured slower than the original are kept as they were.
    print(f"speed check: {rep.speed_check}")
    for m in rep.measured:
        if m.kept == "original":
            print(f"  kept the original {m.path}: {m}")
    err_eager = (y_eager - ref).abs().max().item()
    err_fast = (y_fast - ref).abs().max().item()
    scale = ref.abs().max().item()
    tol = 2 * err_eager + 1e-5 * scale
    ok = err_fast <= tol
    print(f"max |error| vs fp64 reference: effops {err_fast:.3e}, eager {err_eager:.3e} "
          f"(|ref| max {scale:.3e}) -> {'MATCH' if ok else 'MISMATCH'}")

    stamp = device_stamp(dev)
    print(f"\n{stamp['device']} | torch {stamp['torch']} | triton {stamp['triton']} | {dtype} | "
          f"batch {batch} | {size}x{size} | channels_last")
    rows = []
    with torch.inference_mode():
        t_eager = time_ms(lambda: model(x), dev)
        rows.append(("eager", t_eager))
        if not args.no_compile:
            compiled = torch.compile(model)
            rows.append(("torch.compile", time_ms(lambda: compiled(x), dev)))
        rows.append(("effops", time_ms(lambda: fast(x), dev)))
        if not args.no_compile:
            fast_compiled = torch.compile(fast)  # effops ops stay opaque; inductor fuses the rest
            rows.append(("effops+compile", time_ms(lambda: fast_compiled(x), dev)))
        if on_cuda:
            # Replaying a captured CUDA graph removes host (Python) overhead: device time only.
            rows.append(("eager, CUDA graph", time_ms(lambda: model(x), dev, cuda_graph=True)))
            rows.append(("effops, CUDA graph", time_ms(lambda: fast(x), dev, cuda_graph=True)))
    w = torch.empty(1, 3, 1, 1, device=dev, dtype=dtype)
    backend = effops.dispatch.select("conv_bn_act", x, w, None, None, None, None).name
    print(f"{'provider':<20}{'ms / forward':>14}{'speedup':>10}")
    for name, ms in rows:
        print(f"{name:<20}{ms:>14.3f}{t_eager / ms:>9.2f}x")
    print(f"(effops backend: {backend}; times are {'CUDA medians' if on_cuda else 'CPU wall-clock medians'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
