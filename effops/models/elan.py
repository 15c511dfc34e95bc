"""YOLOv7's ELAN block and MP transition block in plain PyTorch (Wang et al. 2022).

These are the modules as YOLOv7 writes them, with hand-written forwards; ``effops.optimize``
converts them like any other model (the converter matches structures, not these classes)::

    block = effops.optimize(ELAN(256, 64, 256).eval())
    print(block.effops_report)   # 6 fused convs, cat(4 segments) → 1×1: N-segment aggregation

* every conv is YOLOv7's ``Conv``: ``Conv2d(bias=False, padding=k // 2)`` → ``BatchNorm2d`` →
  ``SiLU`` with the children ``conv`` / ``bn`` / ``act``, so its ``state_dict`` keys are YOLOv7's;
* :class:`ELAN`: ``a = cv1(x)``, ``b = cv2(x)`` (1×1, ``c1 → c_``), four 3×3 convs chained on
  ``b`` (``b1 … b4``, ``c_ → c_``), then ``cv7(cat([b4, b2, b, a], 1))`` (1×1, ``4·c_ → c2``):
  the layers at relative indices −1, −3, −5, −6 of YOLOv7's backbone yaml. The concat feeds
  only the 1×1 conv, so the converter runs it as one N-segment aggregation over the four
  tensors (no concat);
* :class:`MPTransition`: ``cat([cv3(cv2(x)), cv1(maxpool2x2(x))], 1)`` (``c1 → 2·c_`` channels at
  half the resolution); the converter lets both convs write their halves of one buffer.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Conv", "ELAN", "MPTransition"]


class Conv(nn.Module):
    """YOLOv7's ``Conv``: ``act(bn(conv(x)))`` with ``Conv2d(c1, c2, k, s, padding=k // 2, bias=False)``,
    ``BatchNorm2d(c2)`` and ``SiLU``."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class ELAN(nn.Module):
    """YOLOv7 backbone ELAN block: input ``c1``, width ``c_``, output ``c2`` (published: ``c_ = 64``,
    ``c2 = 256`` in the first stage, both doubling per stage). Equivalent PyTorch::

        a, b = cv1(x), cv2(x)
        b1 = cv3(b); b2 = cv4(b1); b3 = cv5(b2); b4 = cv6(b3)
        return cv7(torch.cat([b4, b2, b, a], 1))
    """

    def __init__(self, c1: int, c_: int, c2: int):
        super().__init__()
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c1, c_, 1)
        self.cv3 = Conv(c_, c_, 3)
        self.cv4 = Conv(c_, c_, 3)
        self.cv5 = Conv(c_, c_, 3)
        self.cv6 = Conv(c_, c_, 3)
        self.cv7 = Conv(4 * c_, c2, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.cv1(x)
        b = self.cv2(x)
        b1 = self.cv3(b)
        b2 = self.cv4(b1)
        b3 = self.cv5(b2)
        b4 = self.cv6(b3)
        return self.cv7(torch.cat([b4, b2, b, a], 1))


class MPTransition(nn.Module):
    """YOLOv7's MP transition between backbone stages: ``c1 → 2·c_`` channels at half the
    resolution (even input sizes, as YOLO's multiples of 32 are). Equivalent PyTorch::

        torch.cat([cv3(cv2(x)), cv1(max_pool2d(x, 2))], 1)    # cv3: 3×3 stride 2
    """

    def __init__(self, c1: int, c_: int):
        super().__init__()
        self.mp = nn.MaxPool2d(2, 2)
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c1, c_, 1)
        self.cv3 = Conv(c_, c_, 3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.cv3(self.cv2(x)), self.cv1(self.mp(x))], 1)
