"""Fusion inside hand-written ``forward`` methods (ResNet blocks, RegNet, EfficientNet, ...).

:func:`effops.optimize` traces such a module's *own* forward with ``torch.fx``
(every child is an opaque call), rewrites each conv → BN [→ act] [+ residual]
chain into one :class:`FusedStep`, and installs the rewritten graph as that
instance's ``forward`` (a :class:`TracedForward`). The module keeps its class,
its children and its ``state_dict`` keys; nothing is registered twice.

* eval (``module.training`` False): the traced graph, with fused steps;
* train: the class's own ``forward``, so training is exactly PyTorch and
  anything the trace specialised on (``self.training`` branches, flags) can't leak.

Flags a forward reads from ``self`` (e.g. ``grad_checkpointing``) are read when
``optimize`` runs, with the module in eval mode; re-run ``optimize`` after changing
them. Forwards with optional or variadic arguments are never traced: torch.fx would
silently fix every branch that tests them (``if shortcut is None``).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ..activations import apply_activation
from .conv_bn_act import FusedConvBNAct, resolve_padding


class FusedStep(nn.Module):
    """One rewritten chain of a traced forward. Equivalent PyTorch::

        y = bn(conv(x))
        y = act(y)            if residual is None
        y = act(y + r)        if residual == "before_act"
        y = act(y) + r        if residual == "after_act"

    A residual that isn't the output's exact shape and dtype (a broadcasting or
    type-promoting add) runs unfused, as the original code did.
    """

    def __init__(self, fused: FusedConvBNAct, residual: Optional[str] = None):
        super().__init__()
        if residual not in (None, "before_act", "after_act"):
            raise ValueError(f"residual must be None, 'before_act' or 'after_act', got {residual!r}")
        self.fused = fused
        self.residual = residual

    def extra_repr(self) -> str:
        return f"residual={self.residual}"

    def forward(self, x: Tensor, r: Optional[Tensor] = None) -> Tensor:
        f = self.fused
        if r is None:
            if self.residual is not None:
                # The traced code adds a value that is None now: the trace assumed otherwise.
                # Never drop the add silently (the original code would have raised too).
                raise TypeError("effops FusedStep: the residual traced here is None at run time")
            return f(x)
        after = self.residual == "after_act"
        if self._exact_residual(x, r):
            return f(x, r, residual_after_act=after)
        if after:
            return f(x) + r
        conv, bn = f.conv, f.bn
        return apply_activation(bn(conv(x)) + r, *f.activation)

    def _exact_residual(self, x: Tensor, r: Tensor) -> bool:
        conv = self.fused.conv
        if not isinstance(r, Tensor) or r.dim() != 4 or x.dim() != 4:
            return False
        if r.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            return False
        k, s, d = conv.kernel_size, conv.stride, conv.dilation
        p = resolve_padding(conv)
        oh = (x.shape[2] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        ow = (x.shape[3] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        return tuple(r.shape) == (x.shape[0], conv.out_channels, oh, ow)


class FusedTailStep(nn.Module):
    """A container run up to its last step, whose last step (an activation-free conv → BN)
    takes the residual add and activation that follow the container in the traced code::

        for step in prefix: x = step(x)     # e.g. MobileNetV2's expand + depthwise convs
        return fused_step(x, r)             # projection conv → BN (+ r) (→ act)
    """

    def __init__(self, prefix, step: FusedStep):
        super().__init__()
        self.prefix = nn.ModuleList(prefix)
        self.step = step

    def forward(self, x: Tensor, r: Optional[Tensor] = None) -> Tensor:
        for m in self.prefix:
            x = m(x)
        return self.step(x, r)


class TracedForward:
    """The instance-level ``forward`` effops.optimize installs on a module with a
    hand-written forward: the fused ``graph_module`` in eval, the class's own
    forward in train. Not an ``nn.Module``, so nothing in it is registered on
    the owner (``state_dict`` and ``modules()`` are unchanged); it deep-copies and
    pickles with its owner."""

    def __init__(self, owner: nn.Module, graph_module: torch.fx.GraphModule):
        self.owner = owner
        self.graph_module = graph_module
        # The graph calls the owner's children as they were when it was traced: if one is
        # replaced later, the class's own forward runs instead (exact, unfused).
        self.children_at_trace = dict(owner._modules)
        self.warned = False

    def __call__(self, *args, **kwargs):
        owner = self.owner
        if owner.training:
            return type(owner).forward(owner, *args, **kwargs)
        if owner._modules != self.children_at_trace:  # dict equality: modules compare by identity
            if not self.warned:
                self.warned = True
                warnings.warn(f"effops: a child of {type(owner).__name__} was replaced after optimize(); its forward "
                              "runs unfused (call effops.optimize again to fuse it)", stacklevel=2)
            return type(owner).forward(owner, *args, **kwargs)
        return self.graph_module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"TracedForward({type(self.owner).__name__}, fused steps in eval)"


def traced_forward_of(module: nn.Module) -> Optional[TracedForward]:
    """The :class:`TracedForward` installed on ``module``, if any."""
    fwd = module.__dict__.get("forward")
    return fwd if isinstance(fwd, TracedForward) else None
