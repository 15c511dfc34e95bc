"""Fused modules run with the parameters, buffers, settings and children they hold *now*.

Every way a tensor can change is covered (in place, through ``.data`` — which does not bump
the version counter — and through numpy), and so is every setting a kernel is launched with
(activation, padding, stride, dilation, a replaced child). Expected values always come from
the plain PyTorch modules, changed the same way.

Every backend derives what it applies (BN scales and biases, cuDNN's folded weights, the native
CPU backend's prepacked BN-folded weights) once per parameter state (identity, data pointer,
version counter): a write no version counter sees (``.data`` in place, numpy) is seen after
``effops.refresh()``, which these tests then call.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import effops
from effops import FusedConvBNAct, FusedOSA
from effops.models.classic_vovnet import OSAModule

from helpers import KERNEL_DEVICE, assert_matches, needs_triton, randomize_bn

DEV = KERNEL_DEVICE


def _conv_bn_act(act=nn.ReLU, bias=False):
    ref = randomize_bn(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=bias), nn.BatchNorm2d(6), act())).eval()
    return ref.to(DEV), FusedConvBNAct.from_modules(*copy.deepcopy(list(ref))).eval().to(DEV)


def _x(c=4, n=2, h=5, w=6):
    return torch.randn(n, c, h, w, device=DEV).contiguous(memory_format=torch.channels_last)


def _same_change(ref, fused, fn):
    """Apply ``fn`` to the matching children of the reference Sequential and the fused module."""
    fn(ref[0], ref[1])
    fn(fused.conv, fused.bn)


def _invisible_write_done():
    """After a write PyTorch does not count: what the README asks users to do."""
    effops.refresh()


def _check(fused, ref, x):
    with torch.no_grad():
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))


@needs_triton
@pytest.mark.parametrize("how", ["weight.data", "bias.data", "bn.weight.data", "running_var.data", "numpy",
                                 "set .data", "in place"])
def test_fused_conv_sees_every_kind_of_tensor_change(how):
    ref, fused = _conv_bn_act(bias=True)
    x = _x()
    _check(fused, ref, x)  # a first call, so anything cached would be cached now

    def change(conv, bn):
        if how == "weight.data":
            conv.weight.data.mul_(3)  # .data: the parameter's version counter does not move
        elif how == "bias.data":
            conv.bias.data.add_(1)
        elif how == "bn.weight.data":
            bn.weight.data.mul_(-2)
        elif how == "running_var.data":
            bn.running_var.data.mul_(4)
        elif how == "numpy":
            if conv.weight.device.type != "cpu":
                pytest.skip("numpy shares memory with CPU tensors only")
            bn.running_mean.numpy()[:] += 1.5  # a write no version counter sees
        elif how == "set .data":
            conv.weight.data = conv.weight.data * 0.5
        else:
            with torch.no_grad():
                bn.bias.sub_(1)

    before = fused(x).detach().clone()
    _same_change(ref, fused, change)
    if how in ("weight.data", "bias.data", "bn.weight.data", "running_var.data", "numpy"):
        _invisible_write_done()
    _check(fused, ref, x)
    assert not torch.allclose(fused(x).detach(), before)


@needs_triton
def test_fused_osa_sees_data_writes_everywhere():
    ref = randomize_bn(OSAModule(6, 5, 6, 2, "OSA", identity=True, ese=True)).eval().to(DEV)
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    x = _x(6)
    _check(fused, ref, x)
    for m in (ref, fused):
        m.layers[0][0].weight.data.mul_(2)          # a stage conv
        m.concat[1].running_var.data.mul_(3)        # the aggregation's BN
        m.ese.fc.weight.data.neg_()                 # the eSE gate
    _invisible_write_done()
    _check(fused, ref, x)


@needs_triton
def test_fused_osa_depthwise_weight_data_write():
    ref = randomize_bn(OSAModule(6, 6, 6, 2, "OSA", identity=True, ese=True, depthwise=True)).eval().to(DEV)
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    x = _x(6)
    _check(fused, ref, x)
    for m in (ref, fused):
        m.layers[1][0].weight.data.mul_(-1.5)       # the depthwise conv of stage 1
    _invisible_write_done()
    _check(fused, ref, x)


# -- settings and children read live ------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("change", ["act identity", "act leaky", "leaky slope", "padding", "stride", "dilation"])
def test_fused_conv_runs_with_the_settings_it_holds(change):
    ref, fused = _conv_bn_act(nn.LeakyReLU if change == "leaky slope" else nn.ReLU)
    x = _x(h=7, w=8)
    _check(fused, ref, x)
    if change == "act identity":
        ref[2], fused.act = nn.Identity(), nn.Identity()
    elif change == "act leaky":
        ref[2], fused.act = nn.LeakyReLU(0.3), nn.LeakyReLU(0.3)
    elif change == "leaky slope":
        ref[2].negative_slope = fused.act.negative_slope = 0.7
    else:
        attr, value = {"padding": ("padding", (2, 0)), "stride": ("stride", (2, 1)),
                       "dilation": ("dilation", (2, 2))}[change]
        setattr(ref[0], attr, value)
        setattr(fused.conv, attr, value)
    assert fused.activation == effops.activations.activation_of(ref[2])
    _check(fused, ref, x)


def test_an_activation_effops_cannot_fuse_runs_the_modules():
    ref, fused = _conv_bn_act()
    ref[2], fused.act = nn.Mish(), nn.Mish()
    x = _x()
    with pytest.warns(UserWarning, match="runs unfused: activation Mish is not supported"):
        _check(fused, ref, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(fused, ref, x)  # warned once per signature, not on every call


@needs_triton
def test_replacing_the_conv_or_bn_takes_effect():
    ref, fused = _conv_bn_act()
    x = _x()
    _check(fused, ref, x)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).to(DEV)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(6)))[0].eval().to(DEV)
    ref[0], ref[1] = conv, bn
    fused.conv, fused.bn = copy.deepcopy(conv), copy.deepcopy(bn)
    _check(fused, ref, x)


@needs_triton
def test_fused_osa_replaced_children_and_settings():
    ref = randomize_bn(OSAModule(6, 5, 6, 2, "OSA", identity=True)).eval().to(DEV)
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    x = _x(6)
    _check(fused, ref, x)
    new_conv = nn.Conv2d(5, 5, 3, padding=1, bias=False).to(DEV)
    ref.layers[1][0], fused.layers[1][0] = new_conv, copy.deepcopy(new_conv)
    _check(fused, ref, x)
    ref.identity = fused.identity = False
    _check(fused, ref, x)
    for m in (ref, fused):  # one activation for the whole block: still fusable
        for layer in list(m.layers) + [m.concat]:
            layer[2].negative_slope = 0.0
    _check(fused, ref, x)


def test_fused_osa_refuses_a_change_it_cannot_run():
    ref = randomize_bn(OSAModule(6, 5, 6, 2, "OSA")).eval()
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    x = torch.randn(1, 6, 5, 5)
    fused(x)
    fused.layers[0][0].padding = (0, 0)  # no longer size-preserving: the stage buffer can't hold it
    with pytest.raises(ValueError, match="modules changed after construction.*size-preserving"):
        fused(x)
    fused.layers[0][0].padding = (1, 1)
    fused.concat[2] = nn.SiLU()  # the aggregation alone with another activation
    with pytest.raises(ValueError, match="one activation"):
        fused(x)


def test_fused_sequential_with_a_replaced_child_runs_it():
    ref = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())).eval()
    fast = effops.optimize(nn.Sequential(*copy.deepcopy(list(ref))))
    assert type(fast).__name__ == "FusedSequential"
    x = torch.randn(2, 3, 4, 4)
    _check(fast, ref, x)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(4)))[0].eval()
    ref[4], fast[4] = bn, copy.deepcopy(bn)
    with pytest.warns(UserWarning, match="replaced after optimize"):
        _check(fast, ref, x)


def test_traced_forward_with_a_replaced_child_runs_the_class_forward():
    tv = pytest.importorskip("torchvision")
    ref = randomize_bn(tv.models.resnet.BasicBlock(4, 4)).eval()
    fast = effops.optimize(copy.deepcopy(ref))
    assert "forward" in fast.__dict__  # traced
    x = torch.randn(2, 4, 5, 5)
    _check(fast, ref, x)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(4)))[0].eval()
    ref.bn2, fast.bn2 = bn, copy.deepcopy(bn)
    with pytest.warns(UserWarning, match="replaced after optimize"):
        _check(fast, ref, x)


# -- float64 stays float64 --------------------------------------------------------------------

@pytest.mark.parametrize("norm", [False, True])
def test_float64_bias_and_bn_stay_in_float64(norm):
    ref = nn.Sequential(*[m for m in (nn.Conv2d(3, 5, 3, padding=1, bias=True),
                                      nn.BatchNorm2d(5) if norm else None, nn.SiLU()) if m is not None])
    randomize_bn(ref).eval().double()
    with torch.no_grad():
        ref[0].bias.mul_(1e4)  # a large bias: rounding it to float32 costs ~1e-4 absolute
    mods = copy.deepcopy(list(ref))
    fused = FusedConvBNAct.from_modules(mods[0], mods[1] if norm else None, mods[-1]).eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-12, atol=1e-12)


# -- the GEMM kernel gets the weight layout it reads fastest, whatever the module holds -------

@needs_triton
@pytest.mark.parametrize("layout", ["oihw", "ohwi"])
def test_device_path_accepts_any_weight_layout(monkeypatch, layout):
    from helpers import device_branch

    device_branch(monkeypatch, autotune=False)
    ref, fused = _conv_bn_act()
    if layout == "ohwi":
        for m in (ref[0], fused.conv):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    assert fused.conv.weight.is_contiguous(memory_format=torch.channels_last) == (layout == "ohwi")
    _check(fused, ref, _x())


# -- what is derived once per parameter state ----------------------------------------------

def _aten_ops(fn):
    """Names of the ATen ops ``fn()`` runs (what a GPU would launch as kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


BN_MATH = {"aten::rsqrt", "aten::addcmul", "aten::_foreach_rsqrt_"}


def test_fused_conv_derives_scale_bias_once_per_bn_state():
    """Eval inference on the Python path (reference backend): the BN's scale and bias are computed
    on the first call and reused until a BN tensor changes in a way PyTorch counts; a write it
    does not count is seen after ``effops.refresh()``."""
    ref, fused = _conv_bn_act(bias=True)
    ref, fused, x = ref.cpu(), fused.cpu(), _x().cpu()
    with torch.no_grad(), effops.use_backend("reference"):
        _check(fused, ref, x)
        assert not BN_MATH & set(_aten_ops(lambda: fused(x)))  # reused: nothing derived
        for m in (ref[1], fused.bn):
            m.running_var.mul_(2)  # in place: the version counter moves
        assert BN_MATH & set(_aten_ops(lambda: fused(x)))
        _check(fused, ref, x)
        stale = fused(x).clone()
        for m in (ref[1], fused.bn):
            m.weight.data.mul_(-1)  # .data: no version counter moves
        assert torch.equal(fused(x), stale)  # the documented limit, until refresh()
        effops.refresh()
        _check(fused, ref, x)
        ref.train()(x), fused.train()(x)  # train-mode forwards update the running statistics in place
        ref.eval(), fused.eval()
        _check(fused, ref, x)  # seen through num_batches_tracked


def test_scale_bias_stays_differentiable_when_autograd_needs_it():
    ref, fused = _conv_bn_act()
    ref, fused, x = ref.cpu(), fused.cpu(), _x().cpu()
    with effops.use_backend("reference"):
        with torch.no_grad():
            fused(x)  # a cached entry exists; autograd must not use it
        fused(x).sum().backward()
        ref(x).sum().backward()
    for a, b in ((fused.bn.weight, ref[1].weight), (fused.bn.bias, ref[1].bias), (fused.conv.weight, ref[0].weight)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_fused_osa_derives_its_arguments_once_per_state():
    ref = randomize_bn(OSAModule(6, 5, 6, 2, "OSA", identity=True, ese=True)).eval()
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    x = _x(6).cpu()
    with torch.no_grad(), effops.use_backend("reference"):
        _check(fused, ref, x)
        assert not BN_MATH & set(_aten_ops(lambda: fused(x)))
        for m in (ref, fused):
            m.concat[1].running_mean.add_(0.25)
            m.ese.fc.bias.sub_(1)
        _check(fused, ref, x)


def test_copies_and_pickles_start_with_empty_derived_caches():
    import io

    ref, fused = _conv_bn_act()
    ref, fused, x = ref.cpu(), fused.cpu(), _x().cpu()
    with torch.no_grad(), effops.use_backend("reference"):
        fused(x)
        cache = fused.__dict__["_scale_bias_cache"]
        assert cache._value is not None
        clone = copy.deepcopy(fused)
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for m in (clone, loaded):
            assert m.__dict__["_scale_bias_cache"]._value is None
            m.bn.running_var.data.mul_(9)  # not counted: refresh() must reach the copy's cache too
            m(x)
        ref[1].running_var.data.mul_(9)
        effops.refresh()
        _check(clone, ref, x)
        _check(loaded, ref, x)


def test_vendor_fold_is_reused_and_follows_its_sources():
    """cuDNN's folded operands (``conv._vendor_weight_bias``; run here through ``_launch_vendor``'s
    plain ``F.conv2d`` config, which runs on CPU): computed once per state of the weight, scale
    and bias, recomputed when one changes, dropped by ``effops.refresh()`` and when a source dies."""
    from effops.ops import conv
    from effops.ops.reference import bn_scale_bias

    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    scale, bias = torch.rand(6) + 0.5, torch.randn(6)
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)

    def run():
        return conv._launch_vendor("cudnn", x, w, scale, bias, None, None, (1, 1), (1, 1), (1, 1), 1, "relu", 0.0,
                                   True)

    def expected():
        return torch.relu(torch.nn.functional.conv2d(x.double(), w.double() * scale.double().view(-1, 1, 1, 1),
                                                     bias.double(), 1, 1))

    conv.clear_vendor_folds()
    with torch.no_grad():
        assert_matches(run(), expected())
        assert "aten::mul" not in _aten_ops(run)  # reused
        w.mul_(-1)  # in place: recomputed
        assert "aten::mul" in _aten_ops(run)
        assert_matches(run(), expected())
        scale.data.add_(1)  # not counted: seen after refresh()
        effops.refresh()
        assert_matches(run(), expected())
        assert len(conv._VENDOR_FOLDS) == 1
        w2 = torch.randn(6, 4, 3, 3)  # another weight: another entry
        s2, b2 = bn_scale_bias(None, None, None, torch.zeros(6), torch.ones(6), 0.0)
        conv._vendor_weight_bias(w2, s2, b2, torch.float32)
        dead_key = (id(w2), id(s2), id(b2), torch.float32)
        assert len(conv._VENDOR_FOLDS) == 2 and dead_key in conv._VENDOR_FOLDS
        del w2, s2, b2  # its sources die; the entry goes at the next pruning pass
        conv._VENDOR_PRUNE["at"] = 0  # which the next insert then runs
        w3 = torch.randn(6, 4, 3, 3)
        conv._vendor_weight_bias(w3, scale, bias, torch.float32)
        assert dead_key not in conv._VENDOR_FOLDS and len(conv._VENDOR_FOLDS) == 2  # w's entry and w3's
        assert conv._VENDOR_PRUNE["at"] == 64
    conv.clear_vendor_folds()
