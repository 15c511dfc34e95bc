"""ShuffleNet V2: the standalone channel shuffle, and whole V2 units — time, speedup, GB/s,
% of roofline, peak memory.

    pytest benchmarks/test_shufflenet.py             # CUDA: fp16 + bf16, batch 1 and 32; CPU: fp32, batch 1
    EFFOPS_BENCH_DTYPES=float16 pytest benchmarks/test_shufflenet.py

**Channel shuffle** (g=2, NHWC input) at the shapes a ShuffleNetV2 x1.0 shuffles at 224²
input (116 channels at 28², 232 at 14², 464 at 7²): ``eager`` is torchvision's
``view → transpose → reshape``; ``torch_channel_shuffle`` is ``torch.channel_shuffle``;
``effops`` is :func:`effops.channel_shuffle`; ``copy`` is a plain ``out.copy_(x)`` of the same
tensor, the copy-bandwidth reference a permutation can at best match. Roofline floor:
reading and writing the tensor once. Every provider's result is checked bit for bit.

**Units**: torchvision's ``InvertedResidual`` of ShuffleNetV2 x1.0 at 224² input, the first
(stride 2) and a repeated (stride 1) unit of stages 2, 3 and 4: ``eager`` (the module),
``compile_*`` (see effops.benchmark.compile_modes) and ``effops``
(:class:`effops.nn.shufflenet.FusedShuffleV2Block`: no ``torch.cat``, the shuffle is where the
branches' last convs write). Roofline floor: the convs' FLOPs, and the bytes of reading the
input and writing the output once (+ weights), i.e. a unit with no intermediate in memory.
Each case first checks effops against the eager module run in float64 (``_numerics.py``).
"""
import copy

import pytest
import torch

from effops.benchmark import compiled_providers, measure_providers, measured_peaks, randomize_bn, result_rows
from effops.nn.shufflenet import FusedShuffleV2Block
from effops.ops.shuffle import channel_shuffle

from _numerics import check_numerics
from test_osa import BATCHES, CUDA, DEV, DTYPES, _check, _providers, _record

tv = pytest.importorskip("torchvision")
from torchvision.models.shufflenetv2 import InvertedResidual  # noqa: E402

SHUFFLES = [
    # name, channels, H=W: the unit outputs of each stage of ShuffleNetV2 x1.0 at 224²
    ("s2_shuffle", 116, 28),
    ("s3_shuffle", 232, 14),
    ("s4_shuffle", 464, 7),
]

UNITS = [
    # name, inp, oup, stride, input H=W (ShuffleNetV2 x1.0 at 224²)
    ("s2_first_s2", 24, 116, 2, 56),
    ("s2_repeat_s1", 116, 116, 1, 28),
    ("s3_first_s2", 116, 232, 2, 28),
    ("s3_repeat_s1", 232, 232, 1, 14),
    ("s4_first_s2", 232, 464, 2, 14),
    ("s4_repeat_s1", 464, 464, 1, 7),
]


def _tag(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _view_transpose_reshape(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=_tag)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("case", SHUFFLES, ids=lambda c: c[0])
def test_channel_shuffle(case, batch, dtype, results):
    name, c, hw = case
    x = torch.randn(batch, c, hw, hw, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)
    dst = torch.empty_like(x)
    providers = {
        "eager": lambda: _view_transpose_reshape(x, 2),
        "torch_channel_shuffle": lambda: torch.channel_shuffle(x, 2),
        "effops": lambda: channel_shuffle(x, 2),
        "copy": lambda: dst.copy_(x),
    }
    with torch.inference_mode():
        want = _view_transpose_reshape(x, 2)
        for prov in ("torch_channel_shuffle", "effops"):
            assert torch.equal(providers[prov](), want), f"{prov} is not the g=2 shuffle"
        errs = check_numerics(providers["effops"](), want.double(), want)
        providers.update(compiled_providers(_Shuffle(), x, batch))
        min_bytes = 2 * x.numel() * x.element_size()
        timed = measure_providers(providers, DEV, host_graph=CUDA and batch == 1)
        results.extend(result_rows(timed, flops=0, min_bytes=min_bytes, peaks=measured_peaks(DEV, dtype),
                                   host_graph=batch == 1, cuda=CUDA, case=f"{name}_b{batch}_{_tag(dtype)}",
                                   shape=f"{batch}x{c}x{hw}x{hw} g=2 NHWC", dtype=str(dtype), **errs,
                                   max_rel_err_vs_eager=0.0))
        results.flush()


class _Shuffle(torch.nn.Module):
    """The eager shuffle as a module, for the torch.compile providers."""

    def forward(self, x):
        return _view_transpose_reshape(x, 2)


def _unit_cost(inp, oup, stride, batch, hw):
    """(FLOPs, OH) of one unit: 1x1 convs and 3x3 depthwise convs, multiply-add = 2."""
    bf = oup // 2
    oh = (hw - 1) // stride + 1
    pin, pout = batch * hw * hw, batch * oh * oh
    if stride == 1:
        return 2 * pout * (bf * bf + 9 * bf + bf * bf), oh
    branch1 = pout * (9 * inp + inp * bf)
    branch2 = pin * inp * bf + pout * (9 * bf + bf * bf)
    return 2 * (branch1 + branch2), oh


@pytest.mark.parametrize("dtype", DTYPES, ids=_tag)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u[0])
def test_shufflenet_v2_unit(unit, batch, dtype, results):
    name, inp, oup, stride, hw = unit
    model = randomize_bn(InvertedResidual(inp, oup, stride)).eval()
    model = model.to(DEV, dtype).to(memory_format=torch.channels_last)
    fast = FusedShuffleV2Block.from_module(copy.deepcopy(model)).eval()
    x = torch.randn(batch, inp, hw, hw, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        errs = _check(fast, model, x)
        flops, oh = _unit_cost(inp, oup, stride, batch, hw)
        weights = sum(p.numel() for p in model.parameters())
        min_bytes = x.element_size() * (batch * inp * hw * hw + batch * oup * oh * oh + weights)
        _record(results, f"{name}_b{batch}_{_tag(dtype)}", f"{batch}x{inp}x{hw}x{hw} -> {oup}x{oh}x{oh} s{stride}",
                dtype, batch, _providers(model, fast, x, batch), flops, min_bytes, errs)
