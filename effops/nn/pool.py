"""``MaxPool2d``: ``nn.MaxPool2d`` whose CPU inference runs effops' native NHWC kernel."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..native import module as native_module
from ..ops.conv import native_fast


def _pair(v) -> list:
    return [v, v] if isinstance(v, int) else list(v)


class MaxPool2d(nn.MaxPool2d):
    """Drop-in for ``nn.MaxPool2d``: same constructor and attributes, no parameters or buffers (an
    empty ``state_dict``), still an ``nn.MaxPool2d`` instance.

    Equivalent PyTorch: ``F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode,
    return_indices)``. Eager inference on a channel-minor (NHWC) float32 or bfloat16 CPU input with
    dilation 1 and no indices runs ``max_pool_nhwc`` (csrc/pool.cpp): the same values, NaN included,
    without the int64 indices ATen's CPU kernel computes and drops. Everything else (gradients,
    NCHW inputs, other dtypes and devices, torch.compile, bad arguments and their errors) runs
    ``nn.MaxPool2d.forward``."""

    @classmethod
    def from_module(cls, m: nn.MaxPool2d) -> "MaxPool2d":
        new = cls(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices, m.ceil_mode)
        new.train(m.training)
        return new

    def native_args(self, h: int, w: int):
        """``(kernel, stride, padding)`` as lists of 2 where ``max_pool_nhwc`` computes this pool on an
        ``h x w`` input (dilation 1, no indices, settings F.max_pool2d accepts), else None."""
        if self.return_indices or _pair(self.dilation) != [1, 1]:
            return None
        k, s, p = _pair(self.kernel_size), _pair(self.stride), _pair(self.padding)  # (nn.MaxPool2d stores kernel_size for stride=None)
        if 2 * p[0] <= k[0] and 2 * p[1] <= k[1] and min(k + s) >= 1 and min(p) >= 0 \
                and h + 2 * p[0] >= k[0] and w + 2 * p[1] >= k[1]:
            return k, s, p
        return None

    def forward(self, x: Tensor):
        if type(x) is Tensor and x.dim() == 4 and not torch.compiler.is_compiling() \
                and (x.shape[1] <= 1 or x.stride(1) == 1) and x.numel() > 0 and native_fast(x) \
                and not (x.requires_grad and torch.is_grad_enabled()):
            a = self.native_args(x.shape[2], x.shape[3])
            if a is not None:
                return native_module().max_pool_nhwc(x, *a, self.ceil_mode)
        return super().forward(x)


def pool_out_size(size: int, k: int, s: int, p: int, ceil: bool) -> int:
    """nn.MaxPool2d's output size (dilation 1): a ceil-mode window must start inside the input or
    left padding."""
    span = size + 2 * p - k
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out
