"""torch.compile(fullgraph=True) over optimized models: no graph breaks."""
import pytest
import torch
from torch import nn

import effops

from helpers import KERNEL_DEVICE, ON_CUDA, assert_matches, randomize_bn


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if ON_CUDA else []))
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()),
    )
    model = randomize_bn(model).eval().to(KERNEL_DEVICE)
    fast = effops.optimize(model)
    x = torch.randn(2, 3, 16, 16, device=KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(fast, fullgraph=True)
    with torch.no_grad(), effops.use_backend(backend):
        assert_matches(compiled(x), model.double()(x.double()))


@pytest.mark.slow
def test_compile_fullgraph_with_grad_in_eval():
    """Eval with autograd (frozen-BN fine-tuning) also traces without breaks."""
    torch._dynamo.reset()
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())).eval()
    fast = effops.optimize(model)
    x = torch.randn(1, 3, 8, 8)
    with effops.use_backend("reference"):
        y = torch.compile(fast, fullgraph=True, backend="aot_eager")(x)
        y.sum().backward()
    ref = model(x)
    ref.sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.conv.weight.grad, model[0].weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if ON_CUDA else []))
def test_compile_fullgraph_osa_block(backend):
    """A FusedOSA is one opaque effops::osa_block node to dynamo: no graph break."""
    from effops.models.classic_vovnet import OSAModule

    torch._dynamo.reset()
    model = nn.Sequential(OSAModule(8, 5, 8, 3, "OSA2_1", identity=True, ese=True), nn.ReLU())
    model = randomize_bn(model).eval().to(KERNEL_DEVICE)
    fast = effops.optimize(model)
    assert isinstance(fast[0], effops.FusedOSA)
    x = torch.randn(2, 8, 6, 6, device=KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(fast, fullgraph=True)
    with torch.no_grad(), effops.use_backend(backend):
        assert_matches(compiled(x), model.double()(x.double()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm_resnet18", "vovnet27_slim_v2"])
def test_whole_optimized_models_trace_as_one_graph(name):
    """Traced forwards (TracedForward), FusedOSA and FusedSequential all stay inside one dynamo graph."""
    if name == "timm_resnet18":
        timm = pytest.importorskip("timm")
        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    else:
        model = effops.models.classic_vovnet("vovnet27_slim", num_classes=10, v2=True)
    torch._dynamo.reset()
    fast = effops.optimize(randomize_bn(model).eval())
    with torch.no_grad(), effops.use_backend("reference"):
        explained = torch._dynamo.explain(fast)(torch.randn(1, 3, 32, 32))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
