"""The tuner every launcher uses: time the candidates of a problem once (Triton tiles, and
for the conv launcher cuDNN too), cache the fastest, launch it directly afterwards.

    cfg = tuning.pick(key, launch, heuristic, candidates, x.device)
    launch(cfg)

Rules of :func:`pick`, in order:

* ``EFFOPS_AUTOTUNE=0``: ``heuristic()``, nothing timed, cached or read from a file (tests,
  reproducible start-up);
* the cached config, else the one stored for the key in the device kind's tuning file;
* during CUDA-graph capture nothing may be benchmarked: ``heuristic()`` (warm up before
  capturing to get the tuned config);
* otherwise the candidates are timed now (once per key and device kind).

The cache key is ``(device kind, key)``: two GPUs of different models never share a config.
Launchers put :func:`bucket` of their pixel counts into ``key``, never the exact count, so a
new batch size or resolution in the same bucket reuses the tuned config. The cache holds at
most ``MAX_ENTRIES`` keys and forgets the least recently used. Cache hits take no lock;
tuning holds one lock, so two threads never time the same key (or one GPU) at once.

Tuning files: every device kind has one JSON file per torch and Triton version,
:func:`cache_path` (``$EFFOPS_CACHE_DIR``, default ``~/.cache/effops``). The first cache miss
of a device kind reads its file (never at import); every new tuning is written through to it
(merged with what the file holds, written to a temporary file and renamed into place; a
failed write warns once and the config stays in memory). ``EFFOPS_TUNING_CACHE=0`` turns the
file off (explicit :func:`save` / :func:`load` still work). Keys are stored as
:func:`encode_key` strings.

We keep our own tuner rather than ``triton.autotune``: its per-call Python work cost more
than a small conv (see docs/architecture.md).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import warnings
from collections import OrderedDict
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Union

import torch

MAX_ENTRIES = 1024
MAX_FILE_ENTRIES = 4096  # per device kind in a tuning file; the oldest are dropped beyond it
FILE_FORMAT = 1

Config = dict
Timer = Callable[[Callable[[], object]], float]

_CACHE: "OrderedDict[tuple, Config]" = OrderedDict()  # (device kind, key) -> tuned config, LRU order
_LOCK = threading.Lock()  # held while tuning: one benchmark at a time, in this process
_KINDS: dict = {}  # (device type, index) -> device kind, looked up once per device
# device kind -> {encode_key(key): config}: what the kind's tuning file holds (read, loaded or written
# through). Also a second level under the LRU cache: an entry evicted from _CACHE is found here again.
_STORE: "Dict[str, OrderedDict[str, Config]]" = {}
_FILE_READ: set = set()  # device kinds whose default tuning file was read (lazily, once)
_WARNED: set = set()  # tuning-file problems already warned about


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
    """The config for one launch (rules in the module docstring).

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
    cfg = _stored(full_key)
    if cfg is not None:
        return cfg
    if _capturing(device):
        return heuristic()
    with _LOCK:
        cfg = _CACHE.get(full_key)  # another thread may have tuned it while we waited
        if cfg is None:
            cfg = _tune(full_key, launch, candidates, choose, timer or do_bench)
            _insert(full_key, cfg)
            _remember(full_key, cfg)
    return cfg


def _insert(full_key, cfg: Config) -> None:
    _CACHE[full_key] = cfg
    _CACHE.move_to_end(full_key)
    while len(_CACHE) > MAX_ENTRIES:
        _CACHE.popitem(last=False)  # least recently used


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
    """Forget every tuned or loaded config in memory: the next call of each problem times its
    candidates again (and writes the new choice through to the tuning file). Tuning files are
    not touched, and a file already read is not read again automatically; :func:`load` reads it."""
    with _LOCK:
        _CACHE.clear()
        _STORE.clear()


# ----------------------------------------------------------------------------
# Tuning files
# ----------------------------------------------------------------------------
def encode_key(key: Hashable) -> str:
    """The stable text form of a problem key in tuning files: the ``repr`` of the key with
    every ``torch.dtype`` written as its name (``"torch.float16"``) and lists as tuples."""
    return repr(_plain(key))


def _plain(v):
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, (tuple, list)):
        return tuple(_plain(i) for i in v)
    return v


def file_cache_enabled() -> bool:
    """False when ``EFFOPS_TUNING_CACHE=0``: nothing is read or written automatically."""
    return os.environ.get("EFFOPS_TUNING_CACHE", "1") != "0"


def cache_dir() -> str:
    """``$EFFOPS_CACHE_DIR``, else ``~/.cache/effops``."""
    return os.environ.get("EFFOPS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "effops")


def _sanitize(s: str) -> str:
    return re.sub(r"[^a-z0-9._]+", "-", s.lower()).strip("-") or "unknown"


def versions() -> Dict[str, str]:
    """torch and Triton versions, as the tuning files' names carry them."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - exercised only where triton is absent
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version}


def cache_path(device: Union[torch.device, str, None] = None) -> str:
    """The tuning file of a device kind: ``<cache_dir()>/tuning-<kind>-torch<v>-triton<v>.json``.
    ``device``: a ``torch.device`` or a device kind string (:func:`device_kind`); default the
    current CUDA device, or ``"cpu"`` without one."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    kind = device if isinstance(device, str) else device_kind(device)
    v = versions()
    name = f"tuning-{_sanitize(kind)}-torch{_sanitize(v['torch'])}-triton{_sanitize(v['triton'])}.json"
    return os.path.join(cache_dir(), name)


def _warn_once(what: str, err: Exception) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        warnings.warn(f"effops: {what}: {err}; tuned configs stay in memory only", RuntimeWarning, stacklevel=3)


def read_file(path: str) -> Dict[str, Dict[str, Config]]:
    """``{device kind: {encoded key: config}}`` of a tuning file (ValueError if it isn't one)."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT or not isinstance(data.get("kinds"), dict):
        raise ValueError(f"{path} is not an effops tuning file of format {FILE_FORMAT}")
    kinds = {}
    for kind, entries in data["kinds"].items():
        if isinstance(entries, dict):
            kinds[kind] = {k: c for k, c in entries.items() if isinstance(k, str) and isinstance(c, dict)}
    return kinds


def _write_file(path: str, kinds: Dict[str, Dict[str, Config]]) -> None:
    """Atomic: a temporary file in the same directory, renamed over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    data = {"format": FILE_FORMAT, **versions(), "kinds": kinds}
    fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _merge(kind: str, entries: Dict[str, Config], overwrite: bool) -> None:
    store = _STORE.setdefault(kind, OrderedDict())
    for enc, cfg in entries.items():
        if overwrite or enc not in store:
            store[enc] = cfg
    while len(store) > MAX_FILE_ENTRIES:
        store.popitem(last=False)


def _read_default(kind: str) -> None:
    """Lazily, once per device kind: merge its tuning file into the store (entries already
    in memory win). Called with ``_LOCK`` held."""
    _FILE_READ.add(kind)
    path = cache_path(kind)
    if not os.path.exists(path):
        return
    try:
        entries = read_file(path).get(kind, {})
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file must not break a forward
        _warn_once(f"could not read the tuning file {path}", e)
        return
    _merge(kind, entries, overwrite=False)


def _stored(full_key) -> Optional[Config]:
    """On a cache miss: the config the device kind's tuning file (or :func:`load`) holds
    for the key, moved into the cache; None if there is none."""
    kind, key = full_key
    if kind not in _FILE_READ and file_cache_enabled():
        with _LOCK:
            if kind not in _FILE_READ:
                _read_default(kind)
    store = _STORE.get(kind)
    if not store:
        return None
    cfg = store.get(encode_key(key))
    if cfg is not None:
        with _LOCK:
            _insert(full_key, cfg)
    return cfg


def _remember(full_key, cfg: Config) -> None:
    """A new tuning (``_LOCK`` held): written through to the tuning file (and the store that mirrors it)."""
    if file_cache_enabled():
        kind, key = full_key
        _write_through(kind, {encode_key(key): cfg})


def _write_through(kind: str, new: Dict[str, Config]) -> None:
    """``new`` into ``kind``'s store and tuning file (``_LOCK`` held)."""
    _merge(kind, new, overwrite=True)
    path = cache_path(kind)
    try:
        _update_file(path, kind)
    except Exception as e:  # noqa: BLE001 - read-only home, full disk, ...: tuning still works
        _warn_once(f"could not write the tuning file {path}", e)


def _update_file(path: str, kind: str) -> None:
    """The file's entries for ``kind`` merged with the store's (the store wins), written back."""
    try:
        on_disk = read_file(path) if os.path.exists(path) else {}
    except ValueError:
        on_disk = {}  # not a tuning file of this format: replaced
    _merge(kind, on_disk.get(kind, {}), overwrite=False)
    on_disk[kind] = dict(_STORE[kind])
    _write_file(path, on_disk)


def save(path: Optional[str] = None) -> List[str]:
    """Write the tuned configs in memory. Without ``path``: each device kind's entries into
    its tuning file (:func:`cache_path`, merged with what the file holds); with ``path``:
    every kind's entries into that one file. Returns the paths written."""
    with _LOCK:
        if path is not None:
            _write_file(path, _all_entries())
            return [path]
        for kind, known in _all_entries().items():
            _merge(kind, known, overwrite=False)
        written = []
        for kind, store in list(_STORE.items()):
            if store:
                p = cache_path(kind)
                _update_file(p, kind)
                written.append(p)
        return written


def load(path: Optional[str] = None) -> int:
    """Read tuned configs into memory; the file's entries replace those in memory for the
    same problems. Without ``path``: the tuning files of this process's device kinds (the
    CUDA devices present and every kind seen so far). Returns the number of entries read.
    Raises for a ``path`` that is missing or not a tuning file."""
    with _LOCK:
        if path is not None:
            files = [(path, None)]
        else:
            kinds = set(_KINDS.values()) | set(_STORE)
            if torch.cuda.is_available():
                kinds |= {device_kind(torch.device("cuda", i)) for i in range(torch.cuda.device_count())}
            files = [(cache_path(k), k) for k in sorted(kinds) if os.path.exists(cache_path(k))]
        n = 0
        for p, only in files:
            for kind, entries in read_file(p).items():
                if only is not None and kind != only:
                    continue
                _FILE_READ.add(kind)
                _merge(kind, entries, overwrite=True)
                for full_key in [k for k in _CACHE if k[0] == kind]:  # loaded entries win over memory
                    cfg = entries.get(encode_key(full_key[1]))
                    if cfg is not None:
                        _CACHE[full_key] = cfg
                n += len(entries)
    from . import native

    native.load_choices()  # the native backend's measured choices among them
    return n


def stored(kind: str) -> Dict[str, Config]:
    """``{encoded key: config}`` for device kind ``kind``: its tuning file's entries (read once, as
    a cache miss would) with what was tuned or loaded here. Empty under ``EFFOPS_AUTOTUNE=0``."""
    if os.environ.get("EFFOPS_AUTOTUNE", "1") == "0":
        return {}
    with _LOCK:
        if kind not in _FILE_READ and file_cache_enabled():
            _read_default(kind)
        return dict(_STORE.get(kind, {}))


def remember(kind: str, new: Dict[str, Config]) -> None:
    """Choices made elsewhere (the native backend measures its own): kept like a tuning, written
    through to ``kind``'s tuning file in one write. Nothing under ``EFFOPS_AUTOTUNE=0``."""
    if not new or os.environ.get("EFFOPS_AUTOTUNE", "1") == "0":
        return
    with _LOCK:
        if file_cache_enabled():
            _write_through(kind, new)  # (merged with what the file holds)
        else:
            _merge(kind, new, overwrite=True)


def entries() -> Dict[str, Dict[str, Config]]:
    """``{device kind: {encoded key: config}}``: every config tuned or loaded in this process."""
    with _LOCK:
        return _all_entries()


def _all_entries() -> Dict[str, Dict[str, Config]]:
    out = {kind: dict(store) for kind, store in _STORE.items() if store}
    for (kind, key), cfg in list(_CACHE.items()):  # in the cache only (e.g. put there by tests): listed too
        out.setdefault(kind, {}).setdefault(encode_key(key), cfg)
    return out


def describe(cfg: Config) -> str:
    """One line naming the implementation a config runs: a cuDNN path, a TMA tile, a Triton tile or a
    native CPU kernel's measured choice."""
    if "NATIVE" in cfg:
        return f"native {cfg['NATIVE']}"
    if "VENDOR" in cfg:
        return f"vendor {cfg['VENDOR']} (cuDNN)"
    tile = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_P", "BLOCK_C") if k in cfg)
    extra = "".join(f" {k}={cfg[k]}" for k in ("num_warps", "num_stages") if k in cfg)
    if cfg.get("TMA"):
        fb = cfg.get("FALLBACK")
        return f"triton TMA tile {tile}{extra}" + (f" (fallback: {describe(fb)})" if isinstance(fb, dict) else "")
    return f"triton tile {tile}{extra}"
