"""cuDNN candidates beside the Triton tiles, and tuning files.

No GPU here: the launchers' device branch runs under the interpreter (helpers.device_branch),
``conv._cudnn_usable`` is patched so the vendor candidates are offered to CPU tensors, cuDNN's
fused ops (CUDA-only) are replaced by CPU equivalents that record their calls, and an injected
timer (``tuning.do_bench``) decides which candidate is fastest."""
import collections
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from effops import tuning, use_backend
from effops.ops import conv, conv_bn_act, reference

from helpers import assert_matches, device_branch, needs_triton, randomize_bn

pytestmark = needs_triton

TILE = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
DW_TILE = dict(BLOCK_P=16, BLOCK_C=16, num_warps=1, num_stages=1)

# (act, residual, residual_after_act, the vendor config that can run it fastest)
CASES = {
    "cudnn": ("silu", True, True, "cudnn"),
    "cudnn_relu": ("relu", False, False, "cudnn_relu"),
    "cudnn_add_relu": ("relu", True, False, "cudnn_add_relu"),
}


class Rig:
    """Device branch + vendor candidates on CPU tensors + a timer that knows what it timed.

    ``times``: ms per implementation ("triton" or a vendor name). ``timed``: what each timing
    ran. ``vendor_calls``: every vendor launch (timed or not). With ``poison`` (a buffer), the
    timer fills it with NaN before each timed run and records whether ``watch`` (a view of it)
    was fully written *inside* the timed function."""

    def __init__(self, monkeypatch, times, poison=None, watch=None):
        device_branch(monkeypatch, autotune=True)
        monkeypatch.setattr(tuning, "_STORE", {})
        monkeypatch.setattr(tuning, "_FILE_READ", set())
        monkeypatch.setattr(conv, "_cudnn_usable", lambda x: True)
        monkeypatch.setattr(conv, "_candidates", lambda ci, co, tma=0: [TILE])
        monkeypatch.setattr(conv, "_depthwise_configs", lambda: [DW_TILE])
        self.times, self.poison, self.watch = times, poison, watch
        self.timed, self.vendor_calls, self.written_when_timed, self.vendor_results = [], [], [], []
        self._ran = []
        real = conv._launch_vendor

        def launch_vendor(name, *a):
            self.vendor_calls.append(name)
            self._ran.append(name)
            y = real(name, *a)
            self.vendor_results.append(y)
            return y

        monkeypatch.setattr(conv, "_launch_vendor", launch_vendor)
        # cuDNN's fused ops exist for CUDA tensors only: CPU stand-ins with cuDNN's semantics.
        # ``produced``: every tensor the vendor ops (and F.conv2d) return, to tell their output from a copy.
        self.produced = []
        keep = lambda t: self.produced.append(t) or t  # noqa: E731
        conv2d = F.conv2d
        monkeypatch.setattr(F, "conv2d", lambda *a, **k: keep(conv2d(*a, **k)))
        monkeypatch.setattr(torch, "cudnn_convolution_relu",
                            lambda x, w, b, s, p, d, g: keep(F.relu(conv2d(x, w, b, s, p, d, g))))
        monkeypatch.setattr(torch, "cudnn_convolution_add_relu", lambda x, w, z, alpha, b, s, p, d, g: keep(
            F.relu(conv2d(x, w, b, s, p, d, g) + alpha * z)))
        monkeypatch.setattr(tuning, "do_bench", self.bench)

    def bench(self, fn):
        self._ran.clear()
        if self.poison is not None:
            self.poison.fill_(float("nan"))
        fn()
        what = self._ran[-1] if self._ran else "triton"
        self.timed.append(what)
        if self.watch is not None:
            self.written_when_timed.append((what, not torch.isnan(self.watch).any().item()))
        return self.times[what]


def _problem(act, with_res, dtype=torch.float32, c_in=8, c_out=8, n=2, h=5, w=6, groups=1):
    x = torch.randn(n, c_in, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(c_out, c_in // groups, 3, 3) / 6).to(dtype)
    scale, bias = torch.rand(c_out) + 0.5, torch.randn(c_out)
    res = torch.randn(n, c_out, h, w).to(dtype).contiguous(memory_format=torch.channels_last) if with_res else None
    return x, wt, scale, bias, res


def _ref64(x, wt, scale, bias, res, act, after, groups=1):
    return reference.conv_scale_bias_act(x.double(), wt.double(), scale.double(), bias.double(),
                                         None if res is None else res.double(), (1, 1), (1, 1), (1, 1), groups, act,
                                         0.0, after)


def _run(x, wt, scale, bias, res, act, after, out=None, groups=1):
    with torch.no_grad(), use_backend("triton"):
        return conv_bn_act(x, wt, scale, bias, res, padding=1, groups=groups, act=act, residual_after_act=after,
                           out=out)


@pytest.mark.parametrize("dest", ["new", "view"])
@pytest.mark.parametrize("winner", ["vendor", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_tuner_picks_the_fastest_of_triton_and_cudnn(monkeypatch, case, winner, dest):
    """The fastest measured implementation wins and is cached; a cached choice launches
    without timing. Into a channel view the vendor's timed launch includes its copy into the
    view; into a new tensor the vendor's own output is returned (no copy). Values match the
    fp64 reference either way."""
    act, with_res, after, vendor = CASES[case]
    x, wt, scale, bias, res = _problem(act, with_res)
    buf = out = None
    if dest == "view":
        buf = torch.full((2, 20, 5, 6), float("nan")).contiguous(memory_format=torch.channels_last)
        out = buf[:, 4:12]
    times = collections.defaultdict(lambda: 5.0, triton=2.0)
    times[vendor] = 1.0 if winner == "vendor" else 3.0
    rig = Rig(monkeypatch, times, poison=buf, watch=out)

    y = _run(x, wt, scale, bias, res, act, after, out)
    offered = ["triton", "cudnn"] + ([vendor] if vendor != "cudnn" else [])
    assert rig.timed == offered                                  # each candidate timed once
    (cfg,) = tuning._CACHE.values()
    assert cfg == ({"VENDOR": vendor} if winner == "vendor" else TILE)
    expect_vendor = [*offered[1:], vendor] if winner == "vendor" else offered[1:]
    assert rig.vendor_calls == expect_vendor                     # the real launch: the winner
    if dest == "view":
        assert y is out
        # Every timed launch wrote the view itself: the vendor's copy is part of what was timed.
        assert rig.written_when_timed == [(w, True) for w in offered]
        assert torch.isnan(buf[:, :4]).all() and torch.isnan(buf[:, 12:]).all()
    elif winner == "vendor":
        assert y is rig.vendor_results[-1] and any(y is t for t in rig.produced)  # cuDNN's own output, no copy
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y, _ref64(x, wt, scale, bias, res, act, after))

    # Cached: the next call launches the choice without timing.
    x2 = torch.randn_like(x)
    out2 = None if dest == "new" else torch.full_like(buf, float("nan"))[:, 4:12]
    n_timed, n_vendor = len(rig.timed), len(rig.vendor_calls)
    y2 = _run(x2, wt, scale, bias, res, act, after, out2)
    assert len(rig.timed) == n_timed and len(tuning._CACHE) == 1
    assert len(rig.vendor_calls) == n_vendor + (winner == "vendor")
    assert_matches(y2, _ref64(x2, wt, scale, bias, res, act, after))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_vendor_path_half_precision(monkeypatch, dtype):
    """BN scale folded in fp32, cast to the input dtype: within the half-precision rule."""
    from helpers import rel_err

    x, wt, scale, bias, res = _problem("relu", True, dtype)
    Rig(monkeypatch, collections.defaultdict(lambda: 5.0, triton=2.0, cudnn=1.0))
    y = _run(x, wt, scale, bias, res, "relu", False)
    assert y.dtype == dtype and tuning._CACHE and list(tuning._CACHE.values()) == [{"VENDOR": "cudnn"}]
    ref = _ref64(x, wt, scale, bias, res, "relu", False)
    same = F.relu(F.conv2d(x, wt, None, 1, 1) * scale.to(dtype).view(1, -1, 1, 1) + bias.to(dtype).view(1, -1, 1, 1)
                  + res)
    assert rel_err(y, ref) <= 2 * rel_err(same, ref) + (1e-3 if dtype == torch.float16 else 8e-3)


def test_the_key_separates_problems_vendor_choices_differ_on(monkeypatch):
    """A residual after the activation can't take cudnn_add_relu, and a result into a given
    tensor costs the vendor a copy: each is its own tuned problem."""
    rig = Rig(monkeypatch, collections.defaultdict(lambda: 5.0, triton=2.0, cudnn_add_relu=1.0))
    x, wt, scale, bias, res = _problem("relu", True)
    _run(x, wt, scale, bias, res, "relu", False)
    y = _run(x, wt, scale, bias, res, "relu", True)              # after the act: tuned again, no add_relu
    assert rig.timed == ["triton", "cudnn", "cudnn_add_relu", "triton", "cudnn"]
    assert_matches(y, _ref64(x, wt, scale, bias, res, "relu", True))
    _run(x, wt, scale, bias, res, "relu", False, out=torch.empty(2, 8, 5, 6))
    assert len(tuning._CACHE) == 3


def test_depthwise_convs_get_the_vendor_candidate(monkeypatch):
    rig = Rig(monkeypatch, collections.defaultdict(lambda: 5.0, triton=2.0, cudnn_relu=1.0))
    x, wt, scale, bias, _ = _problem("relu", False, groups=8)
    y = _run(x, wt, scale, bias, None, "relu", False, groups=8)
    assert rig.timed == ["triton", "cudnn", "cudnn_relu"] and rig.vendor_calls[-1] == "cudnn_relu"
    ((key, cfg),) = tuning._CACHE.items()
    assert key[1][0] == "depthwise" and cfg == {"VENDOR": "cudnn_relu"}
    assert_matches(y, _ref64(x, wt, scale, bias, None, "relu", False, groups=8))


def test_osa_stage_convs_write_their_views_through_the_vendor_path(monkeypatch):
    """FusedOSA's stage convs write channel views of the stage buffer: with cuDNN timed
    fastest they copy its output into the views, and the block still matches PyTorch."""
    from effops import FusedOSA
    from effops.ops import osa as osa_ops

    monkeypatch.setattr(osa_ops, "_dw_pw_configs", lambda: [TILE])
    rig = Rig(monkeypatch, collections.defaultdict(lambda: 5.0, triton=2.0, cudnn=1.0, cudnn_relu=1.5))
    block = randomize_bn(FusedOSA(8, 8, 16, 2, identity=False, ese=False)).eval()
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), use_backend("triton"):
        y = block(x)
    conv_keys = [k for k in tuning._CACHE if k[1][0] == "conv"]
    assert conv_keys and all(k[1][-1] for k in conv_keys)        # stage convs: into a given view
    assert all(tuning._CACHE[k] == {"VENDOR": "cudnn"} for k in conv_keys) and "cudnn" in rig.vendor_calls
    with torch.no_grad():
        ref = copy.deepcopy(block).double().forward_unfused(x.double())
    assert_matches(y, ref)


def test_explicit_vendor_config(monkeypatch):
    """``config={"VENDOR": ...}`` forces a vendor path (benchmarks); one that can't run the
    problem's epilogue is refused."""
    x, wt, scale, bias, res = _problem("relu", True)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu",
                        lambda x, w, z, alpha, b, s, p, d, g: F.relu(F.conv2d(x, w, b, s, p, d, g) + alpha * z))
    args = (x, wt, scale, bias, res, None, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, False)
    for name in ("cudnn", "cudnn_add_relu"):
        assert_matches(conv._run_triton(*args, config={"VENDOR": name}), _ref64(x, wt, scale, bias, res, "relu", False))
    with pytest.raises(ValueError, match="cudnn_relu"):
        conv._run_triton(*args, config={"VENDOR": "cudnn_relu"})  # it has no residual input
    out = torch.full((2, 8, 5, 6), float("nan"))
    args = (x, wt, scale, bias, res, out, [1, 1], [1, 1], [1, 1], 1, "gelu", 0.0, True)
    assert conv._run_triton(*args, config={"VENDOR": "cudnn"}) is out
    assert_matches(out, _ref64(x, wt, scale, bias, res, "gelu", True))


def test_no_vendor_candidates_under_the_interpreter_or_without_autotune(monkeypatch):
    calls = []
    real = conv._launch_vendor
    monkeypatch.setattr(conv, "_launch_vendor", lambda *a: calls.append(a[0]) or real(*a))
    monkeypatch.setattr(conv, "_cudnn_usable", lambda x: True)
    x, wt, scale, bias, _ = _problem("relu", False)
    _run(x, wt, scale, bias, None, "relu", False)               # interpreter path: its fixed tile
    assert calls == []
    device_branch(monkeypatch, autotune=False)                  # EFFOPS_AUTOTUNE=0: the heuristic tile
    monkeypatch.setattr(tuning, "do_bench", lambda fn: pytest.fail("timed with EFFOPS_AUTOTUNE=0"))
    y = _run(x, wt, scale, bias, None, "relu", False)
    assert calls == [] and not tuning._CACHE
    assert_matches(y, _ref64(x, wt, scale, bias, None, "relu", False))


def test_vendor_candidates_need_cuda_and_cudnn():
    x = torch.randn(1, 4, 3, 3)
    assert conv._vendor_candidates(x, None, "relu", False) == []
    assert conv.vendor_reasons(x) == ["cuDNN runs on cuda tensors, got cpu"]
    assert any("float64" in r for r in conv.vendor_reasons(x.double()))


def test_graph_capture_uses_the_cached_choice_and_never_times(monkeypatch):
    capturing = [True]
    rig = Rig(monkeypatch, collections.defaultdict(lambda: 5.0, triton=2.0, cudnn_relu=1.0))
    monkeypatch.setattr(tuning, "_capturing", lambda device: capturing[0])
    x, wt, scale, bias, _ = _problem("relu", False)
    y = _run(x, wt, scale, bias, None, "relu", False)           # capture before any warm-up: the heuristic tile
    assert rig.timed == [] and rig.vendor_calls == [] and not tuning._CACHE
    assert_matches(y, _ref64(x, wt, scale, bias, None, "relu", False))
    capturing[0] = False
    _run(x, wt, scale, bias, None, "relu", False)               # eager warm-up tunes: cuDNN wins
    n = len(rig.timed)
    capturing[0] = True
    y = _run(x, wt, scale, bias, None, "relu", False)           # the capture launches the cached vendor path
    assert len(rig.timed) == n and rig.vendor_calls[-1] == "cudnn_relu"
    assert_matches(y, _ref64(x, wt, scale, bias, None, "relu", False))


# ----------------------------------------------------------------------------
# Tuning files
# ----------------------------------------------------------------------------
@pytest.fixture
def cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFOPS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("EFFOPS_TUNING_CACHE", "1")
    return tmp_path


def _new_process(monkeypatch):
    """What a fresh process has: empty cache, nothing read from files."""
    monkeypatch.setattr(tuning, "_CACHE", collections.OrderedDict())
    monkeypatch.setattr(tuning, "_STORE", {})
    monkeypatch.setattr(tuning, "_FILE_READ", set())


def test_tuning_is_written_through_and_read_lazily_by_the_next_process(monkeypatch, cache_dir):
    rig = Rig(monkeypatch, collections.defaultdict(lambda: 5.0, triton=2.0, cudnn_relu=1.0))
    x, wt, scale, bias, _ = _problem("relu", False)
    _run(x, wt, scale, bias, None, "relu", False)
    path = tuning.cache_path("cpu")
    assert os.path.dirname(path) == str(cache_dir) and os.listdir(cache_dir) == [os.path.basename(path)]  # no temp left
    assert os.path.basename(path).startswith("tuning-cpu-torch")
    data = json.load(open(path))
    assert data["torch"] == torch.__version__ and list(data["kinds"]) == ["cpu"]
    (key,) = tuning._CACHE
    assert data["kinds"]["cpu"] == {tuning.encode_key(key[1]): {"VENDOR": "cudnn_relu"}}

    _new_process(monkeypatch)
    n = len(rig.timed)
    y = _run(x, wt, scale, bias, None, "relu", False)
    assert len(rig.timed) == n and rig.vendor_calls[-1] == "cudnn_relu"   # from the file, nothing timed
    assert tuning._FILE_READ == {"cpu"} and list(tuning._CACHE.values()) == [{"VENDOR": "cudnn_relu"}]
    assert_matches(y, _ref64(x, wt, scale, bias, None, "relu", False))


def test_save_clear_load_round_trip(monkeypatch, cache_dir, tmp_path):
    rig = Rig(monkeypatch, collections.defaultdict(lambda: 5.0, triton=2.0, cudnn_add_relu=1.0))
    monkeypatch.setenv("EFFOPS_TUNING_CACHE", "0")
    x, wt, scale, bias, res = _problem("relu", True)
    _run(x, wt, scale, bias, res, "relu", False)
    x3, w3, s3, b3, _ = _problem("silu", False, c_in=16)
    rig.times["triton"] = 0.5                                    # this one: a Triton tile
    _run(x3, w3, s3, b3, None, "silu", False)
    before = dict(tuning._CACHE)
    saved = tmp_path / "sub" / "mine.json"
    assert tuning.save(str(saved)) == [str(saved)]
    tuning.clear()
    assert not tuning._CACHE
    assert tuning.load(str(saved)) == 2
    n = len(rig.timed)
    y = _run(x, wt, scale, bias, res, "relu", False)
    _run(x3, w3, s3, b3, None, "silu", False)
    assert len(rig.timed) == n and dict(tuning._CACHE) == before  # same choices, nothing timed
    assert rig.vendor_calls[-1] == "cudnn_add_relu"
    assert_matches(y, _ref64(x, wt, scale, bias, res, "relu", False))
    tuning.clear()
    _run(x, wt, scale, bias, res, "relu", False)                 # cleared and not loaded: timed again
    assert len(rig.timed) == n + 3
    with pytest.raises(ValueError, match="not an effops tuning file"):
        (tmp_path / "other.json").write_text("{}")
        tuning.load(str(tmp_path / "other.json"))


def test_save_and_load_default_files(monkeypatch, cache_dir):
    rig = Rig(monkeypatch, collections.defaultdict(lambda: 5.0, triton=2.0, cudnn=1.0))
    monkeypatch.setenv("EFFOPS_TUNING_CACHE", "0")
    x, wt, scale, bias, _ = _problem("silu", False)
    _run(x, wt, scale, bias, None, "silu", False)
    assert os.listdir(cache_dir) == []
    assert tuning.save() == [tuning.cache_path("cpu")]
    _new_process(monkeypatch)
    assert tuning.load() == 1
    n = len(rig.timed)
    _run(x, wt, scale, bias, None, "silu", False)
    assert len(rig.timed) == n


def test_tuning_cache_off_writes_and_reads_nothing(monkeypatch, cache_dir):
    rig = Rig(monkeypatch, collections.defaultdict(lambda: 5.0, triton=2.0, cudnn=1.0))
    monkeypatch.setenv("EFFOPS_TUNING_CACHE", "0")
    x, wt, scale, bias, _ = _problem("silu", False)
    _run(x, wt, scale, bias, None, "silu", False)
    assert os.listdir(cache_dir) == [] and not tuning._STORE
    # A file that exists is not read either.
    monkeypatch.setenv("EFFOPS_TUNING_CACHE", "1")
    _run(x[:1], wt, scale, bias, None, "silu", False)             # written through now
    assert len(os.listdir(cache_dir)) == 1
    _new_process(monkeypatch)
    monkeypatch.setenv("EFFOPS_TUNING_CACHE", "0")
    n = len(rig.timed)
    _run(x, wt, scale, bias, None, "silu", False)
    assert len(rig.timed) == n + 2 and not tuning._FILE_READ


def test_write_through_merges_with_entries_another_process_wrote(monkeypatch, cache_dir):
    rig = Rig(monkeypatch, collections.defaultdict(lambda: 5.0, triton=2.0, cudnn=1.0))
    x, wt, scale, bias, _ = _problem("silu", False)
    _run(x, wt, scale, bias, None, "silu", False)
    path = tuning.cache_path("cpu")
    data = json.load(open(path))
    data["kinds"]["cpu"]["('elsewhere',)"] = dict(TILE)             # another process's tuning
    json.dump(data, open(path, "w"))
    _run(*_problem("relu", False, c_in=16)[:4], None, "relu", False)
    entries = json.load(open(path))["kinds"]["cpu"]
    assert len(entries) == 3 and entries["('elsewhere',)"] == TILE
    assert len(rig.timed) == 5


def test_unwritable_cache_dir_warns_once_and_tuning_still_works(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("EFFOPS_CACHE_DIR", str(blocker))
    monkeypatch.setenv("EFFOPS_TUNING_CACHE", "1")
    monkeypatch.setattr(tuning, "_WARNED", set())
    Rig(monkeypatch, collections.defaultdict(lambda: 5.0, triton=2.0, cudnn=1.0))
    x, wt, scale, bias, _ = _problem("silu", False)
    with pytest.warns(RuntimeWarning, match="could not write the tuning file") as rec:
        y = _run(x, wt, scale, bias, None, "silu", False)
        _run(x, wt, scale, bias, None, "gelu", False)            # a second new tuning: no second warning
    assert len([w for w in rec if "tuning file" in str(w.message)]) == 1
    assert_matches(y, _ref64(x, wt, scale, bias, None, "silu", False))


def test_a_corrupt_file_is_ignored_with_a_warning(monkeypatch, cache_dir):
    monkeypatch.setattr(tuning, "_WARNED", set())
    rig = Rig(monkeypatch, collections.defaultdict(lambda: 5.0, triton=2.0, cudnn=1.0))
    with open(tuning.cache_path("cpu"), "w") as f:
        f.write("{ not json")
    x, wt, scale, bias, _ = _problem("silu", False)
    with pytest.warns(RuntimeWarning, match="could not read the tuning file"):
        _run(x, wt, scale, bias, None, "silu", False)
    assert len(rig.timed) == 2
    assert json.load(open(tuning.cache_path("cpu")))["format"] == tuning.FILE_FORMAT  # replaced by a good one


def test_importing_effops_reads_no_tuning_file(tmp_path):
    bad = tmp_path / tuning.cache_path("cpu").rsplit(os.sep, 1)[-1]
    bad.write_text("{ not json")
    env = dict(os.environ, EFFOPS_CACHE_DIR=str(tmp_path), EFFOPS_TUNING_CACHE="1")
    code = ("import warnings; warnings.simplefilter('error'); import effops, effops.tuning as t; "
            "assert not t._FILE_READ and not t._STORE; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
