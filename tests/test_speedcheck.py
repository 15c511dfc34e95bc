"""effops.optimize's speed check (effops/speedcheck.py): every converted block is timed against its
original on the input it gets in the model, and the original stays where it is faster or where the
outputs differ. The decisions are tested with a deterministic timer (which side is "faster" is set
per block path); one test runs the real timer end to end."""
import copy
import warnings

import pytest
import torch
from torch import nn

import effops
from effops import speedcheck
from effops.nn.traced import traced_forward_of
from effops.ops.conv import native_fast
from helpers import randomize_bn, rel_err


def cbr(cin, cout, k=3, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    """A hand-written forward: effops traces it and fuses the add into conv2's epilogue."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = cbr(c, c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.conv1(x))) + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, stride=2)
        self.block = Residual(8)
        self.head = cbr(8, 16, k=1)
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.head(self.block(self.stem(x)))).mean((2, 3))


def make_net():
    torch.manual_seed(0)
    return randomize_bn(Net()).eval()


def fake_timer(original_faster=(), record=None, corrupt=()):
    """A measure_pair stand-in: the original is "faster" exactly at the paths in ``original_faster``;
    the fused output is corrupted at the paths in ``corrupt``."""
    def measure(fused, original, args, kwargs, *, path=""):
        f_out, o_out = fused(*args, **kwargs), original(*args, **kwargs)
        if record is not None:
            record.append(path)
        if path in corrupt:
            f_out = f_out + 1.0
        return (2.0, 1.0, f_out, o_out) if path in original_faster else (1.0, 2.0, f_out, o_out)
    return measure


def x_in():
    return torch.randn(2, 3, 16, 16)


def is_converted(m):
    return isinstance(m, (effops.FusedConvBNAct, effops.FusedSequential, effops.ChannelShuffle)) or \
        traced_forward_of(m) is not None


# Net converts to: the root's forward rewritten (head + shuffle fused into one step of it), stem a
# FusedConvBNAct the rewritten root calls as is, block's forward rewritten (conv2 + bn2 + add + act),
# block.conv1 a FusedConvBNAct that block's rewritten forward calls as is.
DECIDED = {"<model>", "stem", "block", "block.conv1"}


def test_fast_blocks_kept_slow_block_reverted(monkeypatch):
    seen = []
    monkeypatch.setattr(speedcheck, "measure_pair", fake_timer(original_faster={"stem"}, record=seen))
    model, x = make_net(), x_in()
    fast = effops.optimize(model, example_inputs=(x,), check_speed=True)
    rep = fast.effops_report
    assert set(seen) == DECIDED
    assert type(fast.stem) is nn.Sequential and not is_converted(fast.stem)
    assert isinstance(fast.block.conv1, effops.FusedConvBNAct)
    assert traced_forward_of(fast) is not None and traced_forward_of(fast.block) is not None
    assert not any(e.path == "stem" for e in rep.swapped) and any(e.path == "block.conv1" for e in rep.swapped)
    kept = [e for e in rep.skipped if e.path == "stem"]
    assert len(kept) == 1 and "kept the original" in kept[0].what and "measured faster" in kept[0].what
    assert [m.kept for m in rep.measured if m.path == "stem"] == ["original"]
    assert rep.speed_check.startswith("done on input (2, 3, 16, 16)") and "1 kept as the original" in rep.speed_check
    # The original block uses the converted model's own parameters: one set of weights, same keys.
    assert fast.stem[0].weight is fast.state_dict(keep_vars=True)["stem.0.weight"]
    assert list(fast.state_dict()) == list(model.state_dict())
    with warnings.catch_warnings():
        # The root's rewritten forward calls the original stem now: it does not fall back (and warn).
        warnings.simplefilter("error")
        with torch.no_grad():
            assert rel_err(fast(x), model(x)) < 1e-5
    assert fast.forward.graph_module.stem is fast.stem
    assert "timed    stem" in str(rep)


def test_blocks_are_timed_on_the_input_they_get_in_the_optimized_model(monkeypatch):
    """The fused stem hands on a channels-last tensor where the original model passes NCHW: the
    probe each block is timed on has the optimized model's layout (and the same values)."""
    probes = {}

    def measure(fused, original, args, kwargs, *, path=""):
        probes[path] = args[0]
        return fake_timer()(fused, original, args, kwargs, path=path)

    monkeypatch.setattr(speedcheck, "measure_pair", measure)
    model, x = make_net(), x_in()
    seen_live = []
    fast = effops.optimize(model, example_inputs=(x,), check_speed=True)
    assert isinstance(fast.stem, effops.FusedConvBNAct)
    h = fast.block.register_forward_pre_hook(lambda m, a: seen_live.append(a[0]))
    with torch.no_grad():
        fast(x)
        stem_out = model.stem(x)
    h.remove()
    live = seen_live[0]
    if native_fast(x):  # the native backend's fused stem writes NHWC: the case this test is about
        assert live.is_contiguous(memory_format=torch.channels_last) and not stem_out.is_contiguous(
            memory_format=torch.channels_last)
    for path in ("block", "block.conv1"):
        assert probes[path].stride() == live.stride(), path
        assert rel_err(probes[path], stem_out) < 1e-5
    assert probes["stem"].stride() == x.stride()  # the model input itself


def test_original_goes_back_only_if_a_second_measurement_agrees(monkeypatch):
    """One measurement that favours the original (a burst of load on the machine) is checked by a
    second: the stem's first measurement says original, the second fused, and the fused stem stays;
    the block is measured slower twice and goes back."""
    seen = []
    flaky = fake_timer(original_faster={"block"}, record=seen)
    first = []

    def measure(fused, original, args, kwargs, *, path=""):
        f_ms, o_ms, f_out, o_out = flaky(fused, original, args, kwargs, path=path)
        if path == "stem" and path not in first:
            first.append(path)
            return 2.0, 1.0, f_out, o_out
        return f_ms, o_ms, f_out, o_out

    monkeypatch.setattr(speedcheck, "measure_pair", measure)
    fast = effops.optimize(make_net(), example_inputs=(x_in(),), check_speed=True)
    assert seen.count("stem") == 2 and seen.count("block") == 2 and seen.count("<model>") == 1
    assert isinstance(fast.stem, effops.FusedConvBNAct)
    assert [m.kept for m in fast.effops_report.measured if m.path == "stem"] == ["fused"]
    assert [m.kept for m in fast.effops_report.measured if m.path == "block"] == ["original"]
    assert traced_forward_of(fast.block) is None


def test_block_absorbed_by_rewritten_forward_is_decided_with_it(monkeypatch):
    """head (a converted container) and shuffle are fused into one step of the root's rewritten
    forward: putting head's original back alone would unfuse that forward, so they are decided
    with the root, not by themselves."""
    seen = []
    monkeypatch.setattr(speedcheck, "measure_pair", fake_timer(original_faster={"head", "shuffle"}, record=seen))
    fast = effops.optimize(make_net(), example_inputs=(x_in(),), check_speed=True)
    assert set(seen) == DECIDED
    assert isinstance(fast.head, effops.FusedConvBNAct) and isinstance(fast.shuffle, effops.ChannelShuffle)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            fast(x_in())


def test_rewritten_root_reverted_in_place(monkeypatch):
    """Keeping the original of a root whose forward effops rewrote puts the class forward and the
    original children back on the same object; nothing inside is looked at."""
    seen = []
    monkeypatch.setattr(speedcheck, "measure_pair", fake_timer(original_faster={"<model>"}, record=seen))
    model, x = make_net(), x_in()
    fast = effops.optimize(model, example_inputs=x, check_speed=True)  # a single tensor is one argument
    assert seen == ["<model>", "<model>"]  # the original measured faster twice
    assert "forward" not in fast.__dict__ and not any(is_converted(m) for m in fast.modules())
    assert fast.effops_report.swapped == []
    assert [e.path for e in fast.effops_report.skipped] == ["<model>"]
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < 1e-6


def test_swapped_root_replaced_or_reported(monkeypatch):
    """A model that is itself one fused container: with example_inputs the original comes back as
    the returned model (a copy sharing nothing with the caller's); on the first call (lazy) the
    object can't change class, so the check says it did not time it."""
    monkeypatch.setattr(speedcheck, "measure_pair", fake_timer(original_faster={"<model>"}))
    model, x = randomize_bn(cbr(3, 8)).eval(), x_in()
    fast = effops.optimize(model, example_inputs=(x,), check_speed=True)
    assert type(fast) is nn.Sequential and not any(is_converted(m) for m in fast.modules())
    assert fast.effops_report.swapped == [] and fast is not model
    assert all(p is not q for p, q in zip(fast.parameters(), model.parameters()))
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < 1e-6
    lazy = effops.optimize(model, check_speed=True)
    with torch.no_grad():
        lazy(x)
    assert isinstance(lazy, effops.FusedConvBNAct)
    assert "can't swap it back in place" in lazy.effops_report.measured[0].why


def test_differing_output_keeps_original_with_warning(monkeypatch):
    monkeypatch.setattr(speedcheck, "measure_pair", fake_timer(corrupt={"stem"}))
    with pytest.warns(RuntimeWarning, match=r"stem: its output differs from the original's"):
        fast = effops.optimize(make_net(), example_inputs=(x_in(),), check_speed=True)
    assert type(fast.stem) is nn.Sequential
    m = [m for m in fast.effops_report.measured if m.path == "stem"][0]
    assert m.kept == "original" and "relative error" in m.why


def test_outputs_differ_tolerances():
    y = torch.randn(4, 8)
    assert speedcheck.outputs_differ(y + 1e-6 * y.norm() / 8, y) is None
    assert "relative error" in speedcheck.outputs_differ(y * 1.01, y)
    assert "relative error" in speedcheck.outputs_differ(y.bfloat16() * 1.1, y.bfloat16())
    assert speedcheck.outputs_differ(y.bfloat16() * 1.01, y.bfloat16()) is None
    assert "shape" in speedcheck.outputs_differ(y[:2], y)
    assert "outputs" in speedcheck.outputs_differ((y, y), (y,))
    assert speedcheck.outputs_differ(torch.full((3,), float("nan")), torch.full((3,), float("nan"))) is None


def test_lazy_check_on_first_eval_call(monkeypatch):
    seen = []
    monkeypatch.setattr(speedcheck, "measure_pair", fake_timer(original_faster={"stem"}, record=seen))
    model, x = make_net(), x_in()
    fast = effops.optimize(model, check_speed=True)
    rep = fast.effops_report
    assert rep.speed_check.startswith("pending") and isinstance(fast.stem, effops.FusedConvBNAct)
    fast.train()
    fast(x)  # train mode: not a probe (the fused paths are eval-only)
    assert not seen and rep.speed_check.startswith("pending")
    fast.eval()
    with torch.no_grad():
        y = fast(x)
    assert set(seen) == DECIDED
    assert type(fast.stem) is nn.Sequential and rep.speed_check.startswith("done")
    assert not fast._forward_pre_hooks and not fast._forward_pre_hooks_with_kwargs
    seen.clear()
    with torch.no_grad():
        assert rel_err(fast(x), y) < 1e-6
    assert not seen  # once only


def test_lazy_check_sees_tensors_replaced_after_optimize(monkeypatch):
    """The original blocks are timed with the live model's tensors: .to() and replaced parameters
    after optimize reach them (the structure copy is rebound before the check)."""
    monkeypatch.setattr(speedcheck, "measure_pair", fake_timer(original_faster={"stem"}))
    fast = effops.optimize(make_net(), check_speed=True)
    fast = fast.to(torch.float64)
    new_w = nn.Parameter(torch.randn_like(fast.stem.conv.weight))
    fast.stem.conv.weight = new_w
    with torch.no_grad():
        fast(x_in().double())
    assert fast.stem[0].weight is new_w and fast.stem[1].running_mean.dtype == torch.float64


def test_lazy_check_skips_a_gpu_or_meta_input_in_auto_mode(monkeypatch):
    monkeypatch.delenv("EFFOPS_CHECK_SPEED", raising=False)
    monkeypatch.setattr(speedcheck, "measure_pair", fake_timer())
    fast = effops.optimize(make_net())
    assert fast.effops_report.speed_check.startswith("pending")
    rep = effops.optimize(make_net(), example_inputs=(torch.empty(1, 3, 8, 8, device="meta"),)).effops_report
    assert rep.speed_check == "not run: a meta tensor input (nothing runs to time)"


def test_deepcopy_with_pending_check(monkeypatch):
    seen = []
    monkeypatch.setattr(speedcheck, "measure_pair", fake_timer(original_faster={"stem"}, record=seen))
    fast = effops.optimize(make_net(), check_speed=True)
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        twin(x_in())
    assert type(twin.stem) is nn.Sequential and isinstance(fast.stem, effops.FusedConvBNAct)
    assert twin.effops_report.speed_check.startswith("done") and fast.effops_report.speed_check.startswith("pending")


def test_optimizing_an_optimized_model_keeps_one_pending_check(monkeypatch):
    """optimize() on a model with a pending check (effops.models returns one): the new check replaces
    it, and the first eval call runs one check (two used to run nested and fail the call)."""
    seen = []
    monkeypatch.setattr(speedcheck, "measure_pair", fake_timer(record=seen))
    x = x_in()
    with torch.no_grad():
        ref = make_net()(x)
    first = effops.optimize(make_net(), check_speed=True)
    for inplace in (False, True):
        again = effops.optimize(first if inplace else copy.deepcopy(first), check_speed=True, inplace=inplace)
        hooks = [h for h in again._forward_pre_hooks.values() if isinstance(h, speedcheck.LazyCheck)]
        assert len(hooks) == 1
        with torch.no_grad():
            y = again(x)
        assert again.effops_report.speed_check.startswith("done") and not again._forward_pre_hooks
        assert rel_err(y, ref) < 1e-5


def test_off_by_argument_and_environment(monkeypatch):
    assert effops.optimize(make_net(), check_speed=False).effops_report.speed_check == "off"
    monkeypatch.setenv("EFFOPS_CHECK_SPEED", "0")
    fast = effops.optimize(make_net(), example_inputs=(x_in(),))
    assert fast.effops_report.speed_check == "off" and not fast._forward_pre_hooks
    with pytest.raises(ValueError, match="check_speed must be"):
        effops.optimize(make_net(), check_speed="yes")


def test_real_timer_end_to_end():
    """The real measure_pair: every converted block timed, the result still matches the original."""
    model, x = make_net(), x_in().to(memory_format=torch.channels_last)
    fast = effops.optimize(model, example_inputs=(x,), check_speed=True)
    rep = fast.effops_report
    assert "<model>" in {m.path for m in rep.measured} and {m.path for m in rep.measured} <= DECIDED
    assert all(m.fused_ms > 0 and m.original_ms > 0 and m.kept in ("fused", "original") for m in rep.measured)
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < 1e-5


def test_measure_pair_interleaves_and_compares_fresh_outputs():
    calls = []

    def a(t):
        calls.append("a")
        return t.add_(1)  # writes its input: each compared output must come from a fresh copy

    def b(t):
        calls.append("b")
        return t + 1

    x = torch.zeros(3)
    fa, fb, oa, ob = speedcheck.measure_pair(a, b, (x,), {}, warmup=1, min_reps=3, max_reps=3, budget_s=0)
    assert torch.equal(oa, ob) and fa > 0 and fb > 0
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]


def test_uncopyable_model_is_converted_without_the_check():
    import threading

    model = make_net()
    model.lock = threading.Lock()  # deepcopy can't copy a lock
    fast = effops.optimize(model, example_inputs=(x_in(),), inplace=True, check_speed=True)
    assert fast.effops_report.speed_check.startswith("not run: the model's modules can't be deep-copied")
    assert isinstance(fast.stem, effops.FusedConvBNAct)
