"""effops.optimize on hand-written, torchvision and timm models."""
import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import effops
from effops import FusedConvBNAct, FusedOSA, FusedSequential
from effops.models import classic_vovnet

from helpers import KERNEL_DEVICE, ON_CUDA, assert_matches, needs_triton, randomize_bn

# Whole models run through the Triton interpreter only where noted (it is slow);
# elsewhere on CPU the reference backend runs the fused graph. On CUDA: Triton.
WHOLE_MODEL_BACKEND = None if ON_CUDA else "reference"
DEV = KERNEL_DEVICE


def _check_model(model, x, backend=WHOLE_MODEL_BACKEND, tol=1e-5):
    model = randomize_bn(model).eval().to(DEV)
    fast = effops.optimize(model)
    x = x.to(DEV).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), effops.use_backend(backend):
        ref64 = copy.deepcopy(model).double()(x.double())
        assert_matches(fast(x), ref64, fp32_tol=tol)
    assert list(fast.state_dict()) == list(model.state_dict())
    fast.load_state_dict(model.state_dict(), strict=True)
    return fast


@needs_triton
@pytest.mark.slow
def test_classic_vovnet27_slim_through_the_kernel():
    """The main job's model, converted, run through the Triton kernel (interpreter on CPU)."""
    fast = _check_model(classic_vovnet("vovnet27_slim", num_classes=10), torch.randn(1, 3, 32, 32), backend="triton", tol=1e-4)
    rep = fast.effops_report
    assert not rep.skipped
    assert [e.path for e in rep.swapped if not e.what.startswith(("max pool", "linear"))] == [
        "stem.stem_1/conv..stem_1/relu", "stem.stem_2/conv..stem_2/relu", "stem.stem_3/conv..stem_3/relu",
        "stage2.OSA2_1", "stage3.OSA3_1", "stage4.OSA4_1", "stage5.OSA5_1"]
    assert [e.path for e in rep.swapped if e.what.startswith("linear")] == ["classifier"]
    # the max pools starting stages 3-5 (stage 2 follows the stem's stride-2 conv)
    assert [e.path for e in rep.swapped if e.what.startswith("max pool")] == [
        "stage3.Pooling", "stage4.Pooling", "stage5.Pooling"]
    assert isinstance(fast.stem, FusedSequential)
    assert isinstance(fast.stage2.OSA2_1, FusedOSA) and fast.stage2.OSA2_1.layer_per_block == 5


@pytest.mark.slow
def test_torchvision_mobilenet_v2():
    tv = pytest.importorskip("torchvision")
    fast = _check_model(tv.models.mobilenet_v2(num_classes=10), torch.randn(2, 3, 64, 64), tol=1e-4)
    rep = fast.effops_report
    assert len(rep.swapped) == 53 and not rep.skipped  # every Conv2dNormActivation + each projection conv+bn + the head's linear
    assert isinstance(fast.features[0], FusedConvBNAct) and fast.features[0].activation[0] == "relu6"
    assert isinstance(fast.features[2].conv, FusedSequential)


@pytest.mark.slow
def test_timm_ese_vovnet19b_dw():
    timm = pytest.importorskip("timm")
    fast = _check_model(timm.create_model("ese_vovnet19b_dw", pretrained=False, num_classes=10), torch.randn(1, 3, 64, 64), tol=1e-4)
    rep = fast.effops_report
    swapped = [e.path for e in rep.swapped]
    assert "stem.0" in swapped  # ConvNormAct -> FusedConvBNAct
    # SeparableConvNormAct: pw conv + BatchNormAct2d fused, and the bare depthwise conv before it
    # (no BN of its own) runs with it as one banded pair
    swapped_what = {e.path: e.what for e in rep.swapped}
    assert swapped_what["stem.1.conv_dw..bn"] == "depthwise conv3x3 64ch (banded pair) → conv1x1 64→64 + bn + relu"
    assert swapped_what["stem.2.conv_dw..bn"].startswith("depthwise conv3x3 s2 64ch (banded pair) → conv1x1")
    assert isinstance(fast.stem[1], FusedSequential)
    assert [type(s).__name__ for s in fast.stem[1]._steps] == ["DepthwisePointwise"]
    assert not rep.skipped
    again = effops.optimize(fast, check_speed=False).effops_report  # optimized before: nothing left over
    assert not again.skipped
    osa = {e.path: e.what for e in rep.swapped if e.what.startswith("OSA")}
    assert osa["stages.0.blocks.0"] == "OSA 64→3×128→256 + eSE + depthwise (relu)"  # with the 1x1 reduction conv
    assert len(osa) == 4 and all(isinstance(fast.stages[i].blocks[0], FusedOSA) for i in range(4))


@pytest.mark.slow
def test_timm_resnet_hand_written_blocks_are_traced():
    timm = pytest.importorskip("timm")
    fast = _check_model(timm.create_model("resnet18", pretrained=False, num_classes=10), torch.randn(1, 3, 32, 32), tol=1e-4)
    rep = fast.effops_report
    assert not rep.skipped
    swapped = {e.path: e.what for e in rep.swapped}
    assert [p for p, w in swapped.items() if "[traced]" not in w] == ["maxpool"] + [f"layer{i}.0.downsample"
                                                                                    for i in (2, 3, 4)] + ["fc"]
    assert swapped["maxpool"] == "max pool 3x3 s2 (NHWC, no indices)"
    assert swapped["layer1.0.conv1..act1"] == "conv3x3 64→64 + bn + relu [traced]"  # timm's Identity `aa` absorbed
    assert swapped["layer1.0.conv2..act2"] == "conv3x3 64→64 + bn + relu + residual (before act) [traced]"
    assert "22 swapped, 0 skipped" in str(rep)


def _ordered_dict_block():
    return nn.Sequential(OrderedDict([
        ("stem_1/conv", nn.Conv2d(3, 8, 3, 2, 1, bias=False)),
        ("stem_1/norm", nn.BatchNorm2d(8)),
        ("stem_1/relu", nn.ReLU(inplace=True)),
        ("pool", nn.MaxPool2d(2)),
        ("stem_2/conv", nn.Conv2d(8, 8, 1)),
        ("stem_2/act", nn.SiLU()),
        ("head/conv", nn.Conv2d(8, 4, 1)),
    ]))


def test_ordered_dict_sequential_keeps_names_and_reports():
    model = randomize_bn(_ordered_dict_block()).eval()
    fast = effops.optimize(model)
    assert isinstance(fast, FusedSequential)
    assert list(fast.state_dict()) == list(model.state_dict())
    rep = fast.effops_report
    assert [e.path for e in rep.swapped] == ["pool", "stem_1/conv..stem_1/relu", "stem_2/conv..stem_2/act"]
    assert rep.skipped[0].path == "head/conv" and "nothing to fuse" in rep.skipped[0].what
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()))


def test_not_inplace_by_default_and_inplace_on_request():
    model = randomize_bn(_ordered_dict_block()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
    fast = effops.optimize(model)
    assert type(model) is nn.Sequential and fast is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert_matches(model(x), ref64)  # the original still computes what it did
    same = effops.optimize(model, inplace=True)
    assert isinstance(same, FusedSequential)
    again = effops.optimize(same)
    assert not again.effops_report.swapped  # already optimized: nothing left to swap
    with torch.no_grad(), effops.use_backend("reference"):
        for m in (fast, same, again):
            assert_matches(m(x), ref64)


def test_shared_modules_are_not_folded():
    conv, bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    model = randomize_bn(nn.Sequential(nn.Sequential(conv, bn, nn.ReLU()), nn.Sequential(conv, bn, nn.ReLU()))).eval()
    fast = effops.optimize(model)
    assert not fast.effops_report.swapped
    assert all("shared" in e.what for e in fast.effops_report.skipped)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)  # left as PyTorch's modules


def test_train_mode_after_optimize_is_pytorch():
    model = randomize_bn(_ordered_dict_block())
    fast = effops.optimize(model).train()
    model.train()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(fast(x), model(x))
    torch.testing.assert_close(fast.state_dict()["stem_1/norm.running_mean"], model.state_dict()["stem_1/norm.running_mean"])


def test_optimize_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        effops.optimize(lambda x: x)


def test_timm_conv_norm_act_with_anti_aliasing():
    pytest.importorskip("timm")
    from timm.layers import BlurPool2d, ConvNormAct

    model = randomize_bn(ConvNormAct(4, 8, 3, stride=2, aa_layer=BlurPool2d, act_layer=nn.SiLU)).eval()
    assert model.aa is not None
    fast = effops.optimize(model)
    assert isinstance(fast, FusedSequential) and [e.path for e in fast.effops_report.swapped] == ["conv..bn"]
    assert list(fast.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 4, 12, 12)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), copy.deepcopy(model).double()(x.double()))


@pytest.mark.slow
def test_timm_ese_vovnet39b_whole_model():
    timm = pytest.importorskip("timm")
    fast = _check_model(timm.create_model("ese_vovnet39b", pretrained=False, num_classes=10),
                        torch.randn(1, 3, 64, 64), tol=1e-4)
    rep = fast.effops_report
    assert not rep.skipped
    assert sum(isinstance(m, FusedOSA) for m in fast.modules()) == 6
    assert sum(e.what.endswith("+ eSE + identity (relu)") for e in rep.swapped) == 2  # last blocks of stages 4, 5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vovnet39", "vovnet57"])
def test_classic_vovnet_v2_whole_model(name):
    fast = _check_model(classic_vovnet(name, num_classes=10, v2=True), torch.randn(1, 3, 64, 64), tol=1e-4)
    assert not fast.effops_report.skipped
    blocks = [m for m in fast.modules() if isinstance(m, FusedOSA)]
    assert len(blocks) == (6 if name == "vovnet39" else 9) and sum(b.has_ese for b in blocks) == 4


@needs_triton
@pytest.mark.slow
def test_timm_ese_vovnet19b_dw_through_the_kernels():
    """A whole real VoVNetV2 (depthwise stages with the 1x1 reduction, eSE, identity) through the Triton kernels."""
    timm = pytest.importorskip("timm")
    fast = _check_model(timm.create_model("ese_vovnet19b_dw", pretrained=False, num_classes=10),
                        torch.randn(1, 3, 32, 32), backend="triton", tol=1e-4)
    assert sum(isinstance(m, FusedOSA) and m.depthwise and m.has_ese for m in fast.modules()) == 4


def test_optimize_inside_inference_mode_copies_normal_tensors():
    """``optimize`` called inside ``torch.inference_mode()`` copies the model outside it: inference
    tensors have no version counter, and the native backend would fold their weights on every call."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with torch.inference_mode():
        fast = effops.optimize(model, check_speed=False)
    assert not any(t.is_inference() for t in list(fast.parameters()) + list(fast.buffers()))
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        assert_matches(fast(x), model.double()(x.double()))
