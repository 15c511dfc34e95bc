"""effops.optimize's rules around the conv: concat → 1×1 N-segment aggregation (no concat), SE gates
folded into the next conv, SE + residual + act in one pass, shuffled writes, concat writes, and
conv (+ bias) → act chains. Small hand-written modules on the reference backend (fp64: the rewrite
computes the original function) and through the Triton kernels; real timm / torchvision models."""
import copy
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import effops
from effops.models.elan import ELAN, MPTransition
from effops.nn.se import SqueezeExcite
from effops.nn.sequential import FusedSequential
from effops.nn.traced import FusedStep, traced_forward_of

from helpers import KERNEL_DEVICE, assert_matches, count_dispatch, needs_triton, randomize_bn

timm = pytest.importorskip("timm")
tv = pytest.importorskip("torchvision")

AGG = ": N-segment aggregation, no concat [traced]"
GATED = " (gate applied in the conv's operand load)"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread per test process: on a busy 2-core machine (``pytest -n 2``) PyTorch's
    OpenMP threads spin against each other, and the fp64 reference forwards of whole models slow
    down by orders of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fast(model):
    model = randomize_bn(model).eval()
    return model, effops.optimize(model)


def _ref64(model, x):
    with torch.no_grad(), effops.use_backend("reference"):
        return copy.deepcopy(model).double()(x.double())


def _matches(out, ref, **kw):
    """``assert_matches`` of a tensor, or of every value of a dict of them (detection backbones)."""
    if isinstance(ref, dict):
        assert list(out) == list(ref)
        for k in ref:
            assert_matches(out[k], ref[k], **kw)
    else:
        assert_matches(out, ref, **kw)


def _check64(model, fast, x, tol=1e-12):
    """fp64, reference backend: the optimized model computes the original model's function (a rewrite
    error shows up at ~1e-1; fp64 rounding at ~1e-15)."""
    ref = _ref64(model, x)
    with torch.no_grad(), effops.use_backend("reference"):
        out = copy.deepcopy(fast).double()(x.double())
    _matches(out, ref, fp32_tol=tol)
    return ref


def _steps(module) -> List[str]:
    """Class names of the fused steps in ``module``'s rewritten forward, in graph order."""
    gm = traced_forward_of(module).graph_module
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes
            if n.op == "call_module" and n.target.startswith("_effops_step")]


class _Ops(TorchDispatchMode):
    """Records every ATen op called."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


# -- concat → 1×1 aggregation --------------------------------------------------------------------
class CatBlock(nn.Module):
    """Three segments: the block input, a channel range (split) of a conv's output, a conv branch."""

    def __init__(self, c=5, w=3, out=7):
        super().__init__()
        self.w = w
        self.a, self.bna = nn.Conv2d(c, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w)
        self.b, self.bnb = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.proj, self.bnp = nn.Conv2d(c + 2 * w, out, 1, bias=False), nn.BatchNorm2d(out)
        self.act = nn.SiLU()

    def forward(self, x):
        y1, y2 = F.relu(self.bna(self.a(x))).split(self.w, 1)
        z = F.relu(self.bnb(self.b(y2)))
        return self.act(self.bnp(self.proj(torch.cat([x, y1, z], dim=1))))


class Root(nn.Module):
    """DLA's root: a list of segments passed in, residual before the activation."""

    def __init__(self, cin=20, cout=4):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)

    def forward(self, xs: List[torch.Tensor]):
        x = self.bn(self.conv(torch.cat(xs, 1)))
        x += xs[0]
        return self.relu(x)


class CSPLike(nn.Module):
    """CSPNet's cross stage: a split, a tuple concat with ``dim=``, a converted container consuming it."""

    def __init__(self):
        super().__init__()
        self.conv_exp = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.1))
        self.blocks = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.conv_transition = nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.LeakyReLU(0.1))

    def forward(self, x):
        xs, xb = self.conv_exp(x).split(4, dim=1)
        return self.conv_transition(torch.cat((xs, self.blocks(xb)), dim=1))


def test_cat_into_pointwise_conv_is_one_aggregation(monkeypatch):
    model, fast = _fast(CatBlock())
    swapped = {e.path: e.what for e in fast.effops_report.swapped}
    assert swapped["cat..act"] == "cat(3 segments) → conv1x1 11→7 + bn + silu" + AGG
    assert len(swapped) == 3 and not fast.effops_report.skipped  # one entry per conv
    assert _steps(fast) == ["FusedStep", "FusedStep", "AggregateStep"]
    assert list(fast.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 5, 4, 6)
    _check64(model, fast, x)
    calls = count_dispatch(monkeypatch)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), _ref64(model, x))
    assert calls == ["conv_bn_act", "conv_bn_act", "aggregate"]


def test_list_argument_root_with_residual_before_act(monkeypatch):
    model, fast = _fast(Root())
    [entry] = fast.effops_report.swapped
    assert entry.path == "cat..relu"
    assert entry.what == "cat(a list of segments) → conv1x1 20→4 + bn + relu + residual (before act)" + AGG
    calls = count_dispatch(monkeypatch)
    for chans in ([4, 8, 8], [4] + [1] * 16):  # 17 segments: more than one launch takes, runs with torch.cat
        xs = [torch.randn(2, c, 3, 5) for c in chans]
        with torch.no_grad(), effops.use_backend("reference"):
            ref = copy.deepcopy(model).double()([t.double() for t in xs])
            assert_matches(copy.deepcopy(fast).double()([t.double() for t in xs]), ref, fp32_tol=1e-12)
            assert_matches(fast(xs), ref)
    assert calls == ["aggregate", "aggregate", "conv_bn_act", "conv_bn_act"]  # fp64 and fp32 each


def test_container_consumer_and_tuple_concat():
    model, fast = _fast(CSPLike())
    swapped = {e.path: e.what for e in fast.effops_report.swapped}
    assert swapped["cat..conv_transition"] == "cat(2 segments) → conv1x1 8→6 + bn + leaky_relu" + AGG
    assert _steps(fast) == ["AggregateStep"]
    _check64(model, fast, torch.randn(2, 4, 5, 5))


def test_concat_before_a_conv_it_cannot_aggregate_is_reported():
    class Near(nn.Module):
        def __init__(self):
            super().__init__()
            self.c3, self.bn3 = nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.c1, self.bn1 = nn.Conv2d(17 * 4, 4, 1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn3(self.c3(torch.cat([x, x], 1)))
            return self.bn1(self.c1(torch.cat([y] * 17, 1)))

    model, fast = _fast(Near())
    skipped = {e.path: e.what for e in fast.effops_report.skipped}
    assert skipped == {
        "cat..bn3": "cat(2 segments) → conv3x3 8→4 + bn + identity: the concat stays (not a 1×1 stride-1 dense conv "
                    "without padding)",
        "cat_1..bn1": "cat(17 segments) → conv1x1 68→4 + bn + identity: the concat stays (the aggregation takes at "
                      "most 16)"}
    assert len(fast.effops_report.swapped) == 2  # both convs still fused
    _check64(model, fast, torch.randn(1, 4, 3, 3))


def test_aggregation_train_mode_autograd_and_hooks_run_the_original(monkeypatch):
    model, fast = _fast(CatBlock())
    x = torch.randn(2, 5, 4, 4)
    model.train(), fast.train()
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)  # batch statistics: the class forward
    model.eval(), fast.eval()
    with effops.use_backend("reference"):  # eval with autograd: torch.cat + the differentiable fused conv
        y, y_ref = fast(x), model(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        y.square().sum().backward(), y_ref.square().sum().backward()
    torch.testing.assert_close(fast.proj.weight.grad, model.proj.weight.grad, rtol=1e-4, atol=1e-5)
    seen = []
    h = fast.proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    calls = count_dispatch(monkeypatch)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), _ref64(model, x))
    assert seen == [(2, 11, 4, 4)] and "aggregate" not in calls  # the hook saw the concat it watches
    h.remove()


def test_aspp_like_sequential_head_keeps_its_dropout():
    """torchvision's ASPP: cat of branches → project = Sequential(conv, BN, ReLU, Dropout)."""
    model = tv.models.segmentation.deeplabv3.ASPP(8, [2, 3], out_channels=4)
    model, fast = _fast(model)
    swapped = {e.path: e.what for e in fast.effops_report.swapped}
    assert swapped["cat..project"] == ("cat(4 segments) → conv1x1 16→4 + bn + relu: N-segment aggregation, no "
                                      "concat, then Dropout [traced]")
    assert not fast.effops_report.skipped
    _check64(model, fast, torch.randn(2, 8, 6, 6))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_root_aggregation_through_the_kernel(dtype):
    model, fast = _fast(Root(cin=9, cout=4))
    model, fast = model.to(KERNEL_DEVICE), fast.to(KERNEL_DEVICE).to(dtype)
    xs = [torch.randn(2, c, 3, 5, device=KERNEL_DEVICE) for c in (4, 3, 2)]
    xs[1] = xs[1].contiguous(memory_format=torch.channels_last)  # segments with their own strides
    rec = _Ops()
    with torch.no_grad(), effops.use_backend("triton"), rec:
        y = fast([t.to(dtype) for t in xs])
    assert torch.ops.aten.cat.default not in rec.ops
    with torch.no_grad():
        same = copy.deepcopy(model).to(dtype)([t.to(dtype) for t in xs])
        ref = copy.deepcopy(model).double()([t.double() for t in xs])
    assert_matches(y, ref, same)


# -- YOLOv7 ELAN and MP transition ---------------------------------------------------------------
def test_elan_block_aggregates_and_keeps_yolov7_keys(monkeypatch):
    model, fast = _fast(ELAN(6, 4, 10))
    assert list(fast.state_dict())[:5] == ["cv1.conv.weight", "cv1.bn.weight", "cv1.bn.bias", "cv1.bn.running_mean",
                                           "cv1.bn.running_var"]
    assert list(fast.state_dict()) == list(model.state_dict())
    swapped = {e.path: e.what for e in fast.effops_report.swapped}
    assert swapped["cat..cv7"] == "cat(4 segments) → conv1x1 16→10 + bn + silu" + AGG
    assert sum(w == "conv3x3 4→4 + bn + silu [traced]" for w in swapped.values()) == 4
    assert len(swapped) == 7 and not fast.effops_report.skipped
    x = torch.randn(2, 6, 8, 8)
    _check64(model, fast, x)
    calls = count_dispatch(monkeypatch)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), _ref64(model, x))
    assert calls == ["conv_bn_act"] * 6 + ["aggregate"]


def test_mp_transition_writes_both_halves_into_one_buffer():
    model, fast = _fast(MPTransition(6, 4))
    swapped = {e.path: e.what for e in fast.effops_report.swapped}
    assert swapped["cat"] == "cat(2 segments): each conv writes its channel range of one buffer, no concat copy [traced]"
    assert swapped["cv3.conv..act"] == "conv3x3 s2 4→4 + bn + silu [traced]"
    assert _steps(fast) == ["ConcatStep"]
    x = torch.randn(2, 6, 8, 8)
    _check64(model, fast, x)
    rec = _Ops()
    with torch.no_grad(), effops.use_backend("reference"), rec:
        y = fast(x)
    assert torch.ops.aten.cat.default not in rec.ops
    assert_matches(y, _ref64(model, x))
    model.train(), fast.train()
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)


@needs_triton
def test_elan_and_mp_through_the_kernels():
    model, fast = _fast(nn.Sequential(MPTransition(4, 3), ELAN(6, 3, 5)))
    model, fast = model.to(KERNEL_DEVICE), fast.to(KERNEL_DEVICE)
    x = torch.randn(1, 4, 6, 6, device=KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)
    rec = _Ops()
    with torch.no_grad(), effops.use_backend("triton"), rec:
        y = fast(x)
    assert torch.ops.aten.cat.default not in rec.ops
    assert_matches(y, _ref64(model, x))


# -- squeeze-excite ---------------------------------------------------------------------------------
class IRBlock(nn.Module):
    """timm's InvertedResidual forward, written out: ... → se → conv_pwl → bn3 → + shortcut."""

    def __init__(self, c=6, mid=12):
        super().__init__()
        from timm.models._efficientnet_blocks import SqueezeExcite as TimmSE

        self.conv_pw, self.bn1, self.act1 = nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU()
        self.conv_dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(mid), nn.SiLU()
        self.se = TimmSE(mid, rd_ratio=0.25)
        self.conv_pwl, self.bn3 = nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv_pw(x)))
        x = self.act2(self.bn2(self.conv_dw(x)))
        x = self.se(x)
        x = self.bn3(self.conv_pwl(x))
        return x + shortcut


class SEBottleneckTail(nn.Module):
    """timm's ResNet bottleneck with SE, from conv3 on: conv3 → bn3 → se → drop_path → += shortcut → act3."""

    def __init__(self, c=8, drop=0.0):
        super().__init__()
        from timm.layers import DropPath, SEModule

        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.se = SEModule(c, rd_ratio=0.5)
        self.drop_path = DropPath(drop)
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x
        x = self.bn3(self.conv3(x))
        x = self.se(x)
        x = self.drop_path(x)
        x += shortcut
        return self.act3(x)


def test_se_gate_folds_into_the_projection_conv(monkeypatch):
    model, fast = _fast(IRBlock())
    assert isinstance(fast.se, SqueezeExcite)
    swapped = {e.path: e.what for e in fast.effops_report.swapped}
    assert swapped["se..add"] == ("SE gate → conv1x1 12→6 + bn + identity + residual (before act)" + GATED
                                  + " [traced]")
    # conv_pw → conv_dw: one expand → depthwise pair; the gated projection
    assert _steps(fast) == ["PairStep", "FusedStep"] and not fast.effops_report.skipped
    x = torch.randn(2, 6, 5, 5)
    _check64(model, fast, x)
    calls = count_dispatch(monkeypatch)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), _ref64(model, x))
    assert "se_gate" in calls and "se_apply" not in calls  # se(x) is never written
    # A hook on the SE runs it as a module (the hook sees its output).
    seen = []
    h = fast.se.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), _ref64(model, x))
    assert seen == [(2, 12, 5, 5)]
    h.remove()
    model.train(), fast.train()
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)


def test_se_residual_act_is_one_step(monkeypatch):
    model, fast = _fast(SEBottleneckTail())
    swapped = {e.path: e.what for e in fast.effops_report.swapped}
    assert swapped == {"conv3..bn3": "conv1x1 8→8 + bn + identity [traced]",
                       "se..act3": "SE gate + residual + relu: one pass (SqueezeExcite.forward_residual_from_sums); "
                                   "the squeeze rides the conv's epilogue (8-channel sums written with its output, "
                                   "no pool pass) [traced]",
                       "se": swapped["se"]}
    assert _steps(fast) == ["SEEpilogueStep"]
    x = torch.randn(2, 8, 4, 5)
    _check64(model, fast, x)
    calls = count_dispatch(monkeypatch)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), _ref64(model, x))
    assert calls.count("se_apply") == 1
    # drop-path in training mode on its own: the modules run (same random draws as the original).
    model, fast = _fast(SEBottleneckTail(drop=0.5))
    model.drop_path.train(), fast.drop_path.train()
    torch.manual_seed(5)
    y_ref = model(x)
    torch.manual_seed(5)
    with torch.no_grad(), effops.use_backend("reference"):
        torch.testing.assert_close(fast(x), y_ref, rtol=1e-5, atol=1e-6)


def test_sequential_gated_run_and_residual_tail():
    """torchvision's MobileNetV3 block: block = Sequential(expand, dw, SqueezeExcitation, project); x + block(x)."""
    from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(
                Conv2dNormActivation(6, 12, 1, activation_layer=nn.Hardswish),
                Conv2dNormActivation(12, 12, 3, groups=12, activation_layer=nn.Hardswish),
                SqueezeExcitation(12, 8, scale_activation=nn.Hardsigmoid),
                Conv2dNormActivation(12, 6, 1, activation_layer=None))

        def forward(self, x):
            result = self.block(x)
            result += x
            return result

    model, fast = _fast(Block().block)
    assert isinstance(fast, FusedSequential) and type(fast._plan[-1]) is FusedStep
    assert {e.path: e.what for e in fast.effops_report.swapped}["2..3"] == \
        "SE gate → conv1x1 12→6 + bn + identity" + GATED
    x = torch.randn(2, 6, 5, 5)
    _check64(model, fast, x)
    model, fast = _fast(Block())
    swapped = {e.path: e.what for e in fast.effops_report.swapped}
    assert swapped["block..add"] == "SE gate → conv1x1 12→6 + bn + identity + residual (before act)" + GATED + " [traced]"
    assert len(swapped) == 4 and not fast.effops_report.skipped
    _check64(model, fast, x)


@needs_triton
def test_se_fusions_through_the_kernels():
    model, fast = _fast(nn.Sequential(IRBlock(6, 12), SEBottleneckTail(6)))
    model, fast = model.to(KERNEL_DEVICE), fast.to(KERNEL_DEVICE)
    x = torch.randn(2, 6, 4, 5, device=KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), effops.use_backend("triton"):
        y = fast(x)
    assert_matches(y, _ref64(model, x))


# -- shuffled writes --------------------------------------------------------------------------------
def _tv_channel_shuffle(x, groups: int):
    """torchvision's shufflenetv2.channel_shuffle, as written there."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleV1Unit(nn.Module):
    """ShuffleNet V1 unit (stride 1): 1×1 group conv → shuffle → 3×3 depthwise → 1×1 group conv, + x."""

    def __init__(self, c=12, mid=6, g=3, form="function"):
        super().__init__()
        self.g, self.form = g, form
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 1, groups=g, bias=False), nn.BatchNorm2d(mid)
        self.shuffle = nn.ChannelShuffle(g)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, c, 1, groups=g, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        if self.form == "function":
            out = _tv_channel_shuffle(out, self.g)
        elif self.form == "module":
            out = self.shuffle(out)
        elif self.form == "F":
            out = F.channel_shuffle(out, self.g)
        elif self.form == "permute":
            n, c, h, w = out.shape
            out = out.reshape(n, self.g, c // self.g, h, w).permute(0, 2, 1, 3, 4).reshape(n, -1, h, w)
        elif self.form == "flatten":
            out = out.view(out.size(0), self.g, -1, out.size(2), out.size(3)).transpose(1, 2).flatten(1, 2)
        elif self.form == "via_3d":  # a shuffle through a 3-D reshape: not a pattern the converter claims
            n, c, h, w = out.shape
            out = out.view(n, self.g, c // self.g, h, w).transpose(1, 2).reshape(n, c, h * w).view(n, c, h, w)
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        return F.relu(out + x)


@pytest.mark.parametrize("form", ["function", "module", "F", "permute", "flatten"])
def test_conv_then_channel_shuffle_writes_shuffled(form, monkeypatch):
    model, fast = _fast(ShuffleV1Unit(form=form))
    shuffled = [e for e in fast.effops_report.swapped if "shuffle g=3:" in e.what]
    assert [e.what for e in shuffled] == [
        "conv1x1 g3 12→6 + bn + relu + channel shuffle g=3: the conv writes its output shuffled, no shuffle pass "
        "[traced]"], str(fast.effops_report)
    assert shuffled[0].path.startswith("conv1..")
    assert _steps(fast) == ["ShuffleStep", "FusedStep", "FusedStep"]
    x = torch.randn(2, 12, 4, 5)
    _check64(model, fast, x)
    calls = count_dispatch(monkeypatch)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fast(x), _ref64(model, x))
    assert calls == ["conv_bn_act"] * 3  # no channel_shuffle pass


def test_view_sequences_not_recognised_stay():
    model, fast = _fast(ShuffleV1Unit(form="via_3d"))
    assert fast.effops_report.swapped[1].what == "conv1x1 g3 12→6 + bn + relu [traced]"
    _check64(model, fast, torch.randn(2, 12, 4, 5))


def test_sequential_conv_then_channel_shuffle():
    model, fast = _fast(nn.Sequential(nn.Conv2d(8, 12, 1, groups=2, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                                      nn.ChannelShuffle(4), nn.Conv2d(12, 6, 3, padding=1), nn.ReLU()))
    swapped = {e.path: e.what for e in fast.effops_report.swapped}
    assert swapped["0..3"] == ("conv1x1 g2 8→12 + bn + relu + channel shuffle g=4: the conv writes its output "
                               "shuffled, no shuffle pass")
    assert [type(s).__name__ for s in fast._plan] == ["ShuffleStep", "FusedConvBNAct"]
    x = torch.randn(2, 8, 5, 5)
    _check64(model, fast, x)
    fast[3].groups = 3  # read live: a different shuffle is still computed exactly
    model[3].groups = 3
    _check64(model, fast, x)


@needs_triton
def test_shuffled_write_through_the_kernel():
    model, fast = _fast(ShuffleV1Unit(form="function"))
    model, fast = model.to(KERNEL_DEVICE), fast.to(KERNEL_DEVICE)
    x = torch.randn(1, 12, 4, 5, device=KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), effops.use_backend("triton"):
        y = fast(x)
    assert_matches(y, _ref64(model, x))


# -- conv (+ bias) → act without BN --------------------------------------------------------------------
def test_conv_bias_relu_in_a_hand_written_forward():
    class SSDHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv6 = nn.Conv2d(4, 8, 3, padding=6, dilation=6)
            self.conv7 = nn.Conv2d(8, 8, 1)
            self.fc = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            x = F.relu(self.conv6(x), inplace=True)
            return self.fc(torch.relu(self.conv7(x)) + x)

    model, fast = _fast(SSDHead())
    assert [e.what for e in fast.effops_report.swapped] == [
        "conv3x3 d6 4→8 + relu [traced]", "conv1x1 8→8 + relu + residual (after act) [traced]"]
    [skip] = fast.effops_report.skipped
    assert skip.path == "fc" and "nothing to fuse" in skip.what
    _check64(model, fast, torch.randn(2, 4, 7, 7))


# -- every rule at once: re-optimizing, empty batches, torch.compile ------------------------------------
def _all_rules():
    return nn.Sequential(MPTransition(4, 3), ELAN(6, 3, 6), IRBlock(6, 12), SEBottleneckTail(6), ShuffleV1Unit(6, 6, 3))


def test_optimizing_again_changes_nothing_and_reports_nothing():
    model, fast = _fast(_all_rules())
    assert not fast.effops_report.skipped
    again = effops.optimize(fast)
    assert not again.effops_report.swapped and not again.effops_report.skipped, str(again.effops_report)
    x = torch.randn(2, 4, 6, 6)
    ref = _check64(model, again, x)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(again(x), ref)


def test_empty_batch_gives_an_empty_result():
    model, fast = _fast(_all_rules())
    x = torch.randn(0, 4, 6, 6)
    with torch.no_grad(), effops.use_backend("reference"):
        y, y_ref = fast(x), model(x)
    assert y.shape == y_ref.shape == (0, 6, 3, 3)


@pytest.mark.parametrize("where", ["1.cv7.bn", "0.cv1.bn", "3.bn3", "2.se.conv_expand"])
def test_replacing_a_module_inside_a_fused_container_is_seen(where):
    """The steps hold modules from inside the containers they absorbed (ELAN's cv7 for the aggregation,
    MP's cv1 for the concat writes): replacing one runs the original forward (warning once) with it."""
    model, fast = _fast(_all_rules())
    parent, name = where.rsplit(".", 1)
    old = model.get_submodule(where)
    new = copy.deepcopy(old)
    with torch.no_grad():
        for p in new.parameters():
            p.mul_(1.5)
    setattr(model.get_submodule(parent), name, new)
    setattr(fast.get_submodule(parent), name, copy.deepcopy(new))
    x = torch.randn(2, 4, 6, 6)
    with pytest.warns(UserWarning, match="replaced"):
        _check64(model, fast, x)


@pytest.mark.slow
def test_compile_fullgraph_over_every_rule():
    torch._dynamo.reset()
    model, fast = _fast(_all_rules())
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(torch.compile(fast, fullgraph=True)(x), _ref64(model, x))


# -- real models ---------------------------------------------------------------------------------------
def _timm(name):
    return timm.create_model(name, pretrained=False, num_classes=10)


def _rows(rep, text):
    return [e for e in rep.swapped if text in e.what]


MODELS = {
    # name: (builder, input size, {report text: expected count})
    "cspresnet50": (lambda: _timm("cspresnet50"), 64, {AGG: 4}),
    "cs3darknet_s": (lambda: _timm("cs3darknet_s"), 64, {AGG: 4}),
    "efficientnet_b0": (lambda: _timm("efficientnet_b0"), 64, {GATED: 16}),
    "mobilenetv3_large_100": (lambda: _timm("mobilenetv3_large_100"), 64, {GATED: 8}),
    "regnety_016": (lambda: _timm("regnety_016"), 64, {GATED: 27}),
    "seresnet50": (lambda: _timm("seresnet50"), 64, {"SE gate + residual + relu: one pass": 16}),
    "tv.mobilenet_v3_large": (lambda: tv.models.mobilenet_v3_large(num_classes=10), 64, {GATED: 8}),
    "tv.efficientnet_b0": (lambda: tv.models.efficientnet_b0(num_classes=10), 64, {GATED: 16}),
    "tv.regnet_y_400mf": (lambda: tv.models.regnet_y_400mf(num_classes=10), 64, {GATED: 16}),
    "tv.vgg16.features": (lambda: tv.models.vgg16(num_classes=10).features, 32, {"+ relu": 13}),
    "tv.ssd300_vgg16.backbone": (
        lambda: tv.models.detection.ssd300_vgg16(weights=None, weights_backbone=None).backbone, 268,  # its minimum
        {"+ relu": 23, "conv3x3 d6 512→1024 + relu": 1}),
    "elan": (lambda: nn.Sequential(ELAN(32, 16, 64), MPTransition(64, 32), ELAN(64, 32, 128)), 32, {AGG: 2}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_real_models(name):
    build, size, expected = MODELS[name]
    model, fast = _fast(build())
    rep = fast.effops_report
    for text, count in expected.items():
        assert len(_rows(rep, text)) == count, f"{text!r}:\n{rep}"
    assert not rep.skipped, str(rep)  # every conv with a kernel is fused
    assert list(fast.state_dict()) == list(model.state_dict())
    x = torch.randn(1, 3, size, size) if name != "elan" else torch.randn(1, 32, size, size)
    ref = _check64(model, fast, x, tol=1e-10)
    with torch.no_grad(), effops.use_backend("reference"):
        _matches(fast(x), ref, fp32_tol=1e-4)  # fp32 (SSD's backbone returns a dict of feature maps)


@pytest.mark.slow
def test_dla34_roots_are_aggregations():
    model, fast = _fast(_timm("dla34"))
    rows = _rows(fast.effops_report, AGG)
    assert [e.path for e in rows] == ["level2.root.cat..relu", "level3.tree1.root.cat..relu",
                                      "level3.tree2.root.cat..relu", "level4.tree1.root.cat..relu",
                                      "level4.tree2.root.cat..relu", "level5.root.cat..relu"]
    assert rows[2].what == "cat(a list of segments) → conv1x1 448→128 + bn + relu" + AGG
    # DlaBasic's forward has an optional `shortcut` argument, which tracing would fix: reported, not fused.
    assert all("optional argument 'shortcut'" in e.what for e in fast.effops_report.skipped if e.path != "fc")
    _check64(model, fast, torch.randn(1, 3, 64, 64), tol=1e-10)


@pytest.mark.slow
def test_deeplabv3_dilated_backbone_and_aspp():
    model = tv.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5,
                                                      aux_loss=False)
    model, fast = _fast(model)
    rep = fast.effops_report
    assert [e.path for e in rep.skipped] == ["classifier.4"]  # the final 1×1 classifier: conv + bias only
    assert len(_rows(rep, AGG.replace(" [traced]", ", then Dropout [traced]"))) == 1
    assert len(_rows(rep, "conv3x3 d2 256→256")) == 5 and len(_rows(rep, "conv3x3 d4 512→512")) == 2
    ref = _check64(model, fast, torch.randn(1, 3, 64, 64), tol=1e-10)
    assert set(ref) == {"out"}
