"""FusedConvBNAct against nn.Sequential(conv, bn, act): train and eval, outputs, grads, running stats."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effops
from effops import FusedConvBNAct

from helpers import DTYPES, KERNEL_DEVICE, assert_matches, count_dispatch, needs_triton, randomize_bn, rel_err

DEV = KERNEL_DEVICE


def _pair(act=nn.ReLU, conv_bias=False, norm=True, k=3, groups=1, cin=6, cout=10, stride=1):
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=conv_bias)
    bn = nn.BatchNorm2d(cout) if norm else None
    a = act()
    ref = nn.Sequential(*[m for m in (conv, bn, a) if m is not None])
    randomize_bn(ref)
    fused = FusedConvBNAct.from_modules(*[copy.deepcopy(m) for m in (conv, bn, a)])
    return ref.to(DEV), fused.to(DEV)


def _x(n=3, c=6, h=7, w=9):
    return torch.randn(n, c, h, w, device=DEV).contiguous(memory_format=torch.channels_last).requires_grad_()


@needs_triton
@pytest.mark.parametrize(
    "act, conv_bias, norm, groups",
    [(nn.ReLU, False, True, 1), (nn.SiLU, True, True, 1), (nn.Hardswish, False, False, 1), (nn.ReLU6, True, True, 2)],
)
def test_eval_matches_and_grads(act, conv_bias, norm, groups):
    ref, fused = _pair(act, conv_bias, norm, groups=groups)
    ref.eval(), fused.eval()
    x1, x2 = _x(), None
    x2 = x1.detach().clone().requires_grad_()
    y_ref, y = ref(x1), fused(x2)
    with torch.no_grad():
        assert_matches(y, copy.deepcopy(ref).double()(x1.double()), fp32_tol=1e-5)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g)
    assert rel_err(x2.grad, x1.grad) < 1e-5
    ref_params = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        name = {"conv.weight": "0.weight", "conv.bias": "0.bias", "bn.weight": "1.weight", "bn.bias": "1.bias"}[name]
        assert rel_err(p.grad, ref_params[name].grad) < 1e-5, name


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU])
def test_train_matches_exactly_and_updates_running_stats(act):
    ref, fused = _pair(act, conv_bias=True)
    ref.train(), fused.train()
    for _ in range(2):
        x1 = _x()
        x2 = x1.detach().clone().requires_grad_()
        y_ref, y = ref(x1), fused(x2)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(y)
        y_ref.backward(g)
        y.backward(g)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.bn.running_mean, ref[1].running_mean)
    torch.testing.assert_close(fused.bn.running_var, ref[1].running_var)
    assert fused.bn.num_batches_tracked.item() == ref[1].num_batches_tracked.item() == 2
    torch.testing.assert_close(fused.conv.weight.grad, ref[0].weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.bn.weight.grad, ref[1].weight.grad, rtol=1e-5, atol=1e-6)


@needs_triton
def test_eval_follows_parameter_changes():
    ref, fused = _pair()
    ref.eval(), fused.eval()
    x = _x().detach()
    with torch.no_grad():
        y0 = fused(x)
        for m in (ref[1], fused.bn):
            m.running_mean.add_(0.5)  # in-place update: version counter changes
        assert_matches(fused(x), ref(x))
        assert not torch.allclose(fused(x), y0)
        # load_state_dict copies in place too
        sd = {k: v.clone() for k, v in ref.state_dict().items()}
        sd["1.bias"] += 1.0
        ref.load_state_dict(sd)
        fused.load_state_dict({"conv.weight": sd["0.weight"], **{f"bn.{k[2:]}": v for k, v in sd.items() if k.startswith("1.")}})
        assert_matches(fused(x), ref(x))


@needs_triton
def test_mode_flip_rederives_fold():
    ref, fused = _pair()
    x = _x().detach()
    fused.eval(), ref.eval()
    with torch.no_grad():
        fused(x)
    fused.train(), ref.train()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-6)  # running stats updated here
    fused.eval(), ref.eval()
    with torch.no_grad():
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_eval_half_precision(dtype):
    ref, fused = _pair(nn.SiLU)
    ref.eval(), fused.eval()
    ref64 = copy.deepcopy(ref).double()
    x = _x().detach()
    with torch.no_grad():
        y = fused.to(dtype)(x.to(dtype))
        assert y.dtype == dtype
        assert_matches(y, ref64(x.double()), ref.to(dtype)(x.to(dtype)))


def test_state_dict_round_trip():
    seq = randomize_bn(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())).eval()
    fused = FusedConvBNAct(4, 8, 3).eval()
    assert set(fused.state_dict()) == {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    fused.load_state_dict({k.replace("0.", "conv.").replace("1.", "bn."): v for k, v in seq.state_dict().items()})
    named = FusedConvBNAct.from_modules(*copy.deepcopy(list(seq)), names=("0", "1", "2")).eval()
    assert list(named.state_dict()) == list(seq.state_dict())
    # The loaded values are the ones computed with: both modules give the Sequential's output.
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad(), effops.use_backend("reference"):
        ref64 = copy.deepcopy(seq).double()(x.double())
        assert_matches(fused(x), ref64)
        assert_matches(named(x), ref64)
    back = randomize_bn(copy.deepcopy(seq))  # different statistics until loaded
    back.load_state_dict(named.state_dict())  # and back
    for k, v in seq.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_constructor_matches_timm_style_defaults():
    m = FusedConvBNAct(8, 16, 3, stride=2, act="hardswish")
    assert m.conv.padding == (1, 1) and m.conv.stride == (2, 2) and m.activation == ("hardswish", 0.0)
    assert m.bn.num_features == 16
    # ...and it computes what the PyTorch modules it stands for compute, with the same weights.
    ref = randomize_bn(nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()))
    m.load_state_dict({k.replace("0.", "conv.").replace("1.", "bn."): v for k, v in ref.state_dict().items()})
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(m.eval()(x), ref.eval().double()(x.double()))
    m = FusedConvBNAct(8, 16, 1, norm=False, bias=True, act="leaky_relu", act_param=0.2)
    assert m.bn is None and m.conv.bias is not None and m.activation == ("leaky_relu", 0.2)
    with torch.no_grad(), effops.use_backend("reference"):
        w, b = m.conv.weight.double(), m.conv.bias.double()
        assert_matches(m.eval()(x), F.leaky_relu(F.conv2d(x.double(), w, b), 0.2))


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda: (torch.randn(2, 5, 8, 8),), "expected input with 6 channels"),
        (lambda: (torch.randn(6, 8, 8),), "expected a 4-D input"),
        (lambda: (torch.randint(0, 5, (2, 6, 8, 8)),), "expected a floating-point input"),
        (lambda: (torch.randn(2, 6, 8, 8, device="meta"),), "expected the same device"),
        (lambda: (torch.randn(2, 6, 1, 1)[:, :, :0],), "too small"),
    ],
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bad_input_errors(make, msg, mode):
    m = FusedConvBNAct(6, 4, 3, padding=0)
    m.train(mode == "train")
    with pytest.raises((ValueError, TypeError), match=msg):
        m(*make())


@needs_triton
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_empty_batch_returns_empty(mode):
    m = FusedConvBNAct(6, 4, 3).to(DEV).train(mode == "train")
    before = m.bn.running_mean.clone()
    y = m(torch.randn(0, 6, 8, 8, device=DEV))
    assert y.shape == (0, 4, 8, 8)
    torch.testing.assert_close(m.bn.running_mean, before)


def test_unsupported_modules_are_refused():
    with pytest.raises(ValueError, match="activation Softplus is not supported"):
        FusedConvBNAct.from_modules(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Softplus())
    with pytest.raises(ValueError, match="padding_mode"):
        FusedConvBNAct.from_modules(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match="features"):
        FusedConvBNAct.from_modules(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5), nn.ReLU())


def test_reference_backend_in_eval_matches():
    ref, fused = _pair(nn.LeakyReLU)
    ref.eval(), fused.eval()
    x = _x().detach()
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))


@pytest.mark.skipif(not hasattr(torch, "get_autocast_dtype"), reason="torch.get_autocast_dtype needs torch >= 2.4")
def test_autocast_cpu_bfloat16():
    ref, fused = _pair()
    ref.eval().cpu(), fused.eval().cpu()
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), effops.use_backend("reference"):
        y, y_ref = fused(x), ref(x)
    assert y.dtype == torch.bfloat16 == y_ref.dtype
    ref64 = copy.deepcopy(ref).double()(x.double())
    assert_matches(y, ref64, y_ref)


@pytest.mark.skipif(not hasattr(torch, "get_autocast_dtype"), reason="torch.get_autocast_dtype needs torch >= 2.4")
@pytest.mark.parametrize("after", [True, False], ids=["after_act", "before_act"])
def test_autocast_with_a_float32_residual_returns_what_pytorch_returns(after):
    """Under autocast PyTorch adds the bf16 conv output to a float32 residual in float32
    (type promotion) and returns float32: so does the fused module."""
    ref, fused = _pair()
    ref.eval().cpu(), fused.eval().cpu()
    x, r = torch.randn(2, 6, 7, 9), torch.randn(2, 10, 7, 9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x, r, residual_after_act=after)
        y_ref = ref[2](ref[1](ref[0](x))) + r if after else ref[2](ref[1](ref[0](x)) + r)
    assert y.dtype == y_ref.dtype == torch.float32
    torch.testing.assert_close(y, y_ref)


@needs_triton
def test_bias_only_training_gets_gradients():
    """A BN-less conv with a frozen weight but trainable bias still takes the autograd path."""
    m = FusedConvBNAct(6, 4, 3, norm=False, bias=True).to(DEV).eval()
    m.conv.weight.requires_grad_(False)
    x = torch.randn(2, 6, 5, 5, device=DEV)
    g = torch.randn(2, 4, 5, 5, device=DEV)
    y = m(x)
    y.backward(g)
    b = m.conv.bias.detach().clone().requires_grad_()
    y_ref = torch.relu(F.conv2d(x, m.conv.weight, b, padding=1))
    y_ref.backward(g)
    with torch.no_grad():
        assert_matches(y, F.relu(F.conv2d(x.double(), m.conv.weight.double(), b.double(), padding=1)))
    assert rel_err(m.conv.bias.grad, b.grad) < 1e-5


@pytest.mark.parametrize(
    "bn_kwargs, conv_kwargs",
    [
        (dict(affine=False), dict(padding=1)),
        (dict(track_running_stats=False), dict(padding=1)),   # eval uses batch stats: never folded
        (dict(momentum=None), dict(padding="same")),          # cumulative running average
        (dict(eps=1e-3), dict(padding="same", dilation=2)),
    ],
    ids=["affine_false", "no_running_stats", "momentum_none_same_pad", "eps_dilated_same"],
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_and_conv_variants(bn_kwargs, conv_kwargs, mode):
    conv = nn.Conv2d(4, 6, 3, bias=False, **conv_kwargs)
    bn = nn.BatchNorm2d(6, **bn_kwargs)
    ref = randomize_bn(nn.Sequential(conv, bn, nn.ReLU())).to(DEV).train(mode == "train")
    fused = FusedConvBNAct.from_modules(*copy.deepcopy(list(ref))).train(mode == "train")
    with effops.use_backend("reference"):
        for _ in range(2):
            x = torch.randn(3, 4, 7, 7, device=DEV)
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    if bn.running_mean is not None:
        torch.testing.assert_close(fused.bn.running_mean, ref[1].running_mean)
        torch.testing.assert_close(fused.bn.running_var, ref[1].running_var)


def test_same_padding_with_even_kernel_is_refused():
    with pytest.raises(ValueError, match="asymmetrically"):
        FusedConvBNAct.from_modules(nn.Conv2d(4, 4, 2, padding="same"), nn.BatchNorm2d(4), nn.ReLU())


def test_moving_the_module_revalidates_the_input():
    """The once-per-signature input check must notice that the weights moved or changed dtype."""
    m = FusedConvBNAct(6, 4, 3).eval()
    x = torch.randn(1, 6, 5, 5)
    with torch.no_grad(), effops.use_backend("reference"):
        m(x)
        m.to(torch.float64)
        with pytest.raises(TypeError, match="expected the same dtype"):
            m(x)
        m.to("meta")
        with pytest.raises(ValueError, match="expected the same device"):
            m(x.double())


def test_frozen_batchnorm_always_folds_with_gradients_in_train():
    """torchvision FrozenBatchNorm2d (detection backbones): statistics and affine are buffers,
    used in train() too, so the fused path runs in both modes and the conv weight still learns."""
    pytest.importorskip("torchvision")
    from torchvision.ops.misc import FrozenBatchNorm2d

    conv, bn = nn.Conv2d(6, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.5)
    ref = nn.Sequential(conv, bn, nn.ReLU())
    fused = FusedConvBNAct.from_modules(*copy.deepcopy(list(ref)))
    assert fused._folds(fused.bn)
    for mode in ("train", "eval"):
        getattr(ref, mode)(), getattr(fused, mode)()
        x1 = torch.randn(2, 6, 5, 7).requires_grad_()
        x2 = x1.detach().clone().requires_grad_()
        with effops.use_backend("reference"):
            y = fused(x2)
        y_ref = ref(x1)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        y.sum().backward(), y_ref.sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.conv.weight.grad, ref[0].weight.grad, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_depthwise_module_eval(dtype):
    """MobileNet-style depthwise conv → BN → ReLU6: the depthwise kernel."""
    ref, fused = _pair(nn.ReLU6, k=3, groups=12, cin=12, cout=12)
    ref.eval(), fused.eval()
    x = _x(c=12).detach().to(dtype)
    with torch.no_grad(), effops.use_backend("triton"):
        y = fused.to(dtype)(x)
        same = copy.deepcopy(ref).to(dtype)(x) if dtype != torch.float32 else None
    assert_matches(y, copy.deepcopy(ref).double()(x.double()), same)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("hook_on", ["conv", "bn", "act", "pre_conv", "global"])
def test_hooks_on_children_fire_and_see_the_original_values(monkeypatch, hook_on, mode):
    ref, fused = _pair(nn.SiLU, conv_bias=True)
    getattr(ref, mode)(), getattr(fused, mode)()
    calls = count_dispatch(monkeypatch)
    seen, seen_ref = [], []
    if hook_on == "global":
        handles = [torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: (seen if m in set(fused.modules()) else seen_ref).append((type(m), o.detach().clone())))]
    else:
        name = hook_on.replace("pre_", "")
        idx = {"conv": 0, "bn": 1, "act": 2}[name]
        if hook_on.startswith("pre_"):
            hook = lambda out: lambda m, i: out.append((type(m), i[0].detach().clone()))  # noqa: E731
            reg = "register_forward_pre_hook"
        else:
            hook = lambda out: lambda m, i, o: out.append((type(m), o.detach().clone()))  # noqa: E731
            reg = "register_forward_hook"
        handles = [getattr(getattr(fused, name), reg)(hook(seen)), getattr(ref[idx], reg)(hook(seen_ref))]
    x = _x().detach()
    try:
        y, y_ref = fused(x), ref(x)
    finally:
        for h in handles:
            h.remove()
    if hook_on == "global":
        seen_ref = [s for s in seen_ref if s[0] is not nn.Sequential]  # the reference's own container
        seen = [s for s in seen if s[0] is not FusedConvBNAct]
    assert [t for t, _ in seen] == [t for t, _ in seen_ref] and seen
    for (_, a), (_, b) in zip(seen, seen_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    if mode == "train":
        torch.testing.assert_close(fused.bn.running_mean, ref[1].running_mean)
    assert calls == []  # the hooked call ran the modules, not the fused op
    # Hooks removed: back on the fused path in eval.
    fused.eval()
    fused(x)
    assert calls == ["conv_bn_act"]


def test_hooked_module_with_residual_before_and_after_the_activation():
    """The residual lands before or after the activation as PyTorch's ``relu(bn(conv(x)) + r)``
    and ``relu(bn(conv(x))) + r``, on the fused path and on the hooked (modules) path alike."""
    conv, bn = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
    randomize_bn(nn.Sequential(bn))
    fused = FusedConvBNAct.from_modules(conv, bn, nn.ReLU()).to(DEV).eval()
    x, r = _x(c=6).detach(), torch.randn(3, 6, 7, 9, device=DEV)
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()  # the original modules, in fp64
    with torch.no_grad():
        pre64 = bn64(conv64(x.double()))
        want64 = {False: F.relu(pre64 + r.double()), True: F.relu(pre64) + r.double()}
        pre = bn(conv(x))
        want = {False: F.relu(pre + r), True: F.relu(pre) + r}  # PyTorch in fp32
        for after in (False, True):  # fused path (no hooks)
            assert_matches(fused(x, r, residual_after_act=after), want64[after])
    seen = []
    h = fused.bn.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        for after in (False, True):  # hooked path: the original modules, called one after the other
            y = fused(x, r, residual_after_act=after)
            torch.testing.assert_close(y, want[after], rtol=1e-5, atol=1e-5)
            assert_matches(y, want64[after])
    finally:
        h.remove()
    assert len(seen) == 2
    for o in seen:  # the BN's hook saw BN's own output, before residual and activation
        torch.testing.assert_close(o, pre, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", ["conv_bn_act", "ghost", "repvgg", "osa"])
def test_autocast_leaves_float64_models_in_float64(block):
    """PyTorch's autocast never casts float64 tensors: a float64 model under CPU bf16 autocast
    runs in float64, and so must its optimized copy (reference backend: the module logic)."""
    from timm.models.byobnet import RepVggBlock
    from timm.models.ghostnet import GhostModule

    from effops.models.classic_vovnet import OSAModule

    make = {
        "conv_bn_act": lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        "ghost": lambda: nn.Sequential(GhostModule(8, 12)),
        "repvgg": lambda: nn.Sequential(RepVggBlock(8, 8)),
        "osa": lambda: nn.Sequential(OSAModule(8, 8, 16, 3, "OSA", identity=False)),
    }[block]
    model = randomize_bn(make()).double().eval()
    fast = effops.optimize(model)
    assert fast.effops_report.swapped
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), effops.use_backend("reference"):
        ref, out = model(x), fast(x)
    assert ref.dtype == out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
