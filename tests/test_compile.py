"""torch.compile(fullgraph=True) over optimized models: no graph breaks."""
import copy

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


def test_hooks_under_compile_behave_as_on_plain_modules():
    """A fused module's children's hooks under torch.compile (Dynamo's default hook-guard policy)
    behave as a plain module's do: a hook registered before compiling fires (the fused module runs
    its children); one registered after compiling does not until a recompile, then it does."""
    torch.manual_seed(0)
    plain = randomize_bn(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())).eval()
    fused = effops.FusedConvBNAct.from_modules(*[copy.deepcopy(m) for m in plain]).eval()
    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)

    def run(model, hook_before, hook_after):
        """Whether the hook fired on the last call, and that call's output."""
        torch._dynamo.reset()
        calls = []
        target = model[0] if isinstance(model, nn.Sequential) else model.conv
        hook = lambda *a: calls.append(1)  # noqa: E731
        handles = [target.register_forward_hook(hook)] if hook_before else []
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            y = compiled(x)
            if hook_after:
                handles.append(target.register_forward_hook(hook))
                calls.clear()
                y = compiled(x)
                after_compile = bool(calls)
                torch._dynamo.reset()  # a recompile sees it
                calls.clear()
                y = compiled(x)
                assert calls, "a recompile must see the hook"
                calls[:] = [1] if after_compile else []
        for h in handles:
            h.remove()
        return bool(calls), y

    for before, after in ((True, False), (False, True), (False, False)):
        seen_plain, ref = run(plain, before, after)
        seen_fused, y = run(fused, before, after)
        assert seen_fused == seen_plain, (before, after, seen_fused, seen_plain)
        assert_matches(y, ref.double())
    assert run(fused, True, False)[0] and not run(fused, False, False)[0]
