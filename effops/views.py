"""Channel views: the one abstraction that makes concat, split and shuffle free.

A :class:`ChannelView` names the channels ``offset, offset + step, ...,
offset + (channels - 1) * step`` of a 4-D ``(N, C, H, W)`` tensor. In NHWC
(``torch.channels_last``) memory those channels are a (strided) column range of
the ``[pixels, C]`` matrix, so a kernel that takes arbitrary element strides
can read or write them in place:

* concat  = producers write disjoint channel ranges of one buffer;
* split   = consumers read a channel range;
* shuffle = a producer writes with ``step = groups`` at ``offset = branch``.

``view.as_tensor()`` is an ordinary strided PyTorch view of the buffer
(``buf[:, offset : offset + channels * step : step]``), which is what the
kernels consume: every effops kernel takes element strides for each tensor, so
a view costs nothing and needs no special case.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class ChannelView:
    """``(tensor, channel_offset, channel_step)`` over a 4-D NCHW-shaped tensor.

    Equivalent PyTorch::

        view = buf[:, offset : offset + channels * step : step]   # no copy

    ``channels`` defaults to as many as fit.
    """

    tensor: Tensor
    offset: int = 0
    step: int = 1
    channels: Optional[int] = None

    def __post_init__(self):
        t = self.tensor
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"ChannelView needs a 4-D (N, C, H, W) tensor, got {shape}")
        total = t.shape[1]
        if self.step < 1:
            raise ValueError(f"ChannelView step must be >= 1, got {self.step}")
        if not 0 <= self.offset < max(total, 1):
            raise ValueError(f"ChannelView offset {self.offset} outside the buffer's {total} channels")
        fit = (total - self.offset + self.step - 1) // self.step
        if self.channels is None:
            object.__setattr__(self, "channels", fit)
        elif not 1 <= self.channels <= fit:
            raise ValueError(
                f"ChannelView of {self.channels} channels at offset {self.offset} step {self.step} "
                f"does not fit in a buffer of {total} channels (at most {fit})"
            )

    @classmethod
    def of(cls, t: Tensor) -> "ChannelView":
        """The view of all channels of ``t``."""
        return cls(t, 0, 1, None)

    def as_tensor(self) -> Tensor:
        """The strided PyTorch view the kernels read or write (no copy)."""
        end = self.offset + (self.channels - 1) * self.step + 1
        return self.tensor[:, self.offset : end : self.step]

    @property
    def shape(self) -> torch.Size:
        n, _, h, w = self.tensor.shape
        return torch.Size((n, self.channels, h, w))
