"""effops' own Python per whole-model forward, down to the kernel launch, on any machine.

Every Triton kernel object is replaced by a stub that accepts the launch and does
nothing, so what is timed is the module forwards, BN scale/bias, dispatch and the
launchers (grid, tile choice, argument packing): everything but Triton's own
launcher and the GPU. Without a GPU the launchers take their interpreter branch
(TRITON_INTERPRET=1 is set here), which differs from the device branch only in the
tile choice. Also times one ``triton.cdiv`` call against integer arithmetic.

    python benchmarks/tools/launch_overhead.py            # VoVNet-39 (FusedOSA) and V2
"""
import os
import statistics
import time
import timeit

os.environ["TRITON_INTERPRET"] = "1"  # before effops is imported: kernels are interpreter objects

import torch  # noqa: E402
import triton  # noqa: E402

import effops  # noqa: E402
from effops.models import classic_vovnet  # noqa: E402
from effops.ops import conv, osa  # noqa: E402


class _StubKernel:
    launches = 0

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        _StubKernel.launches += 1


for module, names in ((conv, ["_conv_bn_act_kernel", "_depthwise_kernel"]),
                      (osa, ["_osa_agg_kernel", "_ese_gate_kernel", "_gate_residual_kernel", "_dw_pw_kernel"])):
    for name in names:
        setattr(module, name, _StubKernel())


def per_forward_us(model, x, n=100, repeats=5):
    with torch.inference_mode(), effops.use_backend("triton"):
        for _ in range(20):
            model(x)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                model(x)
            runs.append((time.perf_counter() - t0) / n * 1e6)
    return min(runs), statistics.median(runs)


x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
for v2 in (False, True):
    # No speed check: with stubbed kernels every output differs, and the check would keep the originals.
    model = effops.optimize(classic_vovnet("vovnet39", v2=v2).eval(), check_speed=False)
    _StubKernel.launches = 0
    with torch.inference_mode(), effops.use_backend("triton"):
        model(x)
    launches = _StubKernel.launches
    best, med = per_forward_us(model, x)
    print(f"vovnet39{' v2' if v2 else ''}: {launches} launches, effops Python per forward "
          f"{best / 1e3:.2f} ms (min of 5), {med / 1e3:.2f} ms (median)")
cdiv = min(timeit.repeat(lambda: triton.cdiv(1000, 64), number=100000, repeat=3)) * 10
ints = min(timeit.repeat(lambda: -(-1000 // 64), number=100000, repeat=3)) * 10
print(f"triton.cdiv {cdiv:.2f} us per call, integer arithmetic {ints:.2f} us (triton {triton.__version__})")
