"""Fused modules run with the parameters, buffers, settings and children they hold *now*.

Every way a tensor can change is covered (in place, through ``.data`` — which does not bump
the version counter — and through numpy), and so is every setting a kernel is launched with
(activation, padding, stride, dilation, a replaced child). Expected values always come from
the plain PyTorch modules, changed the same way.

The native CPU backend derives its prepacked, BN-folded weights once per parameter state
(identity, data pointer, version counter): a write no version counter sees (``.data`` in place,
numpy) is seen there after ``effops.refresh()``, which these tests then call.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import effops
from effops import FusedConvBNAct, FusedOSA
from effops.ops.conv import native_fast
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


def _invisible_write_done(x):
    """After a write PyTorch does not count: what a user of the native CPU backend does."""
    if native_fast(x):
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
        _invisible_write_done(x)
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
    _invisible_write_done(x)
    _check(fused, ref, x)


@needs_triton
def test_fused_osa_depthwise_weight_data_write():
    ref = randomize_bn(OSAModule(6, 6, 6, 2, "OSA", identity=True, ese=True, depthwise=True)).eval().to(DEV)
    fused = FusedOSA.from_module(copy.deepcopy(ref)).eval()
    x = _x(6)
    _check(fused, ref, x)
    for m in (ref, fused):
        m.layers[1][0].weight.data.mul_(-1.5)       # the depthwise conv of stage 1
    _invisible_write_done(x)
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
