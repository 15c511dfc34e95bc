"""Whole models through ``effops.optimize``: what the report says and what the model computes.

For each model (random weights, non-trivial BN statistics, eval):

* the report: swapped entries counted by kind (ShuffleNetV2 unit, ghost module, RepVGG
  block, squeeze-excite, SE gate folded into a conv, SE + residual + act, N-segment
  aggregation, conv + BN + act with or without a residual) equal the counts that follow
  from the architecture (see each entry of ``EXPECTED``), and nothing is skipped;
* structure, in fp64 on the reference backend: the converted model against the original,
  relative error <= ``FP64_TOL`` (measured: at most 1.8e-14 over these models, 1×3×64×64);
* fp32: the converted model (reference backend: the Triton kernels are tested on tiny
  shapes elsewhere, see tests/test_profile_fusion.py) against the original in fp64,
  relative error <= 1e-5.

train() is unchanged: the converted model gives bit-identical outputs, gradients and BN
running statistics (timm resnetrs50, torchvision shufflenet_v2_x1_0, timm ghostnet_100).
``effops.models.resnet_rs`` has timm's keys and shapes at every depth and computes what
timm's resnetrs50 computes with the same weights.
"""
import re
from collections import Counter

import pytest
import torch

import effops
import effops.nn.ghost  # noqa: F401 - registers the ghost-module block rule
import effops.nn.repvgg  # noqa: F401 - registers the RepVGG-block rule
import effops.nn.se  # noqa: F401 - registers the squeeze-excite block rule
import effops.nn.shufflenet  # noqa: F401 - registers the ShuffleNetV2-unit block rule
from effops.models.elan import ELAN
from effops.models.resnet_rs import RESNET_RS_LAYERS, resnet_rs

from helpers import randomize_bn, rel_err

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread per test process. On a busy 2-core machine (``pytest -n 2``, other
    jobs) PyTorch's OpenMP threads spin against each other: efficientnet_b0's fp64 eager forward
    (the reference here) took 75 s with 2 threads and 0.09 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Measured maximum over the models below: 1.8e-14 (regnety_016; fp64 rounding of two summation orders).
FP64_TOL = 1e-13
FP32_TOL = 1e-5

# Report line -> kind (first match wins); a conv entry with "+ residual" gets "+residual".
_KINDS = [
    (r"^ShuffleNetV2 unit", "shufflenet_unit"),
    (r"^ghost module", "ghost"),
    (r"^RepVGG block", "repvgg"),
    (r"^(effective )?squeeze-excite", "se"),
    (r"^SE gate \+ residual", "se_residual"),
    (r"^SE gate → conv", "se_gate_conv"),
    (r"^SE gate → ghost module", "se_gate_ghost"),
    (r"^cat\(", "aggregate"),
    (r"^conv", "conv"),
    (r"^max pool", "max_pool"),
    (r"^linear", "linear"),
    (r"^classifier head", "head"),
]


def _kind(what: str) -> str:
    for pattern, kind in _KINDS:
        if re.search(pattern, what):
            if kind in ("conv", "se_gate_conv") and "+ residual" in what:
                kind += "+residual"
            return kind
    return f"other: {what}"


def _tv(name):
    return lambda: getattr(torchvision.models, name)()


def _timm(name):
    return lambda: timm.create_model(name, pretrained=False)


# name -> (builder, input shape, expected swapped entries by kind). Counts follow the architectures
# (each classifier head's nn.Linear is one "linear", a timm ClassifierHead one "head"):
EXPECTED = {
    # 16 units (3 stride 2 + 13 stride 1, stages_repeats 4/8/4); conv1 and conv5; the stem max pool.
    "tv_shufflenet_v2_x1_0": (_tv("shufflenet_v2_x1_0"), (1, 3, 64, 64),
                              {"shufflenet_unit": 16, "conv": 2, "max_pool": 1, "linear": 1}),
    # 15 bnecks, 8 with SE (5 of them residual); the 7 without SE: 5 residual projects, 2 plain;
    # 14 expand + 15 dw + stem + last conv = 31 convs with act; two Linear layers in the classifier.
    "tv_mobilenet_v3_large": (_tv("mobilenet_v3_large"), (1, 3, 64, 64),
                              {"se": 8, "se_gate_conv": 3, "se_gate_conv+residual": 5, "conv+residual": 5,
                               "conv": 33, "linear": 2}),
    # 16 blocks, all SE; c conv gets the gate, and the residual add + ReLU except in the 4 first
    # blocks, where the projection conv takes the add + ReLU; stem + 16 a + 16 b convs.
    "tv_regnet_y_400mf": (_tv("regnet_y_400mf"), (1, 3, 64, 64),
                          {"se": 16, "se_gate_conv": 4, "se_gate_conv+residual": 12, "conv+residual": 4,
                           "conv": 33, "linear": 1}),
    # 16 bottlenecks = 32 ghost modules, 7 SE; 4 strided conv_dw, 5 conv shortcuts (dw + pw, the pw
    # taking the residual add); stem, final 1x1 ConvBnAct, conv_head (+ bias + ReLU); each SE's
    # gate folded into its ghost2's primary conv.
    "ghostnet_100": (_timm("ghostnet_100"), (1, 3, 64, 64),
                     {"ghost": 32, "se": 7, "se_gate_ghost": 7, "conv+residual": 5, "conv": 12, "linear": 1}),
    # 16 bottlenecks: SE + shortcut + ReLU in one pass; 3 stem convs (the last with bn1/act1), the
    # strided stem conv, 16 × 3 block convs, 4 downsample convs.
    "resnetrs50": (_timm("resnetrs50"), (1, 3, 64, 64), {"se": 16, "se_residual": 16, "conv": 56, "linear": 1}),
    # The same with effops' SqueezeExcite built in (nothing to swap for it).
    "effops_resnet_rs50": (lambda: resnet_rs(50), (1, 3, 64, 64), {"se_residual": 16, "conv": 56, "linear": 1}),
    # 7x7 stem, 16 × 3 block convs, 4 downsample convs.
    "seresnet50": (_timm("seresnet50"), (1, 3, 64, 64), {"se": 16, "se_residual": 16, "conv": 53, "max_pool": 1, "linear": 1}),
    # depths 2/6/17/2 = 27 blocks with SE; conv3 takes gate, residual and ReLU; stem + 27 conv1 +
    # 27 grouped conv2 + 4 downsample convs.
    "regnety_016": (_timm("regnety_016"), (1, 3, 64, 64), {"se": 27, "se_gate_conv+residual": 27, "conv": 59, "head": 1}),
    # 16 blocks with SE (repeats 1/2/2/3/3/4/1: 9 residual); stem + 16 dw + 15 expand + conv_head.
    "efficientnet_b0": (_timm("efficientnet_b0"), (1, 3, 64, 64),
                        {"se": 16, "se_gate_conv": 7, "se_gate_conv+residual": 9, "conv": 33, "linear": 1}),
    # As torchvision's, plus the conv_head (1x1 + bias + hardswish).
    "mobilenetv3_large_100": (_timm("mobilenetv3_large_100"), (1, 3, 64, 64),
                              {"se": 8, "se_gate_conv": 3, "se_gate_conv+residual": 5, "conv+residual": 5,
                               "conv": 34, "linear": 1}),
    # stem + 2/4/14/1 blocks; the stem and each stage's first block (stride 2) have no identity branch.
    "repvgg_a2": (_timm("repvgg_a2"), (1, 3, 64, 64), {"repvgg": 22, "head": 1}),
    # 4 cross-stage transitions (cat → 1x1); 3/3/5/2 residual blocks.
    "cspresnet50": (_timm("cspresnet50"), (1, 3, 64, 64), {"aggregate": 4, "conv+residual": 13, "conv": 38, "max_pool": 1, "head": 1}),
    # cv1, cv2, four 3x3 convs; cat([b4, b2, b, a]) → 1x1.
    "elan": (lambda: ELAN(16, 8, 32), (1, 16, 16, 16), {"aggregate": 1, "conv": 6}),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_model_converts_whole_and_matches(name):
    build, shape, expected = EXPECTED[name]
    model = randomize_bn(build()).eval()
    fast = effops.optimize(model)
    report = fast.effops_report
    assert not report.skipped, "skipped:\n" + "\n".join(f"  {e.path}: {e.what}" for e in report.skipped)
    kinds = Counter(_kind(e.what) for e in report.swapped)
    assert dict(kinds) == expected, f"swapped by kind {dict(kinds)} != {expected}\n{report}"

    x = torch.randn(shape)
    with torch.no_grad(), effops.use_backend("reference"):
        out32, eager32 = fast(x), model(x)
        ref64 = model.double()(x.double())
        out64 = fast.double()(x.double())
    struct = rel_err(out64, ref64)
    assert struct <= FP64_TOL, f"fp64 structure: relative error {struct:.2e} > {FP64_TOL:.0e}"
    err = rel_err(out32, ref64)
    assert err <= FP32_TOL, (f"fp32: relative error {err:.2e} > {FP32_TOL:.0e} against the original in fp64 "
                             f"(the original in fp32: {rel_err(eager32, ref64):.2e})")


@pytest.mark.parametrize("name", ["resnetrs50", "tv_shufflenet_v2_x1_0", "ghostnet_100"])
def test_train_mode_unchanged(name):
    """train(): the converted model runs the original math: outputs, every parameter's gradient
    and the BN running statistics are bit-identical (dropout seeded the same)."""
    build, _, _ = EXPECTED[name]
    model = randomize_bn(build()).train()
    fast = effops.optimize(model).train()
    x = torch.randn(2, 3, 64, 64)
    results = []
    for m in (model, fast):
        torch.manual_seed(1)
        out = m(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in m.named_parameters()}, m.state_dict()))
    (out_a, grads_a, state_a), (out_b, grads_b, state_b) = results
    assert torch.equal(out_a, out_b), f"outputs differ by {(out_a - out_b).abs().max().item():.2e}"
    assert grads_a.keys() == grads_b.keys()
    diff = [n for n in grads_a if not torch.equal(grads_a[n], grads_b[n])]
    assert not diff, f"gradients differ: {diff[:8]}"
    assert state_a.keys() == state_b.keys()
    diff = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not diff, f"state (BN running statistics) differs: {diff[:8]}"


def test_resnet_rs50_loads_timm_weights():
    """timm's resnetrs50 state_dict loads with strict=True; in eval both compute the same (fp64)."""
    ref = randomize_bn(timm.create_model("resnetrs50", pretrained=False)).eval().double()
    model = resnet_rs(50).double()
    model.load_state_dict(ref.state_dict(), strict=True)
    model.eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad(), effops.use_backend("reference"):
        err = rel_err(model(x), ref(x))
    assert err <= FP64_TOL, f"relative error {err:.2e} > {FP64_TOL:.0e}"


@pytest.mark.parametrize("depth", sorted(RESNET_RS_LAYERS))
def test_resnet_rs_keys_and_shapes_match_timm(depth):
    """Every depth has timm's ``resnetrs{depth}`` keys and shapes (built on the meta device)."""
    with torch.device("meta"):
        ref = timm.create_model(f"resnetrs{depth}", pretrained=False)
        model = resnet_rs(depth)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(want), f"keys differ: missing {sorted(set(want) - set(got))[:5]}, " \
                                    f"extra {sorted(set(got) - set(want))[:5]}"
    assert got == want, [k for k in want if got[k] != want[k]][:5]


def test_resnet_rs_bad_depth():
    with pytest.raises(ValueError, match="expected one of 50, 101, 152, 200, 270, 350, 420"):
        resnet_rs(34)
