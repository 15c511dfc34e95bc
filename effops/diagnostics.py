"""Which implementation runs here, and why: ``effops.info()`` and ``python -m effops info``.

For every registered op (:mod:`effops.dispatch`) and every device present (the CPU, each
CUDA device), the reasons each backend gives for a small probe input; whether the tuner
offers cuDNN candidates there; versions; and the tuning files with the implementation
chosen for every problem they hold. Reading it has no side effects on effops' state:
nothing is tuned and no tuning file is loaded into the process.
"""
from __future__ import annotations

import glob
import os
import platform
from typing import Callable, Dict, List, Optional

import torch

from . import dispatch, tuning

__all__ = ["info", "format_info"]


def _conv_probe(x: torch.Tensor) -> tuple:
    c = x.shape[1]
    w = torch.randn(c, c, 3, 3, device=x.device, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    s = torch.ones(c, device=x.device)
    return (x, w, s, s, None, None, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, False)


def _osa_probe(x: torch.Tensor) -> tuple:
    c = x.shape[1]
    w3 = torch.randn(c, c, 3, 3, device=x.device, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    agg = torch.randn(c, 3 * c, 1, 1, device=x.device, dtype=x.dtype)
    s = torch.ones(c, device=x.device)
    return (x, None, None, None, [], [w3, w3], [s, s], [s, s], agg, s, s, None, None, False, "relu", 0.0)


def _aggregate_probe(x: torch.Tensor) -> tuple:
    c = x.shape[1]
    agg = torch.randn(c, 2 * c, 1, 1, device=x.device, dtype=x.dtype)
    s = torch.ones(c, device=x.device)
    return ([x, x], agg, s, s, None, None, None, None, "relu", 0.0)


def _shuffle_probe(x: torch.Tensor) -> tuple:
    return (x, 4, None)


def _se_gate_probe(x: torch.Tensor) -> tuple:
    c = x.shape[1]
    rw = torch.randn(c // 4, c, 1, 1, device=x.device, dtype=x.dtype)
    ew = torch.randn(c, c // 4, 1, 1, device=x.device, dtype=x.dtype)
    return (x, rw, None, ew, None, "relu", 0.0, "sigmoid", 0.0)


def _se_apply_probe(x: torch.Tensor) -> tuple:
    return (x, torch.rand(x.shape[0], x.shape[1], device=x.device), x, None, "relu", 0.0)


# Probe arguments per registered op: a 16-channel 3x3 conv (+ BN + ReLU), a two-stage OSA block,
# a 1x1 aggregation of two 16-channel segments, a 4-group channel shuffle, a 16 -> 4 -> 16
# squeeze-excite gate and its application with a residual and ReLU.
PROBES: Dict[str, Callable[[torch.Tensor], tuple]] = {"conv_bn_act": _conv_probe, "osa_block": _osa_probe,
                                                      "aggregate": _aggregate_probe,
                                                      "channel_shuffle": _shuffle_probe,
                                                      "se_gate": _se_gate_probe, "se_apply": _se_apply_probe}


def _devices() -> List[torch.device]:
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devs


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"{torch.cuda.get_device_name(dev)} (sm_{major}{minor})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _probe_input(dev: torch.device) -> torch.Tensor:
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    return torch.randn(2, 16, 8, 8, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _entries(entries: Dict[str, dict]) -> List[dict]:
    return [{"key": k, "implementation": tuning.describe(c), "config": c} for k, c in entries.items()]


def _file_record(path: str, current: bool) -> dict:
    rec = {"path": path, "exists": os.path.exists(path), "current": current, "entries": 0, "problems": []}
    if not rec["exists"]:
        return rec
    try:
        kinds = tuning.read_file(path)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    rec["device_kinds"] = sorted(kinds)
    for kind, entries in kinds.items():
        rec["problems"] += [dict(e, device_kind=kind) for e in _entries(entries)]
    rec["entries"] = len(rec["problems"])
    return rec


def info() -> dict:
    """What runs where, as a dict:

    * ``versions``: effops, torch, triton, cuda, cudnn (``None`` where absent);
    * ``devices``: ``[{"device", "name", "kind"}]`` (``kind``: the tuner's device kind);
    * ``interpreter``: whether Triton's interpreter is on (``TRITON_INTERPRET=1``);
    * ``backend_order`` and ``forced_backend`` (``effops.use_backend`` / ``EFFOPS_BACKEND``);
    * ``backends``: ``{op: {device: {backend: {"usable": bool, "reasons": [...]}}}}`` for the
      probe input of each op (``probe``: what it is);
    * ``vendor``: ``{device: {"cudnn": {"usable", "reasons"}}}``: whether the tuner offers
      cuDNN candidates for convs there;
    * ``tuning``: ``autotune`` (``EFFOPS_AUTOTUNE``), ``file_cache`` (``EFFOPS_TUNING_CACHE``),
      ``cache_dir``, ``path`` (this device's tuning file), ``files`` (the files of the CUDA
      devices present, else the CPU's, and every ``tuning-*.json`` in the cache directory:
      ``path``, ``exists``, ``current`` (named for this torch and Triton), ``entries``,
      ``problems``), and ``in_memory`` (problems tuned or loaded in this
      process); each problem is ``{"device_kind", "key", "implementation", "config"}``.
    """
    from . import __version__
    from .ops import conv

    v = tuning.versions()
    devices = _devices()
    data: dict = {
        "versions": {
            "effops": __version__, "torch": v["torch"], "triton": None if v["triton"] == "none" else v["triton"],
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        },
        "devices": [{"device": str(d), "name": _device_name(d), "kind": tuning.device_kind(d)} for d in devices],
        "interpreter": bool(getattr(conv, "INTERPRETED", False)),
        "backend_order": list(dispatch.BACKEND_ORDER),
        "cpu_preference": dispatch.CPU_PREFERENCE,
        "native": _native_record(),
        "forced_backend": _forced(),
        "probe": "a 3x3 conv + BN + ReLU (conv_bn_act), a two-stage OSA block (osa_block), a 1x1 "
                 "aggregation of two segments (aggregate), a 4-group shuffle (channel_shuffle), a 16→4→16 "
                 "squeeze-excite gate (se_gate) and its application with a residual and ReLU (se_apply) of a "
                 "[2, 16, 8, 8] channels_last input, float16 on CUDA, float32 on the CPU, and a RepVGG "
                 "3x3 + 1x1 + identity branch merge (reparam_merge)",
        "backends": {},
        "vendor": {},
    }
    for op in sorted(dispatch._REGISTRY):
        per_dev = data["backends"][op] = {}
        for d in devices:
            probe = PROBES.get(op)
            if probe is None:
                per_dev[str(d)] = {b: {"usable": None, "reasons": ["no probe input for this op"]}
                                   for b in dispatch.BACKEND_ORDER}
                continue
            try:
                why = dispatch.reasons(op, *probe(_probe_input(d)))
            except Exception as e:  # noqa: BLE001 - a probe that no longer fits the op: reported, not raised
                per_dev[str(d)] = {b: {"usable": None, "reasons": [f"probe failed: {type(e).__name__}: {e}"]}
                                   for b in dispatch.BACKEND_ORDER}
                continue
            per_dev[str(d)] = {b: {"usable": not r, "reasons": r} for b, r in why.items()}
    for d in devices:
        r = conv.vendor_reasons(_probe_input(d))
        data["vendor"][str(d)] = {"cudnn": {"usable": not r, "reasons": r}}

    # The tuner runs on CUDA devices (CPU tensors reach it only in tests): their files, else the CPU's.
    current = tuning.cache_path()
    paths = [tuning.cache_path(d) for d in devices if d.type == "cuda"] or [current]
    paths += sorted(glob.glob(os.path.join(tuning.cache_dir(), "tuning-*.json")))
    suffix = tuning.cache_path("x")[len(os.path.join(tuning.cache_dir(), "tuning-x")):]  # -torch<v>-triton<v>.json
    files = [_file_record(p, p.endswith(suffix)) for p in dict.fromkeys(paths)]
    data["tuning"] = {
        "autotune": os.environ.get("EFFOPS_AUTOTUNE", "1") != "0",
        "file_cache": tuning.file_cache_enabled(),
        "cache_dir": tuning.cache_dir(),
        "path": current,
        "files": files,
        "in_memory": [dict(e, device_kind=kind) for kind, entries in tuning.entries().items()
                      for e in _entries(entries)],
    }
    return data


def _native_record() -> dict:
    """The native CPU backend: whether it is usable (building it if this process hasn't yet), and
    where it came from or why not."""
    from . import native

    usable, detail = native.status()
    rec = {"usable": usable, "detail": detail, "build_cache": str(native.cache_root())}
    if usable:
        mod = native.module()
        rec["cached_weights"] = int(mod.weight_cache_size())
    return rec


def _forced() -> Optional[str]:
    try:
        return dispatch.forced_backend()
    except ValueError as e:  # an invalid EFFOPS_BACKEND: reported, not raised
        return f"invalid: {e}"


def format_info(data: Optional[dict] = None) -> str:
    """:func:`info` as the text ``python -m effops info`` prints."""
    data = info() if data is None else data
    v = data["versions"]
    lines = [" | ".join(f"{k} {v[k] if v[k] is not None else 'none'}" for k in ("effops", "torch", "triton", "cuda",
                                                                              "cudnn"))]
    lines.append(f"Triton interpreter: {'on (TRITON_INTERPRET=1)' if data['interpreter'] else 'off'}; "
                 f"backends tried in order {' > '.join(data['backend_order'])}"
                 + (f"; forced: {data['forced_backend']}" if data["forced_backend"] else ""))
    nat = data["native"]
    lines.append(f"native CPU backend: {'usable' if nat['usable'] else 'not usable'}: {nat['detail']}; "
                 f"CPU tensors prefer {data['cpu_preference']} (EFFOPS_CPU_BACKEND)")
    lines.append("devices:")
    for d in data["devices"]:
        lines.append(f"  {d['device']}: {d['name']}")
    lines.append(f"backends, for {data['probe']}:")
    for op, per_dev in data["backends"].items():
        for dev, backends in per_dev.items():
            lines.append(f"  {op} on {dev}:")
            for name, b in backends.items():
                state = "usable" if b["usable"] else ("unknown" if b["usable"] is None else "not usable")
                lines.append(f"    {name:<10} {state}" + (f": {'; '.join(b['reasons'])}" if b["reasons"] else ""))
    for dev, vend in data["vendor"].items():
        c = vend["cudnn"]
        lines.append(f"  cuDNN candidates in the conv tuner on {dev}: "
                     + ("offered" if c["usable"] else "not offered: " + "; ".join(c["reasons"])))
    t = data["tuning"]
    lines.append(f"tuning: autotune {'on' if t['autotune'] else 'off (EFFOPS_AUTOTUNE=0)'}; tuning files "
                 f"{'on' if t['file_cache'] else 'off (EFFOPS_TUNING_CACHE=0)'}; cache dir {t['cache_dir']}")
    for f in t["files"]:
        tag = "this device" if f["path"] == t["path"] else (
            "these torch / Triton versions" if f["current"] else "other torch / Triton versions")
        if not f["exists"]:
            lines.append(f"  {f['path']} ({tag}): no file")
            continue
        if "error" in f:
            lines.append(f"  {f['path']} ({tag}): unreadable: {f['error']}")
            continue
        lines.append(f"  {f['path']} ({tag}): {f['entries']} entries")
        for p in f["problems"]:
            lines.append(f"    [{p['device_kind']}] {p['key']}: {p['implementation']}")
    lines.append(f"  in memory (this process): {len(t['in_memory'])} entries")
    for p in t["in_memory"]:
        lines.append(f"    [{p['device_kind']}] {p['key']}: {p['implementation']}")
    return "\n".join(lines)
