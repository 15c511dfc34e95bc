"""The tile tuner every Triton launcher uses: time the candidate tiles of a problem once,
cache the fastest, launch it directly afterwards.

    cfg = tuning.pick(key, launch, heuristic, candidates, x.device)
    launch(cfg)

Rules of :func:`pick`, in order:

* ``EFFOPS_AUTOTUNE=0``: ``heuristic()``, nothing timed or cached (tests, reproducible start-up);
* during CUDA-graph capture nothing may be benchmarked: the tile tuned earlier for the key
  (warm up before capturing to get it), else ``heuristic()``;
* otherwise the cached tile, or the candidates are timed now (once per key and device kind).

The cache key is ``(device kind, key)``: two GPUs of different models never share a tile.
Launchers put :func:`bucket` of their pixel counts into ``key``, never the exact count, so a
new batch size or resolution in the same bucket reuses the tuned tile. The cache holds at
most ``MAX_ENTRIES`` keys and forgets the least recently used. Cache hits take no lock;
tuning holds one lock, so two threads never time the same key (or one GPU) at once.

We keep our own tuner rather than ``triton.autotune``: its per-call Python work cost more
than a small conv (see docs/architecture.md).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Callable, Hashable, Iterable, List, Optional, Union

import torch

MAX_ENTRIES = 1024

Config = dict
Timer = Callable[[Callable[[], object]], float]

_CACHE: "OrderedDict[tuple, Config]" = OrderedDict()  # (device kind, key) -> tuned config, LRU order
_LOCK = threading.Lock()  # held while tuning: one benchmark at a time, in this process
_KINDS: dict = {}  # (device type, index) -> device kind, looked up once per device


def do_bench(fn: Callable[[], object]) -> float:
    """The default timer: Triton's ``do_bench`` (ms), imported here so effops imports without Triton."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20)


def bucket(n: int) -> int:
    """``n`` rounded up to the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (``2**k`` and ``3 * 2**k``).

    Half-octave steps rather than powers of two: the best tile of a pixel-heavy problem
    turns on how many row tiles fill the GPU's SMs (a new wave costs a whole tile's time),
    and a factor of 2 in pixels doubles the tile count, enough to flip the choice near a
    wave boundary; within a bucket the count changes by at most 1.5x. It costs about twice
    as many tunings as powers of two (each ~0.3 s: the compiled kernels are reused, pixel
    counts aren't constexprs), still only ~2 per octave of batch size times resolution.
    Also, for a per-image pixel count ``hw`` the number of ``BLOCK_M``-row tiles
    ``cdiv(hw, BLOCK_M)`` is the same for every ``hw`` in a bucket whenever the power-of-two
    ``BLOCK_M >= bucket(hw) / 4``, which the OSA aggregation's per-image tiling relies on.
    """
    if n <= 2:
        return max(n, 0)
    p = 1 << (n - 1).bit_length()  # next power of two >= n
    return p * 3 // 4 if n <= p * 3 // 4 else p


def device_kind(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3 sm_90"`` for a CUDA device, the device type otherwise (the
    interpreter's CPU tensors reach the tuner only in tests). Memoised per device."""
    slot = (device.type, device.index)
    kind = _KINDS.get(slot)
    if kind is None:
        kind = _KINDS[slot] = _describe(device)
    return kind


def _describe(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"


def _capturing(device: torch.device) -> bool:
    # Only CUDA streams capture; asking on a machine without a usable driver would raise.
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cached(full_key) -> Optional[Config]:
    cfg = _CACHE.get(full_key)
    if cfg is not None:
        try:
            _CACHE.move_to_end(full_key)  # most recently used
        except KeyError:  # evicted by another thread in between: the config is still good
            pass
    return cfg


def pick(key: Hashable, launch: Callable[[Config], object], heuristic: Callable[[], Config],
         candidates: Union[Iterable[Config], Callable[[], Iterable[Config]]], device: torch.device, *,
         choose: Optional[Callable[[List[Config]], Config]] = None, timer: Optional[Timer] = None) -> Config:
    """The tile for one launch (rules in the module docstring).

    ``launch(cfg)`` runs the kernel with the problem's real sizes; ``candidates`` is a list,
    or a function returning one (called only when tuning). Candidates that raise (e.g. out
    of shared memory on this GPU) are skipped; RuntimeError if none runs. ``choose`` gets
    the candidates that ran, fastest first, and returns the config to cache (default: the
    fastest). ``timer(fn) -> ms`` defaults to :func:`do_bench`.
    """
    if os.environ.get("EFFOPS_AUTOTUNE", "1") == "0":
        return heuristic()
    full_key = (device_kind(device), key)
    cfg = _cached(full_key)
    if cfg is not None:
        return cfg
    if _capturing(device):
        return heuristic()
    with _LOCK:
        cfg = _CACHE.get(full_key)  # another thread may have tuned it while we waited
        if cfg is None:
            cfg = _tune(full_key, launch, candidates, choose, timer or do_bench)
            _CACHE[full_key] = cfg
            while len(_CACHE) > MAX_ENTRIES:
                _CACHE.popitem(last=False)  # least recently used
    return cfg


def _tune(full_key, launch, candidates, choose, timer) -> Config:
    if callable(candidates):
        candidates = candidates()
    timed = []
    for cand in candidates:
        try:
            timed.append((timer(lambda: launch(cand)), len(timed), cand))
        except Exception:  # e.g. out of shared memory for this tile on this GPU
            continue
    if not timed:
        raise RuntimeError(f"no kernel config could run for problem {full_key}")
    ranked = [cand for _, _, cand in sorted(timed, key=lambda t: t[:2])]  # ties: the earlier candidate
    return choose(ranked) if choose is not None else ranked[0]


def clear() -> None:
    """Forget every tuned tile (the next call of each problem times its candidates again)."""
    with _LOCK:
        _CACHE.clear()
