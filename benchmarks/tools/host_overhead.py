"""Host-side (Python) cost of each layer above the kernel launch, on any machine.

A stub backend registered in the ``cuda`` slot returns a preallocated tensor, so
no kernel runs and what is timed is effops' own Python: the dispatcher, input
checks, the torch.library op, and the module's forward (fold cache, validation).
Usage: python benchmarks/tools/host_overhead.py
"""
import time

import torch

import effops
from effops import dispatch
from effops.ops import conv as C

x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
w, b = torch.randn(8, 8, 1, 1), torch.randn(8)
out = torch.empty(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
dispatch.register("conv_bn_act", "cuda")(lambda *a, **k: out)  # stub: no kernel, Python only


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
    bench("module.folded_parameters (cached)", lambda: m.folded_parameters())
    bench("module call (eager inference)", lambda: m(x))
