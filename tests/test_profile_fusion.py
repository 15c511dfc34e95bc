"""What a converted model's eval forward actually runs, read from torch.profiler.

A fusion that exists only in the report is worth nothing: these tests profile the eval
forward of converted small models on the **Triton backend** (forced, so a silent fallback
to the reference backend is an error; under the interpreter on CPU) and list every ATen
op that the fusions are meant to remove:

* concatenation: ``aten::cat`` (and its aliases);
* a standalone channel shuffle: any op named ``*channel_shuffle*`` (effops' own copy
  kernel included), or a transpose / permute / clone / contiguous / reshape of a 5-D
  tensor (torchvision's ``view → transpose → contiguous → view`` shuffle);
* a separate SE: the squeeze (``aten::mean`` / adaptive average pool of a 4-D tensor),
  the gate (``aten::sigmoid`` / ``aten::hardsigmoid`` of a 4-D tensor) or the scaling
  (``aten::mul`` with a 4-D operand). Per-channel BatchNorm scale / bias ops are 1-D
  and don't count. The classifier head's global pool is not an SE: the ops of timm's
  ``forward_head``, profiled alone on the features, are discounted once each.

Each test also checks the converted model's output against the original model in fp64
(fp32 rule: relative error <= 1e-5).
"""
from collections import Counter

import pytest
import torch
from torch import nn

import effops
import effops.nn.ghost  # noqa: F401 - registers the ghost-module block rule
import effops.nn.se  # noqa: F401 - registers the squeeze-excite block rule
import effops.nn.shufflenet  # noqa: F401 - registers the ShuffleNetV2-unit block rule

from helpers import needs_triton, randomize_bn, rel_err

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread per test process: on a busy 2-core machine (``pytest -n 2``, other
    jobs) PyTorch's OpenMP threads spin against each other and the fp64 references' depthwise
    convs slow down by orders of magnitude (see tests/test_model_conversion.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CAT_OPS = {"aten::cat", "aten::_cat", "aten::concat", "aten::concatenate"}
RESHUFFLE_OPS = {"aten::transpose", "aten::permute", "aten::clone", "aten::contiguous", "aten::reshape",
                 "aten::flatten"}
SE_POOL_OPS = {"aten::mean", "aten::adaptive_avg_pool2d", "aten::_adaptive_avg_pool2d", "aten::avg_pool2d"}
SE_GATE_OPS = {"aten::sigmoid", "aten::sigmoid_", "aten::hardsigmoid", "aten::hardsigmoid_"}
SE_MUL_OPS = {"aten::mul", "aten::mul_"}


def _events(fn, x):
    with torch.no_grad(), effops.use_backend("triton"), \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fn(x)
    return out, [(e.name, [list(s) for s in e.input_shapes]) for e in prof.events()]


def _offenders(events, *, se: bool):
    bad = []
    for name, shapes in events:
        ranks = [len(s) for s in shapes]
        if name in CAT_OPS or "channel_shuffle" in name:
            bad.append((name, shapes))
        elif name in RESHUFFLE_OPS and 5 in ranks:
            bad.append((name, shapes))
        elif se and name in SE_POOL_OPS | SE_GATE_OPS | SE_MUL_OPS and 4 in ranks:
            bad.append((name, shapes))
    return bad


def _check(model: nn.Module, x: torch.Tensor, se: bool = False):
    """Convert ``model``, profile its eval forward, assert no offending op ran and the output
    matches the original in fp64. ``se``: also look for SE ops, except those of the
    classifier head (timm's ``forward_head``, profiled alone on the features: its global
    pool is the classifier's, not an SE)."""
    model = randomize_bn(model).eval()
    fast = effops.optimize(model).eval()
    out, events = _events(fast, x)
    bad = _offenders(events, se=se)
    if se:
        with torch.no_grad():
            feats = fast.forward_features(x)
        _, head = _events(fast.forward_head, feats)
        allowed = Counter(repr(e) for e in _offenders(head, se=True))
        kept = []
        for e in bad:
            if allowed[repr(e)] > 0:
                allowed[repr(e)] -= 1
            else:
                kept.append(e)
        bad = kept
    assert not bad, f"unfused ops in the eval forward: {bad}\n{fast.effops_report}"
    with torch.no_grad():
        ref64 = model.double()(x.double())
    err = rel_err(out, ref64)
    assert err <= 1e-5, f"relative error {err:.2e} > 1e-5 against the original in fp64"
    return fast


@needs_triton
def test_shufflenet_v2_no_cat_no_shuffle():
    """Reduced-width torchvision ShuffleNetV2 with a stride-1 unit (stage 2 repeats twice)."""
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    model = ShuffleNetV2([2, 1, 1], [8, 16, 32, 64, 128], num_classes=10)
    fast = _check(model, torch.randn(1, 3, 32, 32))
    units = [e for e in fast.effops_report.swapped if "ShuffleNetV2 unit" in e.what]
    assert len(units) == 4, str(fast.effops_report)


@needs_triton
def test_ghostnet_no_cat_no_separate_se():
    """timm GhostNet at half width with four bottlenecks: identity and conv shortcuts,
    a strided depthwise conv, SE in a strided and in a stride-1 block."""
    from timm.models.ghostnet import GhostNet

    cfgs = [[[3, 16, 16, 0, 1]], [[3, 48, 24, 0, 2]], [[5, 72, 40, 0.25, 2]], [[3, 120, 40, 0.25, 1]]]
    model = GhostNet(cfgs, num_classes=10, width=0.5)
    fast = _check(model, torch.randn(1, 3, 32, 32), se=True)
    what = [e.what for e in fast.effops_report.swapped]
    assert sum(w.startswith("ghost module") for w in what) == 8, str(fast.effops_report)
    assert sum(w.startswith("squeeze-excite") for w in what) == 2, str(fast.effops_report)
    assert sum(w.startswith("SE gate → ghost module") for w in what) == 2, str(fast.effops_report)


@needs_triton
def test_se_resnet_no_separate_se():
    """timm SE-ResNet (Bottleneck with ``attn_layer='se'``), one block per stage, narrow."""
    from timm.models.resnet import Bottleneck, ResNet

    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, channels=(8, 16, 32, 64),
                   block_args=dict(attn_layer="se"))
    fast = _check(model, torch.randn(1, 3, 32, 32), se=True)
    what = [e.what for e in fast.effops_report.swapped]
    assert sum(w.startswith("SE gate + residual") for w in what) == 4, str(fast.effops_report)
