"""Timing and roofline helpers shared by ``python -m effops`` and ``benchmarks/``.

On CUDA, times are medians from ``triton.testing.do_bench`` (warm-up, L2
flushed between runs) or, for launch-bound cases, ``do_bench_cudagraph``
(replays a captured CUDA graph). On CPU they are wall-clock medians and are
labelled as such.
"""
from __future__ import annotations

import copy
import datetime
import os
import platform
import statistics
import time
from typing import Callable, Dict, Optional, Tuple

import torch


def device_stamp(device: torch.device) -> Dict[str, str]:
    """Device name and software versions, to stamp every result with."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def time_ms(fn: Callable[[], object], device: torch.device, *, cuda_graph: bool = False,
            cpu_iters: int = 10, rep_ms: int = 100) -> float:
    """Median time of ``fn()`` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        for _ in range(3):  # compile / autotune outside the timed region (and before any graph capture)
            fn()
        torch.cuda.synchronize()
        if cuda_graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(cpu_iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


_PEAKS: Dict[tuple, tuple] = {}


def measured_peaks(device: torch.device, dtype: torch.dtype) -> Optional[tuple]:
    """``(TFLOP/s, GB/s)`` measured on this device: a large matmul and a large
    device-to-device copy (bytes read + written). CUDA only; cached."""
    if device.type != "cuda":
        return None
    key = (str(device), dtype)
    if key not in _PEAKS:
        n = 8192
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = time_ms(lambda: a @ b, device)
        tflops = 2 * n**3 / ms / 1e9
        src = torch.randn(1 << 28, device=device, dtype=torch.float16)  # 512 MiB
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device)
        gbps = 2 * src.numel() * 2 / ms / 1e6
        _PEAKS[key] = (tflops, gbps)
        del a, b, src, dst
    return _PEAKS[key]


def roofline_ms(flops: float, min_bytes: float, peaks: tuple) -> float:
    """The floor ``max(flops / peak_flops, min_bytes / peak_bw)`` in ms."""
    tflops, gbps = peaks
    return max(flops / (tflops * 1e9), min_bytes / (gbps * 1e6))


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory (MB) allocated *during* ``fn()`` above what was allocated before
    it, the output included (CUDA caching allocator; None on CPU)."""
    if device.type != "cuda":
        return None
    fn()  # compile / tune / fill weight caches first: steady state only
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 1e6


def measure_providers(providers: Dict[str, Callable[[], object]], device: torch.device, *, host_graph: bool = False,
                      must_run: Tuple[str, ...] = ("effops",)):
    """Time every provider: ``(times, graph_times, peak_mb, errors)``, dicts keyed by provider.

    ``times``: host-inclusive medians (CUDA-graph replay instead when ``host_graph``,
    for launch-bound cases); ``graph_times``: device-only CUDA-graph replay (CUDA only);
    ``peak_mb``: :func:`peak_memory_mb`. A baseline that can't be run is recorded in
    ``errors`` instead of hiding the others; a provider in ``must_run`` re-raises.
    """
    times, graph_times, peaks, errors = {}, {}, {}, {}

    def guarded(prov, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if prov in must_run:
                raise
            errors.setdefault(prov, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            return None

    cuda = device.type == "cuda"
    for prov, fn in providers.items():
        times[prov] = guarded(prov, lambda: time_ms(fn, device, cuda_graph=cuda and host_graph))
        graph_times[prov] = guarded(prov, lambda: time_ms(fn, device, cuda_graph=True)) if cuda else None
        peaks[prov] = guarded(prov, lambda: peak_memory_mb(fn, device)) if cuda else None
    return times, graph_times, peaks, errors


class LiveTensorBytes:
    """Peak bytes of tensors *allocated inside the block* and alive at the same time,
    measured from the ATen calls themselves (any device, CPU included)::

        with LiveTensorBytes() as mem:
            y = model(x)
        mem.peak      # bytes; the output counts, inputs and parameters don't

    Every ATen op whose result is a new tensor (not a view or in-place result) adds
    that tensor's storage size until the tensor is garbage-collected. It is an
    allocation model, not an allocator reading: no rounding or caching, views are
    assumed to die with their base. On CUDA, :func:`peak_memory_mb` reads the real
    allocator; this one makes the same comparison checkable without a GPU.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        import weakref

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outs = out if isinstance(out, (tuple, list)) else (out,)
                for ret, t in zip(func._schema.returns, outs):
                    if isinstance(t, torch.Tensor) and ret.alias_info is None:  # a new tensor, not a view
                        n = t.untyped_storage().nbytes()
                        outer.live += n
                        outer.peak = max(outer.peak, outer.live)
                        weakref.finalize(t, outer._free, n)
                return out

        self._mode = _Mode()
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __enter__(self) -> "LiveTensorBytes":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def compile_modes(device: torch.device) -> list:
    """The torch.compile baselines to time: ``EFFOPS_BENCH_COMPILE_MODES`` (comma list of
    ``default``, ``max-autotune``); ``EFFOPS_BENCH_COMPILE=0`` means none. Default: both on
    CUDA, none on CPU (inductor's CPU code is not what this library competes with)."""
    if os.environ.get("EFFOPS_BENCH_COMPILE", "") == "0":
        return []
    default = "default,max-autotune" if device.type == "cuda" else ""
    modes = [m.strip() for m in os.environ.get("EFFOPS_BENCH_COMPILE_MODES", default).split(",") if m.strip()]
    unknown = set(modes) - {"default", "max-autotune"}
    if unknown:
        raise ValueError(f"EFFOPS_BENCH_COMPILE_MODES: unknown modes {sorted(unknown)}; use default, max-autotune")
    return modes


def compiled_providers(module: torch.nn.Module, x: torch.Tensor, batch: int) -> Dict[str, Callable[[], object]]:
    """``{"compile_default": fn, "compile_max_autotune_freezing": fn}`` per :func:`compile_modes`.
    max-autotune (with inductor's freezing) compiles for minutes, so it runs at batch 32
    only unless ``EFFOPS_BENCH_MAX_AUTOTUNE=all``. Each compiles a deep copy of ``module``."""
    providers = {}
    modes = compile_modes(x.device)
    if not modes:
        return providers
    torch._dynamo.reset()  # every case is a new module: avoid hitting the recompile limit
    if "default" in modes:
        compiled = torch.compile(copy.deepcopy(module))
        providers["compile_default"] = lambda: compiled(x)
    if "max-autotune" in modes and x.device.type == "cuda" and (
            batch == 32 or os.environ.get("EFFOPS_BENCH_MAX_AUTOTUNE", "") == "all"):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            ma = torch.compile(copy.deepcopy(module), mode="max-autotune")
            with torch.no_grad():
                ma(x)  # compile (and freeze) under the patched config
        providers["compile_max_autotune_freezing"] = lambda: ma(x)
    return providers


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters (fresh BN hides folding bugs); returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def result_rows(providers_timed, *, flops: float, min_bytes: Optional[float], peaks: Optional[tuple],
                host_graph: bool, cuda: bool, **fields) -> list:
    """One CSV/JSON row per provider from :func:`measure_providers`' output, with speedups
    against ``eager``, TFLOP/s, GB/s (when ``min_bytes`` is modelled), % of the roofline
    floor and peak memory; ``fields`` (case, shape, dtype, error vs eager...) go first."""
    times, graph_times, peak_mb, errors = providers_timed
    ratio = lambda a, b: a / b if (a is not None and b) else None
    rows = []
    for prov, ms in times.items():
        rows.append({
            **{k: v for k, v in fields.items() if k != "max_rel_err_vs_eager"},
            "provider": prov,
            "ms": ms,
            "speedup_vs_eager": ratio(times["eager"], ms),
            "ms_cuda_graph": graph_times[prov],
            "graph_speedup_vs_eager": ratio(graph_times["eager"], graph_times[prov]),
            "tflops": ratio(flops / 1e9, ms),
            "gbps": ratio(min_bytes / 1e6, ms) if min_bytes else None,
            "pct_roofline": ratio(100 * roofline_ms(flops, min_bytes or 0, peaks), ms) if peaks else None,
            "peak_mem_mb": peak_mb[prov],
            "peak_mem_vs_eager": ratio(peak_mb[prov], peak_mb["eager"]),
            "peak_tflops_measured": peaks[0] if peaks else None,
            "peak_gbps_measured": peaks[1] if peaks else None,
            "timing": "cuda-graph median" if cuda and host_graph else ("do_bench median" if cuda else "cpu wall-clock median"),
            "max_rel_err_vs_eager": fields.get("max_rel_err_vs_eager"),
            "error": errors.get(prov, ""),
        })
    return rows
