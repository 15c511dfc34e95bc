"""``ChannelShuffle``: ``nn.ChannelShuffle`` backed by :func:`effops.channel_shuffle`."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.shuffle import channel_shuffle


class ChannelShuffle(nn.ChannelShuffle):
    """Drop-in for ``nn.ChannelShuffle(groups)``: same constructor, no parameters or buffers
    (an empty ``state_dict``), still an ``nn.ChannelShuffle`` instance.

    Equivalent PyTorch: ``nn.ChannelShuffle(groups)``. 4-D inputs run
    :func:`effops.channel_shuffle` (the Triton kernel for float16 / bfloat16 / float32,
    output in the input's memory format; differentiable); other ranks run
    ``torch.nn.functional.channel_shuffle``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            return F.channel_shuffle(x, self.groups)
        return channel_shuffle(x, self.groups)
