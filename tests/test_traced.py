"""effops.optimize inside hand-written forwards (torch.fx): ResNet blocks, timm blocks, edge cases."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effops
from effops.nn.traced import FusedStep, TracedForward, traced_forward_of

from helpers import KERNEL_DEVICE, assert_matches, count_dispatch, needs_triton, randomize_bn


class Bottleneck(nn.Module):
    """torchvision-style: shared ReLU module, in-place residual add before the last ReLU."""

    def __init__(self, c=8, mid=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.drop(out)  # train-only behaviour: must still apply in train()
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class Functional(nn.Module):
    """Functional activations, residual after the activation, a conv output used twice."""

    def __init__(self):
        super().__init__()
        self.a, self.bna = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.b, self.bnb = nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.c, self.bnc = nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6)

    def forward(self, x):
        y = F.silu(self.bna(self.a(x))) + x          # residual after act
        z = self.bnb(self.b(y)).relu()               # method activation
        t = self.c(z)                                # used twice: not fusable
        return self.bnc(t) + t.mean()


def _fast(model):
    model = randomize_bn(model).eval()
    return model, effops.optimize(model)


def test_bottleneck_fused_with_residual_before_act():
    model, fast = _fast(Bottleneck())
    rep = fast.effops_report
    assert [e.path for e in rep.swapped] == ["conv1..relu", "conv2..relu_1", "conv3..relu_2"]
    assert rep.swapped[2].what == "conv1x1 4→8 + bn + relu + residual (before act) [traced]"
    assert isinstance(traced_forward_of(fast), TracedForward) and type(fast) is Bottleneck
    assert list(fast.state_dict()) == list(model.state_dict())
    assert not any(isinstance(m, FusedStep) for m in fast.modules())  # nothing registered twice
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()))


def test_functional_acts_residual_after_act_and_shared_outputs():
    model, fast = _fast(Functional())
    rep = fast.effops_report
    assert [e.what for e in rep.swapped] == [
        "conv3x3 6→6 + bn + silu + residual (after act) [traced]", "conv1x1 6→6 + bn + relu [traced]"]
    assert {e.path: e.what for e in rep.skipped}["c"] == "in Functional.forward: its output is used more than once"
    x = torch.randn(2, 6, 4, 4)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()))


def test_train_mode_runs_the_class_forward_exactly():
    model, fast = _fast(Bottleneck())
    model.train(), fast.train()
    x = torch.randn(4, 8, 5, 5)
    torch.manual_seed(1)
    y1 = model(x)
    torch.manual_seed(1)
    y2 = fast(x)  # dropout active, batch statistics: exactly the original forward
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    torch.testing.assert_close(fast.bn1.running_mean, model.bn1.running_mean, rtol=0, atol=0)


def test_deepcopy_pickle_and_reoptimize():
    model, fast = _fast(Bottleneck())
    twin = copy.deepcopy(fast)
    fwd = traced_forward_of(twin)
    assert fwd.owner is twin and fwd.graph_module._effops_step0.fused.conv is twin.conv1
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(1, 8, 4, 4)
    again = effops.optimize(fast)
    assert not again.effops_report.swapped and not again.effops_report.skipped
    # Every copy computes the original block's output (PyTorch, fp64), not merely the same as `fast`.
    with torch.no_grad(), effops.use_backend("reference"):
        ref64 = copy.deepcopy(model).double()(x.double())
        for m in (fast, twin, loaded, again):
            assert_matches(m.eval()(x), ref64)


def test_untraceable_forward_is_reported_and_left_alone():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y  # control flow on a tensor value

    model = randomize_bn(DataDependent()).eval()
    fast = effops.optimize(model)
    assert traced_forward_of(fast) is None
    [skip] = fast.effops_report.skipped
    assert "forward torch.fx can't trace" in skip.what
    x = torch.randn(2, 3, 4, 4) * 100
    with torch.no_grad():
        assert {bool(model.bn(model.conv(v)).sum() > 0) for v in (x, -x)} == {True, False}  # both branches
        for v in (x, -x):  # left alone: exactly PyTorch's forward
            torch.testing.assert_close(fast(v), model(v), rtol=0, atol=0)


@needs_triton
def test_traced_block_through_the_kernel():
    model, fast = _fast(Bottleneck(c=16, mid=8))
    model, fast = model.to(KERNEL_DEVICE), fast.to(KERNEL_DEVICE)
    x = torch.randn(2, 16, 5, 6, device=KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), effops.use_backend("triton"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()))


def test_broadcasting_residual_runs_unfused():
    class Bias(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
            self.offset = nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + self.offset)

    model, fast = _fast(Bias())
    assert len(fast.effops_report.swapped) == 1  # matched statically...
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad(), effops.use_backend("reference"):  # ...and the [1,4,1,1] add runs as PyTorch would
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()))


@pytest.mark.slow
def test_torchvision_resnet50_fully_fused():
    tv = pytest.importorskip("torchvision")
    model, fast = _fast(tv.models.resnet50(num_classes=10))
    rep = fast.effops_report
    # 49 traced chains + stem via the root + 4 downsample + the stem's max pool + the fc
    assert len(rep.swapped) == 55 and not rep.skipped
    assert sum("residual (before act)" in e.what for e in rep.swapped) == 16
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()), fp32_tol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "resnetrs50"])
def test_timm_models_with_hand_written_blocks(name):
    timm = pytest.importorskip("timm")
    model, fast = _fast(timm.create_model(name, pretrained=False, num_classes=10))
    rep = fast.effops_report
    assert sum("[traced]" in e.what for e in rep.swapped) >= 17
    # What stays unfused are SE convs (no BatchNorm) and, in ResNet-RS, the stem conv whose BN lives in the parent.
    assert all(".se." in e.path or e.path == "conv1.6" for e in rep.skipped), str(rep)
    assert list(fast.state_dict()) == list(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()), fp32_tol=1e-4)


@pytest.mark.slow
def test_compile_fullgraph_over_traced_forward():
    torch._dynamo.reset()
    model, fast = _fast(Bottleneck())
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad(), effops.use_backend("reference"):
        y = torch.compile(fast, fullgraph=True)(x)
        assert_matches(y, copy.deepcopy(model).double()(x.double()))


@pytest.mark.slow
def test_timm_regnet_extends_swapped_container_with_residual_and_act():
    """timm RegNet: conv3 is a ConvNormAct without activation (swapped as a container first);
    `act3(drop_path(conv3(se(x))) + shortcut)` then extends it with the residual and the ReLU, and
    the SE module before it joins as the conv's input gate."""
    timm = pytest.importorskip("timm")
    model, fast = _fast(timm.create_model("regnety_002", pretrained=False, num_classes=10))
    swapped = {e.path: e.what for e in fast.effops_report.swapped}
    assert swapped["s1.b1.se..act3"] == ("SE gate → conv1x1 24→24 + bn + relu + residual (before act) (gate applied "
                                         "in the conv's operand load) [traced]")
    assert "s1.b1.conv3" not in swapped  # one entry per conv
    assert sum("+ residual (before act)" in w and w.endswith("[traced]") for w in swapped.values()) == 13
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()), fp32_tol=1e-4)
    model.train(), fast.train()
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)


def test_fused_conv_bn_act_accepts_an_act_after_identity_batchnormact():
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    conv = nn.Conv2d(4, 4, 1, bias=False)
    bn = randomize_bn(nn.Sequential(BatchNormAct2d(4, apply_act=False)))[0].eval()
    fused = effops.FusedConvBNAct.from_modules(conv, bn, nn.SiLU(), names=("conv", "bn", None))
    assert fused.activation[0] == "silu"
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad(), effops.use_backend("reference"):
        torch.testing.assert_close(fused(x), F.silu(bn(conv(x))), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already applies ReLU"):
        effops.FusedConvBNAct.from_modules(conv, BatchNormAct2d(4), nn.SiLU())


@pytest.mark.slow
def test_torchvision_mobilenet_v2_residual_joins_the_projection_conv():
    """`x + self.conv(x)`: the FusedSequential's last step (projection conv → BN) takes the add."""
    tv = pytest.importorskip("torchvision")
    from effops.nn.traced import FusedTailStep

    model, fast = _fast(tv.models.mobilenet_v2(num_classes=10))
    rep = fast.effops_report
    assert len(rep.swapped) == 53 and not rep.skipped  # one entry per conv run, as before, + the classifier's linear
    res = [e for e in rep.swapped if "residual" in e.what]
    assert len(res) == 10 and res[0].path == "features.3.conv..add"
    assert res[0].what == "conv1x1 144→24 + bn + identity + residual (before act) [traced]"
    assert isinstance(traced_forward_of(fast.features[3]).graph_module._effops_step0, FusedTailStep)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()), fp32_tol=1e-4)
    model.train(), fast.train()
    torch.manual_seed(3)
    y = fast(x)
    torch.manual_seed(3)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)  # train: the class forward (dropout included)


@pytest.mark.slow
def test_torchvision_regnet_block_output_fused():
    """`activation(proj(x) + f(x))` with f a Sequential ending in an activation-free conv → BN."""
    tv = pytest.importorskip("torchvision")
    model, fast = _fast(tv.models.regnet_y_400mf(num_classes=10))
    swapped = {e.path: e.what for e in fast.effops_report.swapped}
    traced = [p for p, w in swapped.items() if "+ bn + relu + residual (before act)" in w and w.endswith("[traced]")]
    # One per block: f's last conv takes `+ proj(x)`; in downsampling blocks the projection shortcut
    # (also an activation-free conv → BN, first in graph order) takes `+ f(x)` instead: the same pass saved.
    assert "trunk_output.block2.block2-1.f..activation" in traced
    assert "trunk_output.block1.block1-0.proj..activation" in traced
    assert len(traced) == 16  # regnet_y_400mf: 1 + 3 + 6 + 6 blocks
    assert all(".se." in e.path for e in fast.effops_report.skipped)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()), fp32_tol=1e-4)


@pytest.mark.slow
def test_resnet50_with_frozen_batchnorm_fused():
    """A detection-style backbone (torchvision FrozenBatchNorm2d) fuses like a BatchNorm2d one."""
    tv = pytest.importorskip("torchvision")
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = tv.models.resnet50(num_classes=10, norm_layer=FrozenBatchNorm2d).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 1.5), m.weight.uniform_(0.5, 1.5)
    fast = effops.optimize(model)
    assert len(fast.effops_report.swapped) == 55 and not fast.effops_report.skipped  # 54 as unfrozen + the fc
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()), fp32_tol=1e-4)


class _OptionalShortcut(nn.Module):
    """timm DLA's pattern: a branch on an optional argument, which torch.fx would fix silently."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        return torch.relu(self.bn(self.conv(x)) + shortcut)


def test_forward_with_optional_arguments_is_not_traced():
    model, fast = _fast(_OptionalShortcut())
    assert traced_forward_of(fast) is None
    [skip] = fast.effops_report.skipped
    assert "optional argument 'shortcut'" in skip.what
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad(), effops.use_backend("reference"):
        torch.testing.assert_close(fast(x), model(x))
        torch.testing.assert_close(fast(x, 2 * x), model(x, 2 * x))


def test_fused_step_never_drops_a_traced_residual():
    step = FusedStep(effops.FusedConvBNAct(4, 4, 1).eval(), "before_act")
    with pytest.raises(TypeError, match="residual traced here is None"):
        step(torch.randn(1, 4, 2, 2), None)


def test_optimizing_a_model_in_train_mode_traces_the_eval_graph():
    class Dropping(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return F.dropout(F.relu(self.bn(self.conv(x))), 0.5, self.training)

    model = randomize_bn(Dropping()).train()
    fast = effops.optimize(model)
    assert fast.training and fast.bn.training  # the caller's flags are restored after tracing
    model.eval(), fast.eval()
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()))  # no dropout baked into eval


ZOO = ["dla34", "res2net50_14w_8s", "resnest14d", "hrnet_w18_small", "ghostnet_100", "repvgg_a2",
       "cspresnet50", "densenet121", "mobilenetv3_large_100", "efficientnetv2_rw_t", "tv.googlenet",
       "tv.mobilenet_v3_large"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_model_zoo_structure_is_preserved(name):
    """optimize() (called in train mode) on real models with varied hand-written forwards:
    the optimized model computed in fp64 equals the original in fp64 (a rewrite error shows
    up here at ~1e-1, independent of how well-conditioned the model is in fp32), and
    train mode is bit-exact."""
    if name.startswith("tv."):
        tv = pytest.importorskip("torchvision")
        model = getattr(tv.models, name[3:])(num_classes=10, **({"aux_logits": False, "init_weights": True}
                                                                   if name == "tv.googlenet" else {}))
    else:
        timm = pytest.importorskip("timm")
        model = timm.create_model(name, pretrained=False, num_classes=10)
    model = randomize_bn(model).train()
    fast = effops.optimize(model)
    assert fast.training
    x = torch.randn(2, 3, 64, 64)  # batch 2: train-mode BN on 1x1 attention maps needs > 1 value
    torch.manual_seed(0)
    y_fast = fast(x)
    torch.manual_seed(0)
    torch.testing.assert_close(y_fast, model(x), rtol=0, atol=0)
    model.eval(), fast.eval()
    with torch.no_grad(), effops.use_backend("reference"):
        ref64 = copy.deepcopy(model).double()(x.double())
        err = (copy.deepcopy(fast).double()(x.double()) - ref64).norm() / ref64.norm()
    assert err < 1e-6, f"{name}: optimized model differs from the original in fp64 ({err:.1e})"


@needs_triton
@pytest.mark.slow
def test_timm_mobilenetv3_through_the_kernels():
    """Depthwise kernel + traced residual blocks + hard-swish, in a whole real model, through Triton."""
    timm = pytest.importorskip("timm")
    model = randomize_bn(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)).eval()
    fast = effops.optimize(model).to(KERNEL_DEVICE)
    model = model.to(KERNEL_DEVICE)
    x = torch.randn(1, 3, 32, 32, device=KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), effops.use_backend("triton"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()), fp32_tol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ese_vovnet19b_dw", "efficientnet_b0"])
def test_timm_models_with_frozen_batchnorm_act(name):
    """timm's freeze_batch_norm_2d swaps in FrozenBatchNormAct2d: fused like BatchNormAct2d, in train mode too."""
    timm = pytest.importorskip("timm")
    from timm.layers import freeze_batch_norm_2d

    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10))
    model = freeze_batch_norm_2d(model).eval()
    unfrozen = effops.optimize(randomize_bn(timm.create_model(name, pretrained=False, num_classes=10)).eval())
    fast = effops.optimize(model)
    assert len(fast.effops_report.swapped) == len(unfrozen.effops_report.swapped)  # nothing lost by freezing
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), effops.use_backend("reference"):
        ref64 = copy.deepcopy(model).double()(x.double())
        assert_matches(copy.deepcopy(fast).double()(x.double()), ref64, fp32_tol=1e-10)
    model.train(), fast.train()
    with effops.use_backend("reference"):
        y, y_ref = fast(x), model(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        y.square().sum().backward(), y_ref.square().sum().backward()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv_fast = next(m for m in fast.modules() if isinstance(m, nn.Conv2d))
    torch.testing.assert_close(conv_fast.weight.grad, conv.weight.grad, rtol=1e-3, atol=1e-3)


def test_hooks_on_a_traced_blocks_children_fire_as_before(monkeypatch):
    """A hook on a conv or on the block's shared ReLU (called three times per forward) sees the
    same calls and values as in the original model; without hooks the block runs fused again."""
    model, fast = _fast(Bottleneck())
    model.eval(), fast.eval()
    x = torch.randn(2, 8, 5, 5)
    for name in ("conv2", "relu"):
        seen, seen_ref = [], []
        h1 = getattr(fast, name).register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        h2 = getattr(model, name).register_forward_hook(lambda m, i, o: seen_ref.append(o.clone()))
        with torch.no_grad(), effops.use_backend("reference"):
            y, y_ref = fast(x), model(x)
        h1.remove(), h2.remove()
        assert len(seen) == len(seen_ref) == (3 if name == "relu" else 1)
        for a, b in zip(seen, seen_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    calls = count_dispatch(monkeypatch)
    with torch.no_grad(), effops.use_backend("reference"):
        fast(x)
    assert calls == ["conv_bn_act"] * 3  # hooks removed: all three steps fused again
