"""``effops::linear_native``: the native matrix-vector product of :class:`effops.Linear` as a
torch.library op, so a compiled model calls it too (Inductor would otherwise lower ``F.linear`` to
BLAS's sgemv, about twice the time of streaming the cold weight once at batch 1).

Equivalent PyTorch: ``act(F.linear(x, weight, bias))`` for a float32 CPU ``[N, I]`` input. Inference
only: its C++ kernel (csrc/module.cpp → ``linear`` in csrc/se.cpp) replaces the body below, and
its autograd kernel makes a backward through it an error."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import conv as _conv


@torch.library.custom_op("effops::linear_native", mutates_args=())
def _linear_native_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, act_param: float) -> Tensor:
    return _conv._native.module().linear(x, weight, bias, act, float(act_param))


@_linear_native_op.register_fake
def _(x, weight, bias, act, act_param):
    return x.new_empty((x.shape[0], weight.shape[0]))


LINEAR_NATIVE_OP = torch.ops.effops.linear_native.default


@torch.library.custom_op("effops::pool_linear_native", mutates_args=())
def _pool_linear_native_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x.mean((2, 3)), weight, bias)`` for a float32 CPU ``[N, C, H, W]`` input: a classifier
    head (:class:`effops.FusedClassifierHead`) under torch.compile, as in eager (``pool_linear``)."""
    return _conv._native.module().pool_linear(x, weight, bias)


@_pool_linear_native_op.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


POOL_LINEAR_NATIVE_OP = torch.ops.effops.pool_linear_native.default
