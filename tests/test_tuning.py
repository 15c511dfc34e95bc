"""effops.tuning: the tuner every launcher uses, and its tuning files. Fake launches and an injected timer,
so no kernel runs except in the launcher tests at the end (interpreter)."""
import collections
import os
import threading
import time

import pytest
import torch

from effops import tuning

from helpers import device_branch, needs_triton

CPU = torch.device("cpu")
A, B, C = (dict(BLOCK_M=m) for m in (16, 32, 64))
HEURISTIC = dict(BLOCK_M=128, heuristic=True)
TIMES = {16: 3.0, 32: 1.0, 64: 2.0}  # B fastest, then C, then A


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(tuning, "_CACHE", collections.OrderedDict())
    monkeypatch.setattr(tuning, "_KINDS", {})
    monkeypatch.setattr(tuning, "_STORE", {})
    monkeypatch.setattr(tuning, "_FILE_READ", set())
    monkeypatch.setenv("EFFOPS_AUTOTUNE", "1")
    monkeypatch.setenv("EFFOPS_TUNING_CACHE", "0")


class Fake:
    """A launch that records its configs (``fail``: BLOCK_M values that raise) and a timer
    that runs the launch and returns TIMES of the config it ran."""

    def __init__(self, fail=(), delay=0.0, on_time=None):
        self.launched, self.timed, self.fail, self.delay, self.on_time = [], [], set(fail), delay, on_time

    def launch(self, cfg):
        if cfg["BLOCK_M"] in self.fail:
            raise RuntimeError("out of shared memory")
        self.launched.append(cfg)

    def timer(self, fn):
        if self.on_time:
            self.on_time()
        time.sleep(self.delay)
        fn()
        cfg = self.launched[-1]
        self.timed.append(cfg)
        return TIMES[cfg["BLOCK_M"]]

    def pick(self, key="k", device=CPU, candidates=(A, B, C), **kw):
        return tuning.pick(key, self.launch, lambda: HEURISTIC, list(candidates), device, timer=self.timer, **kw)


def test_picks_the_fastest_candidate_and_caches_it():
    f = Fake()
    ranked = []
    assert f.pick() is B and f.timed == [A, B, C]
    assert f.pick() is B and len(f.timed) == 3  # cached: nothing timed again
    # ``choose`` sees the candidates that ran, fastest first, and decides what is cached.
    assert f.pick("k2", choose=lambda r: ranked.extend(r) or dict(r[0], extra=1)) == dict(B, extra=1)
    assert ranked == [B, C, A] and f.pick("k2") == dict(B, extra=1)


def test_candidates_given_as_a_function_are_built_only_when_tuning():
    f, built = Fake(), []
    make = lambda: built.append(1) or [A, C]
    assert tuning.pick("k", f.launch, lambda: HEURISTIC, make, CPU, timer=f.timer) is C
    assert tuning.pick("k", f.launch, lambda: HEURISTIC, make, CPU, timer=f.timer) is C and built == [1]


def test_a_candidate_that_fails_to_run_is_skipped():
    f = Fake(fail={32})  # the would-be fastest raises
    assert f.pick() is C and f.timed == [A, C]


def test_error_when_no_candidate_runs():
    f = Fake(fail={16, 32, 64})
    with pytest.raises(RuntimeError, match="no kernel config could run for problem .*'k'"):
        f.pick()
    assert not tuning._CACHE


def test_autotune_off_returns_the_heuristic_without_timing(monkeypatch):
    monkeypatch.setenv("EFFOPS_AUTOTUNE", "0")
    f = Fake()
    assert f.pick() is HEURISTIC and f.timed == [] and f.launched == [] and not tuning._CACHE


def test_graph_capture_never_times(monkeypatch):
    """Inside a CUDA-graph capture: the tile tuned for the key in an earlier eager call,
    else the heuristic; nothing timed, nothing cached."""
    capturing = [True]
    monkeypatch.setattr(tuning, "_capturing", lambda device: capturing[0])
    f = Fake()
    assert f.pick() is HEURISTIC and f.timed == [] and not tuning._CACHE  # not tuned yet
    capturing[0] = False
    assert f.pick() is B and len(f.timed) == 3                            # eager warm-up tunes it
    capturing[0] = True
    assert f.pick() is B and len(f.timed) == 3                            # the capture reuses it
    assert f.pick("other") is HEURISTIC and len(f.timed) == 3


def test_cpu_tensors_never_capture():
    # Asking must not touch CUDA (CPU-only machines may have no usable driver).
    assert tuning._capturing(CPU) is False


@pytest.mark.parametrize("n, b", [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 6), (6, 6), (7, 8), (8, 8), (9, 12),
                                  (12, 12), (13, 16), (49, 64), (196, 256), (784, 1024), (3136, 4096),
                                  (25088, 32768), (25089, 32768), (24576, 24576), (24577, 32768)])
def test_bucket_is_the_next_half_octave_step(n, b):
    assert tuning.bucket(n) == b


def test_per_image_row_tiles_are_the_same_within_a_bucket():
    """What the OSA aggregation's per-image key relies on (see tuning.bucket)."""
    for hw in range(1, 5000):
        bkt = tuning.bucket(hw)
        for bm in (16, 32, 64, 128, 256):
            if bm >= bkt / 4:
                assert -(-hw // bm) == -(-bkt // bm), (hw, bm)


def test_same_bucket_reuses_the_tile_another_bucket_tunes():
    f = Fake()
    key = lambda m: ("conv", tuning.bucket(m), 64, 64)
    f.pick(key(100))
    f.pick(key(120))  # same bucket (128): no new timing
    assert len(f.timed) == 3
    f.pick(key(200))  # bucket 256: tuned
    assert len(f.timed) == 6 and len(tuning._CACHE) == 2


def test_device_kind_is_in_the_key(monkeypatch):
    names = {0: "NVIDIA A100-SXM4-80GB sm_80", 1: "NVIDIA H100 80GB HBM3 sm_90", 2: "NVIDIA H100 80GB HBM3 sm_90"}
    described = []
    monkeypatch.setattr(tuning, "_describe", lambda d: described.append(d.index) or names[d.index])
    monkeypatch.setattr(tuning, "_capturing", lambda device: False)
    f = Fake()
    f.pick(device=torch.device("cuda", 0))
    f.pick(device=torch.device("cuda", 1))  # another kind of GPU: tuned again
    assert len(f.timed) == 6
    f.pick(device=torch.device("cuda", 2))  # same kind as cuda:1: its tile
    f.pick(device=torch.device("cuda", 1))
    assert len(f.timed) == 6 and described == [0, 1, 2]  # each device described once


def test_device_kind_of_the_cpu():
    assert tuning.device_kind(CPU) == "cpu"


def test_lru_bound_evicts_the_least_recently_used(monkeypatch):
    monkeypatch.setattr(tuning, "MAX_ENTRIES", 2)
    f = Fake()
    f.pick("a"), f.pick("b"), f.pick("a")  # "a" used last
    assert len(f.timed) == 6
    f.pick("c")                            # evicts "b"
    assert len(tuning._CACHE) == 2 and len(f.timed) == 9
    f.pick("a")
    assert len(f.timed) == 9               # still cached
    f.pick("b")
    assert len(f.timed) == 12              # evicted, tuned again


def test_clear_forgets_tuned_tiles():
    f = Fake()
    f.pick(), tuning.clear(), f.pick()
    assert len(f.timed) == 6


def test_two_threads_on_one_key_time_it_once():
    """Thread 2 asks for the key while thread 1 is inside the (slow) timer: it waits for
    thread 1's result instead of timing the same kernels concurrently."""
    in_timer = threading.Event()
    f = Fake(delay=0.05, on_time=in_timer.set)
    results = [None, None]

    def run(i):
        results[i] = f.pick()

    t1 = threading.Thread(target=run, args=(0,))
    t1.start()
    assert in_timer.wait(10)
    t2 = threading.Thread(target=run, args=(1,))
    t2.start()
    t1.join(10), t2.join(10)
    assert results == [B, B] and len(f.timed) == 3


def test_a_cache_hit_takes_no_lock(monkeypatch):
    class CountingLock:
        def __init__(self):
            self.lock, self.taken = threading.Lock(), 0

        def __enter__(self):
            self.taken += 1
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    monkeypatch.setattr(tuning, "_LOCK", CountingLock())
    f = Fake()
    f.pick()
    assert tuning._LOCK.taken == 1
    f.pick(), f.pick()
    assert tuning._LOCK.taken == 1


def test_default_timer_is_tritons_do_bench(monkeypatch):
    triton_testing = pytest.importorskip("triton.testing")
    seen = []
    monkeypatch.setattr(triton_testing, "do_bench", lambda fn, warmup, rep: seen.append((warmup, rep)) or 1.0)
    f = Fake()
    assert tuning.pick("k", f.launch, lambda: HEURISTIC, [A], CPU) is A and seen == [(5, 20)]


# The launchers put pixel-count buckets into their keys (and launch with the real sizes).


@needs_triton
@pytest.mark.parametrize("depthwise", [False, True], ids=["conv", "depthwise"])
def test_launchers_reuse_tiles_within_a_pixel_bucket(monkeypatch, depthwise):
    """A FusedOSA block (stage convs through the conv launcher or the fused depthwise+1x1
    launcher, eSE aggregation with per-image tiling) plus a depthwise conv: a new batch size
    or resolution in the same pixel bucket tunes nothing, another bucket tunes every launcher."""
    import effops
    from effops import FusedOSA
    from effops.ops import conv, conv_bn_act
    from effops.ops import osa as osa_ops

    device_branch(monkeypatch, autotune=True)
    small = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
    monkeypatch.setattr(conv, "_candidates", lambda ci, co, tma=0: [small])
    monkeypatch.setattr(osa_ops, "_dw_pw_configs", lambda: [small])
    monkeypatch.setattr(conv, "_depthwise_configs", lambda: [dict(BLOCK_P=16, BLOCK_C=16, num_warps=1, num_stages=1)])
    timed = []
    monkeypatch.setattr(tuning, "do_bench", lambda fn: (fn(), timed.append(1))[1] or 1.0)

    block = FusedOSA(8, 8, 16, 2, identity=False, ese=True, depthwise=depthwise).eval()
    dw_w = torch.randn(8, 1, 3, 3)

    def run(n, h, w):
        x = torch.randn(n, 8, h, w).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            with effops.use_backend("triton"):
                y = block(x), conv_bn_act(x, dw_w, None, None, padding=1, groups=8, act="relu")
            with effops.use_backend("reference"):
                ref = block(x), conv_bn_act(x, dw_w, None, None, padding=1, groups=8, act="relu")
        for a, b in zip(y, ref):  # tuned on other sizes, launched with the real ones
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    run(1, 5, 6)  # 30 pixels: bucket 32
    ops = {k[1][0] for k in tuning._CACHE}
    assert ops == ({"dw_pw"} if depthwise else {"conv"}) | {"osa_agg", "depthwise"}
    entries, n_timed = len(tuning._CACHE), len(timed)
    run(1, 4, 8)  # 32 pixels: same buckets, nothing tuned
    assert len(tuning._CACHE) == entries and len(timed) == n_timed
    run(2, 5, 6)  # 60 pixels: bucket 64, every launcher tunes again
    assert len(tuning._CACHE) == 2 * entries and len(timed) == 2 * n_timed


# Tuning files (fake launches; the launcher-level tests are in tests/test_vendor.py).


@pytest.fixture
def files_on(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFOPS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("EFFOPS_TUNING_CACHE", "1")
    return tmp_path


def _forget_in_memory(monkeypatch):
    monkeypatch.setattr(tuning, "_CACHE", collections.OrderedDict())
    monkeypatch.setattr(tuning, "_STORE", {})
    monkeypatch.setattr(tuning, "_FILE_READ", set())


def test_encode_key_is_stable_text_with_dtypes_as_strings():
    key = ("conv", 1024, (1, 1), torch.float16, True, "relu", [3, 3])
    assert tuning.encode_key(key) == "('conv', 1024, (1, 1), 'torch.float16', True, 'relu', (3, 3))"
    assert tuning.encode_key(("k", torch.bfloat16)) != tuning.encode_key(("k", torch.float16))


def test_file_entries_are_used_without_timing_even_during_capture(monkeypatch, files_on):
    f = Fake()
    assert f.pick(("k", torch.float16)) is B and len(f.timed) == 3     # tuned, written through
    _forget_in_memory(monkeypatch)                                     # "the next process"
    monkeypatch.setattr(tuning, "_capturing", lambda device: True)
    assert f.pick(("k", torch.float16)) == B and len(f.timed) == 3     # read from the file, inside a capture
    assert f.pick(("other",)) is HEURISTIC and len(f.timed) == 3       # unknown key during capture: heuristic


def test_the_file_is_read_once_per_device_kind_and_hits_take_no_lock(monkeypatch, files_on):
    f = Fake()
    f.pick("a"), f.pick("b")
    _forget_in_memory(monkeypatch)
    reads = []
    real = tuning.read_file
    monkeypatch.setattr(tuning, "read_file", lambda p: reads.append(p) or real(p))
    assert f.pick("a") == B and f.pick("b") == B and len(f.timed) == 6 and len(reads) == 1
    taken = []

    class CountingLock:
        def __enter__(self):
            taken.append(1)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(tuning, "_LOCK", CountingLock())
    f.pick("a"), f.pick("b")
    assert taken == [] and len(reads) == 1


def test_an_entry_evicted_from_the_lru_cache_comes_back_from_the_file_store(monkeypatch, files_on):
    monkeypatch.setattr(tuning, "MAX_ENTRIES", 1)
    f = Fake()
    f.pick("a"), f.pick("b")                   # "a" evicted from the cache ...
    assert len(tuning._CACHE) == 1 and len(f.timed) == 6
    assert f.pick("a") == B and len(f.timed) == 6  # ... not timed again


def test_describe_names_the_implementation():
    tile = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=3)
    assert tuning.describe({"VENDOR": "cudnn"}) == "vendor cudnn (cuDNN)"
    assert tuning.describe(tile) == "triton tile 64x32x16 num_warps=4 num_stages=3"
    assert tuning.describe(dict(tile, TMA=True, FALLBACK={"VENDOR": "cudnn_relu"})) == (
        "triton TMA tile 64x32x16 num_warps=4 num_stages=3 (fallback: vendor cudnn_relu (cuDNN))")


def test_cache_path_names_device_kind_and_versions(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFOPS_CACHE_DIR", str(tmp_path))
    v = tuning.versions()
    path = tuning.cache_path("NVIDIA H100 80GB HBM3 sm_90")
    assert os.path.dirname(path) == str(tmp_path)
    assert os.path.basename(path) == (f"tuning-nvidia-h100-80gb-hbm3-sm_90-torch{tuning._sanitize(v['torch'])}"
                                      f"-triton{tuning._sanitize(v['triton'])}.json")
    monkeypatch.delenv("EFFOPS_CACHE_DIR")
    assert tuning.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "effops")
