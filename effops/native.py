"""The native CPU backend: a C++ extension built from ``csrc/`` (see docs/architecture.md).

Where the compiled module comes from, first match wins:

1. ``effops._native``, built ahead of time by ``EFFOPS_BUILD_NATIVE=1 pip install -e .``, if it
   was built against the torch version that is running;
2. a just-in-time build of ``csrc/*.cpp`` with ninja (``torch.utils.cpp_extension.load``),
   compiled for this machine's CPU (``-march=native``) into
   ``$EFFOPS_NATIVE_CACHE`` (default ``~/.cache/effops/native``)/``torch-<version>-<hash>``, the
   hash covering the sources, the flags and the CPU's feature flags, so that a new torch, new
   sources or another CPU get a fresh build and an unchanged one loads in a second.

Nothing is built at import: :func:`module` builds (about a minute on 2 cores) on first use, i.e.
the first CPU op that would run natively. If the build fails, or ``EFFOPS_NATIVE=0`` is set,
effops warns once with the reason and CPU ops run the PyTorch reference; :func:`status` and
``python -m effops info`` say why.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

_LOCK = threading.Lock()
_STATE: dict = {"tried": False, "module": None, "reason": "not loaded yet", "origin": None}

# Compiler flags of both build paths. -fopenmp: ATen's at::parallel_for is an inline OpenMP
# region in this torch build; without the flag it compiles to a serial loop. The extension then
# shares torch's libgomp (same SONAME), so torch.set_num_threads governs it.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-DNDEBUG"]
LDFLAGS = ["-fopenmp"]


def source_dir() -> Optional[Path]:
    """``csrc/`` of a source checkout (editable installs and clones), or None."""
    d = Path(__file__).resolve().parent.parent / "csrc"
    return d if (d / "native.h").is_file() else None


def sources() -> list:
    d = source_dir()
    return [] if d is None else sorted(str(p) for p in d.glob("*.cpp"))


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cache_root() -> Path:
    return Path(os.environ.get("EFFOPS_NATIVE_CACHE", Path.home() / ".cache" / "effops" / "native"))


def _build_dir(srcs: list) -> Path:
    h = hashlib.sha256()
    for s in srcs + [str(p) for p in Path(srcs[0]).parent.glob("*.h")]:
        h.update(Path(s).name.encode())
        h.update(Path(s).read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(_cpu_flags().encode())
    return cache_root() / f"torch-{torch.__version__.replace('+', '_')}-{h.hexdigest()[:12]}"


def _load_prebuilt():
    try:
        from . import _native  # type: ignore[attr-defined]
    except ImportError as e:
        return None, f"no prebuilt effops._native ({e})"
    if getattr(_native, "torch_version", None) != torch.__version__.split("+")[0]:
        return None, (f"effops._native was built for torch {getattr(_native, 'torch_version', '?')}, "
                      f"this is torch {torch.__version__}")
    return _native, None


def _load_jit():
    srcs = sources()
    if not srcs:
        return None, "csrc/ sources are not present (installed without them and no prebuilt effops._native)"
    import logging

    # Importing cpp_extension logs "No CUDA runtime is found" on CPU-only machines: not our case.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)

    build_dir = _build_dir(srcs)
    _STATE["build_id"] = build_dir.name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        mod = cpp_extension.load(name="effops_native", sources=srcs, extra_cflags=CFLAGS,
                                 extra_ldflags=LDFLAGS, build_directory=str(build_dir), verbose=False)
    except Exception as e:  # a missing compiler or ninja, a compile error: report it and go on
        msg = " ".join(str(e).split())
        return None, f"building csrc/ failed: {type(e).__name__}: {msg[:500]}"
    return mod, None


def _apply_policies(mod) -> None:
    """Per-process choices from the environment: ``EFFOPS_WINOGRAD=0`` runs every 3x3 conv on
    oneDNN (no Winograd F(4x4, 3x3), whose float32 rounding error is about 10x a direct conv's),
    ``=1`` runs Winograd wherever it applies, unset or ``2`` chooses per problem by measurement."""
    raw = os.environ.get("EFFOPS_WINOGRAD", "").strip()
    if raw:
        if raw not in ("0", "1", "2"):
            raise ValueError(f"EFFOPS_WINOGRAD must be 0 (oneDNN), 1 (Winograd) or 2 (measured), got {raw!r}")
        mod.set_winograd_policy(int(raw))


def module():
    """The compiled extension (building it on first call), or None when it can't be had."""
    if _STATE["tried"]:
        return _STATE["module"]
    with _LOCK:
        if _STATE["tried"]:
            return _STATE["module"]
        mod, why, origin = None, None, None
        if os.environ.get("EFFOPS_NATIVE", "1").strip() == "0":
            why = "disabled by EFFOPS_NATIVE=0"
        else:
            mod, why_pre = _load_prebuilt()
            origin = "prebuilt effops._native"
            if mod is None:
                mod, why = _load_jit()
                origin = "just-in-time build of csrc/"
                if mod is None:
                    why = f"{why_pre}; {why}"
        if mod is not None:
            _apply_policies(mod)
            if origin.startswith("prebuilt"):
                _STATE["build_id"] = f"prebuilt-{torch.__version__}-{mod.build_info()}"
        _STATE.update(tried=True, module=mod, reason=why or "", origin=origin if mod is not None else None)
        if mod is not None:
            load_choices()
        if mod is None and why != "disabled by EFFOPS_NATIVE=0":
            warnings.warn(f"effops: the native CPU backend is unavailable, CPU ops run the PyTorch reference: {why}",
                          RuntimeWarning, stacklevel=3)
        return mod


def status(load: bool = True) -> Tuple[bool, str]:
    """``(usable, detail)``: whether the native backend runs here, and where it came from or why
    not. ``load=False`` reports without building."""
    if load:
        module()
    if _STATE["module"] is not None:
        return True, f"{_STATE['origin']} ({_STATE['module'].build_info()})"
    return False, _STATE["reason"]


def available() -> bool:
    return module() is not None


# -- measured choices in the tuning file -------------------------------------------------------
# The native convs choose an implementation per problem by timing the candidates on the first call
# (Winograd or GEMM vs oneDNN, concat-free aggregation vs concat, banded depthwise -> 1x1 pairs).
# The choices go into the CPU tuning file (effops.tuning, keyed by this build of csrc/) so later
# processes make the same ones without timing them: no first-call measurements, and runs that
# compare two ways of calling the same kernels (eager vs torch.compile) run the same kernels.
_CHOICE_TAG = "native-choice"
_CHOICE_KIND = "cpu"


def _choice_key(table: str, flat) -> str:
    from . import tuning

    return tuning.encode_key((_CHOICE_TAG, _STATE.get("build_id", "?"), table, tuple(flat)))


def load_choices() -> int:
    """Give the native backend the choices this build stored in the tuning file (called when it
    loads; again after ``effops.tuning.load``). Returns the number taken."""
    import ast

    from . import tuning

    mod = _STATE["module"]
    if mod is None:
        return 0
    head = repr((_CHOICE_TAG, _STATE.get("build_id", "?")))[:-1] + ","
    rows = []
    for key, cfg in tuning.stored(_CHOICE_KIND).items():
        if not key.startswith(head):
            continue
        try:
            _, _, table, flat = ast.literal_eval(key)
            rows.append((str(table), [int(v) for v in flat], bool(cfg["faster"])))
        except (ValueError, SyntaxError, TypeError, KeyError):
            continue  # not a row this version wrote
    n = mod.add_measured_choices(rows) if rows else 0
    _STATE["saved"] = {_choice_key(t, f) for t, f, _ in mod.measured_choices()}
    return n


def save_choices() -> int:
    """Write the choices measured since the last save to the tuning file (``effops.optimize`` and
    process exit call it). Returns the number written."""
    from . import tuning

    mod = _STATE["module"]
    if mod is None:
        return 0
    saved = _STATE.setdefault("saved", set())
    new = {}
    for table, flat, faster in mod.measured_choices():
        key = _choice_key(table, flat)
        if key not in saved:
            new[key] = {"faster": bool(faster), "NATIVE": _chosen(table, flat, faster)}
    if new:
        tuning.remember(_CHOICE_KIND, new)
        saved.update(new)
    return len(new)


def _chosen(table: str, flat, faster: bool) -> str:
    """What a measured choice runs, in words (``python -m effops info`` lists it)."""
    if table == "alt":
        alt = {2: "GEMM", 3: "Winograd F(4x4, 3x3)", 4: "direct small-channel conv"}.get(flat[0] if flat else -1,
                                                                                      "effops kernel")
        return f"{alt} (measured faster than oneDNN)" if faster else f"oneDNN (measured faster than {alt})"
    if table == "segments":
        return "concat-free aggregation GEMMs" if faster else "concat + 1x1 conv (measured 10% faster)"
    if table == "dw_pair":
        return "banded depthwise -> 1x1 pair" if faster else "depthwise, then the 1x1 conv"
    return "faster" if faster else "slower"


atexit.register(save_choices)


def refresh() -> None:
    """Drop every cached BN-folded, prepacked weight, so the next calls rebuild them from the
    parameters as they are now. Needed only after writes PyTorch does not count as a change
    (``param.data.mul_()``, numpy or DLPack writes); in-place ops, optimizer steps and
    ``param.data = t`` are seen without it."""
    mod = _STATE["module"]
    if mod is not None:
        mod.clear_weight_cache()


def _reset_for_tests() -> None:
    with _LOCK:
        _STATE.update(tried=False, module=None, reason="not loaded yet", origin=None)
