"""Backend registry: which implementation runs an op, and why not the others.

Each op registers one implementation per backend together with a ``supports``
function that returns the *reasons* it cannot take a given input (an empty list
means it can). Selection walks ``BACKEND_ORDER`` (native > triton > reference)
and takes the first backend with no reasons; ``reference`` is registered for
every op and takes everything, so automatic selection never fails.

``native`` (the C++ extension of ``csrc/``) takes CPU tensors; ``triton`` takes CUDA
tensors, and CPU tensors under ``TRITON_INTERPRET=1`` only when asked for: forced, or
preferred with ``EFFOPS_CPU_BACKEND=triton`` (the test suite's setting, which puts
triton before native for CPU tensors).

A user may force a backend with the :func:`use_backend` context manager or the
``EFFOPS_BACKEND`` environment variable (the context manager wins). A forced
backend that cannot run raises :class:`BackendUnavailable` listing its reasons;
it never falls back silently.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

BACKEND_ORDER = ("native", "triton", "reference")
# Which backend CPU tensors prefer when none is forced: "native" (default) or "triton" (the
# Triton interpreter, for testing the Triton kernels on a machine without a GPU).
CPU_PREFERENCE = os.environ.get("EFFOPS_CPU_BACKEND", "").strip() or "native"
if CPU_PREFERENCE not in ("native", "triton"):
    raise ValueError(f"EFFOPS_CPU_BACKEND={CPU_PREFERENCE!r}; expected native or triton")
_ORDER = BACKEND_ORDER if CPU_PREFERENCE == "native" else ("triton", "native", "reference")


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given input (the message lists why)."""


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable
    supports: Callable[..., List[str]]


_REGISTRY: Dict[str, Dict[str, Backend]] = {}
_FORCED: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("effops_backend", default=None)


def _no_reasons(*args, **kwargs) -> List[str]:
    return []


def register(op: str, backend: str, supports: Optional[Callable[..., List[str]]] = None):
    """Decorator: register ``fn`` as ``op``'s implementation on ``backend``.

    ``supports(*args, **kwargs)`` receives the same arguments as ``fn``.
    """
    if backend not in BACKEND_ORDER:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_ORDER}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = Backend(backend, fn, supports or _no_reasons)
        return fn

    return deco


def _check_name(name: str) -> str:
    if name not in BACKEND_ORDER:
        raise ValueError(f"unknown effops backend {name!r}; expected one of {', '.join(BACKEND_ORDER)}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force every effops op inside the block onto backend ``name``
    (``"native"``, ``"triton"`` or ``"reference"``; ``None`` restores automatic choice)."""
    token = _FORCED.set(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _FORCED.reset(token)


# Every fused module's eager fast path asks native_first(), from cold caches after the previous
# kernel. ``os.environ.get`` runs _Environ's Python-level __getitem__ and key encoding (about 12 µs
# cold, 0.5 µs warm, against tens of ns for one lookup in the dict behind it), so POSIX CPython's
# ``os.environ._data`` (the live bytes mapping its __setitem__ / __delitem__ update) is read where
# it exists and os.environ is still that object.
_ENV_NAME = "EFFOPS_BACKEND"
_ENVIRON = os.environ
_ENV_DATA = getattr(_ENVIRON, "_data", None)
_ENV_KEY = _ENVIRON.encodekey(_ENV_NAME) if isinstance(_ENV_DATA, dict) and hasattr(_ENVIRON, "encodekey") else None


def _env_backend() -> str:
    if _ENV_KEY is not None and os.environ is _ENVIRON:
        raw = _ENV_DATA.get(_ENV_KEY)
        return "" if raw is None else _ENVIRON.decodevalue(raw)
    return os.environ.get(_ENV_NAME, "")


def forced_backend() -> Optional[str]:
    name = _FORCED.get()
    if name is None:
        env = _env_backend().strip()
        name = _check_name(env) if env else None
    return name


def triton_on_cpu_allowed() -> bool:
    """Whether CPU tensors may run the Triton interpreter: when forced or preferred."""
    return CPU_PREFERENCE == "triton" or forced_backend() == "triton"


def native_first() -> bool:
    """Whether CPU tensors go to the native backend first (it is preferred or forced)."""
    forced = forced_backend()
    return forced == "native" or (forced is None and CPU_PREFERENCE == "native")


def reasons(op: str, *args, **kwargs) -> Dict[str, List[str]]:
    """For every backend, the reasons it cannot run ``op`` on these arguments."""
    impls = _REGISTRY.get(op, {})
    out = {}
    for name in BACKEND_ORDER:
        if name not in impls:
            out[name] = [f"no {name} implementation of {op} is registered"]
        else:
            out[name] = list(impls[name].supports(*args, **kwargs))
    return out


def select(op: str, *args, **kwargs) -> Backend:
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"effops op {op!r} is not registered")
    forced = forced_backend()
    if forced is not None:
        why = reasons(op, *args, **kwargs)[forced]
        if why:
            raise BackendUnavailable(f"effops backend {forced!r} cannot run {op}: " + "; ".join(why))
        return impls[forced]
    for name in _ORDER:
        b = impls.get(name)
        if b is not None and not b.supports(*args, **kwargs):
            return b
    raise BackendUnavailable(f"no effops backend can run {op}: {reasons(op, *args, **kwargs)}")


def run(op: str, *args, **kwargs):
    """Run ``op`` on the selected backend."""
    return select(op, *args, **kwargs).run(*args, **kwargs)
