"""``Linear``: ``nn.Linear`` whose small-batch CPU inference runs effops' native matrix-vector kernel."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..native import module as native_module
from ..ops.conv import native_fast
from ..ops.linear import LINEAR_NATIVE_OP

# Rows up to which the native kernel is used. At batch 1 a classifier head (1000 x 1280 fp32, 5 MB)
# is a matrix-vector product bound by streaming a weight that the convs evicted since the last
# forward: ATen's sgemv takes about twice the time of reading the weight once (measured cold, 2
# threads: 292 us against 149 us for 1280 -> 1000 at batch 1, 331 against 274 at 8); from ~32 rows
# on it is a GEMM, and BLAS's register blocking wins (634 against 738 us at 32).
MAX_NATIVE_ROWS = 8


class Linear(nn.Linear):
    """Drop-in for ``nn.Linear``: same constructor, parameters and ``state_dict``, still an
    ``nn.Linear`` instance.

    Equivalent PyTorch: ``F.linear(x, weight, bias)``. Inference (no gradient needed) on a 2-D
    float32 CPU input of at most ``MAX_NATIVE_ROWS`` rows runs ``linear`` (csrc/se.cpp): both threads
    stream their half of the weight's rows once, eight FMA chains at a time; under torch.compile
    the same kernel as the op ``effops::linear_native``. Everything else (gradients, more rows,
    other ranks, dtypes and devices, bad shapes and their errors) runs ``nn.Linear.forward``."""

    @classmethod
    def from_module(cls, m: nn.Linear) -> "Linear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = m.in_features, m.out_features
        new.register_parameter("weight", m.weight)  # the same Parameter objects: no copy, the same state_dict
        new.register_parameter("bias", m.bias)
        new.train(m.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if type(x) is Tensor and x.dim() == 2 and 0 < x.shape[0] <= MAX_NATIVE_ROWS and x.dtype == torch.float32 \
                and w.dtype == torch.float32 and w.device.type == "cpu" and x.shape[1] == w.shape[1] \
                and native_fast(x) \
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                      or (b is not None and b.requires_grad))) \
                and (b is None or (b.dtype == torch.float32 and b.device.type == "cpu")):
            if torch.compiler.is_compiling():
                return LINEAR_NATIVE_OP(x, w, b, "identity", 0.0)
            return native_module().linear(x, w, b, "identity", 0.0)
        return super().forward(x)


def plain_linear(m: nn.Module) -> bool:
    """``nn.Linear``, or timm's ``Linear`` (an ``nn.Linear`` whose forward only adds TorchScript
    dtype handling): a module whose forward is ``F.linear(x, weight, bias)``."""
    t = type(m)
    return t is nn.Linear or (t.__name__ == "Linear" and t.__module__.startswith("timm.")
                               and isinstance(m, nn.Linear) and t.__bases__ == (nn.Linear,))
