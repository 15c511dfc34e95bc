"""The cached plans of the eager native CPU path (FusedConvBNAct, FusedGhostModule, SqueezeExcite.gate_of):
once a full call has checked a module's configuration, later calls with the same input signature take
a short path. Every change the full path would see must still be seen: conv settings, BN eps, an
activation's parameter, replaced children and parameters, hooks, train mode, gradients, autocast, a
forced backend, copies. Each test first makes sure the short path is in use (so it tests something)."""
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effops import FusedConvBNAct, dispatch, native, use_backend
from effops.nn.ghost import FusedGhostModule
from effops.nn.se import SqueezeExcite

from helpers import assert_matches, count_dispatch, randomize_bn

pytestmark = pytest.mark.skipif(
    not native.available() or dispatch.CPU_PREFERENCE != "native",
    reason="the short paths serve the native CPU backend when it is the preferred backend")


def _nhwc(*shape):
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


def _modules_ref(conv, bn, act, x):
    """The modules' math in float64 (eval BN)."""
    y = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(), conv.stride,
                 conv.padding, conv.dilation, conv.groups)
    if bn is not None:
        y = F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(), bn.bias.double(),
                         False, 0.0, bn.eps)
    return y if act is None else act.double()(y)


def _fused(cin=8, cout=12, k=3, act="relu", **kw):
    torch.manual_seed(0)
    return randomize_bn(FusedConvBNAct(cin, cout, k, act=act, **kw)).eval()


def _warm(f, *args, **kw):
    with torch.no_grad():
        f(*args, **kw)
        return f(*args, **kw)


def test_conv_plan_is_used_and_matches():
    f, x = _fused(), _nhwc(2, 8, 9, 7)
    y = _warm(f, x)
    assert f._native_plan is not None
    assert_matches(y, _modules_ref(f.conv, f.bn, f.act, x))
    r = _nhwc(2, 12, 9, 7)
    with torch.no_grad():
        f(x, r)
        y = f(x, r)
    assert_matches(y, _modules_ref(f.conv, f.bn, f.act, x) + r.double())


@pytest.mark.parametrize("change", ["stride", "padding", "dilation", "eps", "slope", "running_var_inplace",
                                    "new_weight"])
def test_conv_plan_sees_changes_after_first_call(change):
    f, x = _fused(act=nn.LeakyReLU(0.1)), _nhwc(2, 8, 9, 7)
    _warm(f, x)
    assert f._native_plan is not None
    with torch.no_grad():
        if change == "stride":
            f.conv.stride = (2, 2)
        elif change == "padding":
            f.conv.padding = (0, 0)
        elif change == "dilation":
            f.conv.dilation = (2, 2)
        elif change == "eps":
            f.bn.eps = 0.5
        elif change == "slope":
            f.act.negative_slope = 0.3
        elif change == "running_var_inplace":
            f.bn.running_var.mul_(3.0)
        else:
            f.conv.weight = nn.Parameter(torch.randn_like(f.conv.weight))
        y = f(x)
    assert_matches(y, _modules_ref(f.conv, f.bn, f.act, x))


def test_conv_hook_after_first_call_runs_modules():
    f, x = _fused(), _nhwc(1, 8, 6, 6)
    _warm(f, x)
    seen = []
    f.bn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        y = f(x)
    assert seen == [torch.Size([1, 12, 6, 6])]
    assert_matches(y, _modules_ref(f.conv, f.bn, f.act, x))


def test_conv_child_replaced_and_train_mode():
    f, x = _fused(), _nhwc(2, 8, 6, 6)
    _warm(f, x)
    f.act = nn.Hardswish()
    with torch.no_grad():
        y = f(x)
    assert_matches(y, _modules_ref(f.conv, f.bn, f.act, x))
    _warm(f, x)
    f.train()
    count = int(f.bn.num_batches_tracked)
    with torch.no_grad():
        f(x)
    assert int(f.bn.num_batches_tracked) == count + 1  # batch statistics: the modules ran


def test_conv_grad_and_autocast_after_plan():
    f, x = _fused(), _nhwc(2, 8, 6, 6)
    _warm(f, x)
    xg = x.clone().requires_grad_()
    f(xg).sum().backward()
    assert xg.grad is not None and f.conv.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert f(x).dtype == torch.bfloat16


@pytest.mark.parametrize("how", ["context", "environment"])
def test_conv_plan_forced_backend_after_plan(monkeypatch, how):
    f, x = _fused(), _nhwc(2, 8, 6, 6)
    _warm(f, x)
    plan = f._native_plan
    calls = count_dispatch(monkeypatch)
    with torch.no_grad(), (use_backend("reference") if how == "context" else warnings.catch_warnings()):
        if how == "environment":
            monkeypatch.setenv("EFFOPS_BACKEND", "reference")
        assert plan.run(x, None, True, None, 1, None) is None
        y = f(x)
    assert calls == ["conv_bn_act"]  # through the dispatcher, which picks the forced backend
    assert_matches(y, _modules_ref(f.conv, f.bn, f.act, x))
    monkeypatch.delenv("EFFOPS_BACKEND", raising=False)
    with torch.no_grad():
        f(x)
        f(x)
    assert calls == ["conv_bn_act"]


def test_conv_plan_other_inputs_and_copies():
    f, x = _fused(), _nhwc(2, 8, 6, 6)
    _warm(f, x)
    with torch.no_grad():
        for shape in [(1, 8, 5, 5), (2, 8, 6, 6)]:
            x2 = _nhwc(*shape)
            assert_matches(f(x2), _modules_ref(f.conv, f.bn, f.act, x2))
        with pytest.raises(ValueError, match="channels"):
            f(_nhwc(2, 7, 6, 6))
        with pytest.raises(ValueError, match="residual"):
            f(x, _nhwc(2, 12, 5, 6))
    g = copy.deepcopy(f)
    h = pickle.loads(pickle.dumps(f))
    for m in (g, h):
        assert m._native_plan is None  # rebuilt for the copy's own modules
        with torch.no_grad():
            m.bn.running_mean.add_(1.0)
            assert_matches(m(x), _modules_ref(m.conv, m.bn, m.act, x))
    assert_matches(_warm(f, x), _modules_ref(f.conv, f.bn, f.act, x))  # the original is untouched


def _ghost():
    torch.manual_seed(0)
    return randomize_bn(FusedGhostModule(8, 16, kernel_size=1, ratio=2, dw_size=3, act="relu")).eval()


def _ghost_ref(g, x):
    x1 = _modules_ref(g.primary_conv[0], g.primary_conv[1], g.primary_conv[2], x)
    x2 = _modules_ref(g.cheap_operation[0], g.cheap_operation[1], g.cheap_operation[2], x1.float())
    return torch.cat([x1, x2], 1)[:, :16]


def test_ghost_plan_is_used_and_sees_changes():
    g, x = _ghost(), _nhwc(2, 8, 7, 7)
    y = _warm(g, x)
    assert g._native_plan is not None
    assert_matches(y, _ghost_ref(g, x))
    with torch.no_grad():
        g.cheap_operation[1].eps = 0.3
        assert_matches(g(x), _ghost_ref(g, x))
        gate = torch.rand(2, 8)
        assert_matches(g(x, gate=gate), _ghost_ref(g, x * gate[:, :, None, None]))
    seen = []
    g.primary_conv.register_forward_hook(lambda m, i, o: seen.append(1))  # on the container
    with torch.no_grad():
        assert_matches(g(x), _ghost_ref(g, x))
    assert seen == [1]


def test_ghost_plan_cheap_conv_setting_changed_falls_back():
    g, x = _ghost(), _nhwc(2, 8, 7, 7)
    _warm(g, x)
    g.cheap_operation[0].stride = (2, 2)  # no longer a ghost module: the original forward (raises as it does)
    with torch.no_grad(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError):
            g(x)
    assert any("unfused" in str(m.message) for m in w)


def test_se_gate_plan_sees_changes():
    torch.manual_seed(0)
    se, x = SqueezeExcite(16, 8).eval(), _nhwc(2, 16, 5, 5)

    def ref():
        return se._squeeze_modules(x).flatten(1).float()

    with torch.no_grad():
        se.gate_of(x)
        torch.testing.assert_close(se.gate_of(x), ref())
        assert se._native_gate is not None
        se.gate = nn.Hardsigmoid()  # a replaced child
        torch.testing.assert_close(se.gate_of(x), ref())
        se.gate_of(x)
        assert se._native_gate is not None
        se.fc2.weight.mul_(2.0)  # in place
        torch.testing.assert_close(se.gate_of(x), ref())
        se.fc1.bias = nn.Parameter(torch.randn(8))  # a replaced parameter
        torch.testing.assert_close(se.gate_of(x), ref())
        se.act = nn.LeakyReLU(0.5)
        se.gate_of(x)
        se.act.negative_slope = -2.0  # an activation parameter the children snapshot doesn't see
        torch.testing.assert_close(se.gate_of(x), ref())
        expected = ref()
    seen = []
    se.fc2.register_forward_hook(lambda m, i, o: seen.append(1))
    with torch.no_grad():
        torch.testing.assert_close(se.gate_of(x), expected)
    assert seen == [1]


class _ComparingRaises(dict):
    """A snapshot copy that fails the test if the snapshot compares it with the live dict."""

    def __eq__(self, other):
        raise AssertionError("the snapshot compared its dicts")

    __ne__ = __eq__


def test_snapshot_compares_only_after_a_child_is_registered():
    """The children snapshot compares its dicts only when the structure epoch moved: a child
    registered on a watched module (setattr, ``add_module``) moves it, anything else does not."""
    f, x = _fused(), _nhwc(1, 8, 6, 6)
    _warm(f, x)
    f._snapshot._copies = tuple(_ComparingRaises(d) for d in f._snapshot._copies)
    with torch.no_grad():
        f(x)  # no registration since the last check: no comparison
        nn.Sequential(nn.Conv2d(1, 1, 1))  # modules nobody watches getting children: still none
        f(x)
        f.bn = copy.deepcopy(f.bn)
        with pytest.raises(AssertionError, match="compared its dicts"):
            f(x)


def test_child_written_into_modules_directly_is_seen_after_refresh():
    """``m._modules[k] = v`` bypasses torch's registration hook; ``effops.refresh()`` makes every
    snapshot compare again."""
    import effops

    f, x = _fused(), _nhwc(1, 8, 6, 6)
    _warm(f, x)
    bn = randomize_bn(nn.BatchNorm2d(12)).eval()
    f._modules["bn"] = bn
    effops.refresh()
    with torch.no_grad():
        y = f(x)
    assert f.bn is bn
    assert_matches(y, _modules_ref(f.conv, bn, f.act, x))
