"""Host-side (Python) cost of each layer above the kernel launch, on any machine.

A stub registered as the ``triton`` backend (in this process only) returns a preallocated tensor, so
no kernel runs and what is timed is effops' own Python: the dispatcher, input
checks, the torch.library op, and the module's forward (BN scale/bias, validation),
for FusedConvBNAct, FusedOSA (the whole block: one call, before its launches) and
a ResNet bottleneck fused by tracing (its graph plus three fused steps).
Usage: python benchmarks/tools/host_overhead.py   (on a small shared VM single runs vary by up to 2x:
compare the minima of alternating runs)
"""
import time

import torch

import effops
from effops import dispatch
from effops.ops import conv as C

x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
w, b = torch.randn(8, 8, 1, 1), torch.randn(8)
out = torch.empty(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
_outs = {(2, 8, 4, 4): out}


def _stub(x, weight, *rest):
    # No kernel, Python only: a preallocated output of the right shape (stride-1 convs here).
    key = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    if key not in _outs:
        _outs[key] = torch.empty(key).contiguous(memory_format=torch.channels_last)
    return _outs[key]


dispatch.register("conv_bn_act", "triton")(_stub)


def bench(name, fn, n=5000):
    for _ in range(200):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    print(f"{name:<34}{(time.perf_counter() - t0) / n * 1e6:8.1f} us")


m = effops.FusedConvBNAct(8, 8, 1).eval()
args = (x, w, None, b, None, [1, 1], [0, 0], [1, 1], 1, "relu", 0.0, False)
with torch.inference_mode():
    bench("dispatch.run", lambda: dispatch.run("conv_bn_act", x, w, None, b, None, None, *args[5:]))
    bench("check_inputs", lambda: C.check_inputs(x, w, None, b, None, [1, 1], [0, 0], [1, 1], 1, "relu"))
    bench("registered op (torch.ops.effops)", lambda: C._OP(*args))
    bench("module.scale_bias (per call)", lambda: m.scale_bias())
    bench("module call (eager inference)", lambda: m(x))


# FusedOSA: one call per block (stub backend for the whole-block op).
from effops.models.classic_vovnet import OSAModule  # noqa: E402

xo = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
out_osa = torch.empty(2, 64, 4, 4)
dispatch.register("osa_block", "triton")(lambda *a, **k: out_osa)
osa = effops.FusedOSA.from_module(OSAModule(64, 32, 64, 5, "OSA", identity=True, ese=True)).eval()
# A torchvision-style bottleneck fused by tracing: graph + 3 FusedSteps (conv stub as above).
try:
    import torchvision

    block = effops.optimize(torchvision.models.resnet50().layer1[1].eval())
    xb = torch.randn(2, 256, 4, 4).contiguous(memory_format=torch.channels_last)
except ImportError:
    block = None
with torch.inference_mode():
    bench("FusedOSA call (L=5, eSE, identity)", lambda: osa(xo))
    bench("FusedOSA.fused_arguments", lambda: osa.fused_arguments(xo, torch.float32))
    if block is not None:
        bench("traced ResNet bottleneck (3 steps)", lambda: block(xb))
