"""``FusedSequential``: an ``nn.Sequential`` whose conv → bn → act runs (and the SE gates and channel
shuffles around them) execute fused."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import List, Tuple

from torch import nn

from .common import ChildrenSnapshot
from .conv_bn_act import pair_steps


class FusedSequential(nn.Sequential):
    """Same children, same names, same ``state_dict`` as the Sequential it
    replaces; only ``forward`` differs: each recognised run of children
    executes as one step sharing those children:

    * (conv, bn[, act]) → one :class:`FusedConvBNAct`;
    * (squeeze-excite, 1×1 conv run or converted container) → one
      :class:`~effops.nn.traced.FusedStep` that folds the SE gate into the conv's
      operand load (torchvision MobileNetV3 / EfficientNet ``block``, RegNetY
      ``BottleneckTransform``);
    * (fused conv, channel shuffle) → one :class:`~effops.nn.traced.ShuffleStep`:
      the conv writes its output shuffled;
    * (fused 1×1 expand conv, fused depthwise conv) → one
      :class:`~effops.nn.conv_bn_act.PointwiseDepthwise` (an inverted residual block's first two
      convs, banded on the native CPU backend).

    Used by :func:`effops.optimize` for Sequentials that mix fusable
    runs with other layers (e.g. the classic VoVNet stem built from an
    ``OrderedDict`` of ``stem_1/conv``, ``stem_1/norm``, ``stem_1/relu``, ...).

    Equivalent PyTorch: the original ``nn.Sequential``. The execution plan is
    built at construction; if a child is replaced afterwards, forward runs the
    children one by one (exactly ``nn.Sequential``, with a one-time warning) until
    the model is optimized again.
    """

    def __init__(self, seq: nn.Sequential, runs: List[Tuple[int, int, nn.Module]]):
        """``runs``: ``(start, length, step)``: ``step`` replaces children ``start .. start + length - 1``."""
        super().__init__(OrderedDict(seq._modules))
        children = list(self._modules.values())
        plan, i = [], 0
        for start, length, fused in sorted(runs, key=lambda r: r[0]):
            plan.extend(children[i:start])
            plan.append(fused)
            i = start + length
        plan.extend(children[i:])
        # A plain list attribute: the fused wrappers share their children with
        # this Sequential and must not appear twice in state_dict / modules().
        self._plan = plan
        self._steps = pair_steps(plan)  # what forward runs: the plan with expand → depthwise pairs joined
        self._runs = [(start, length) for start, length, _ in runs]
        # which child sits in each slot, compared when the structure epoch moved (under torch.compile:
        # two integer guards instead of one per child)
        self._snapshot = ChildrenSnapshot([self], deep=False)

    def forward(self, x):
        if self._snapshot.changed():
            if not getattr(self, "_warned", False):
                self._warned = True
                warnings.warn("effops.FusedSequential: a child was replaced after optimize(); running the children "
                              "unfused (call effops.optimize again to fuse them)", stacklevel=2)
            return nn.Sequential.forward(self, x)
        for step in self._steps:
            x = step(x)
        return x

    def extra_repr(self) -> str:
        names = list(self._modules)
        return "fused runs: " + ", ".join(f"{names[s]}..{names[s + n - 1]}" for s, n in self._runs)
