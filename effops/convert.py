"""``effops.optimize``: swap fused modules into an existing model, by structure.

The converter never looks at model or class names of whole networks; it
recognises *structures*:

* a container that is exactly conv → BatchNorm2d [→ activation] (an
  ``nn.Sequential`` of those children, torchvision ``Conv2dNormActivation``,
  timm ``ConvNormAct`` with ``BatchNormAct2d``) becomes a
  :class:`~effops.FusedConvBNAct` that keeps the container's child names, so
  the model's ``state_dict`` keys are unchanged;
* a One-Shot-Aggregation block (the classic VoVNet module: a ``layers``
  ModuleList of conv-BN-ReLU containers + a ``concat`` conv-BN-ReLU + an
  ``identity`` flag [+ ``ese``, ``conv_reduction``]; or timm's ``OsaBlock``)
  becomes a :class:`~effops.FusedOSA` with the block's own child names;
* an ``nn.Sequential`` holding such runs among other layers (e.g. built from
  an ``OrderedDict`` with names like ``stem_1/conv``), or a timm container
  known to apply its children in sequence (``SeparableConvNormAct``: dw conv →
  pw conv → BN-act), becomes a :class:`~effops.nn.FusedSequential` with the
  same children.

Convs inside modules with their own ``forward`` (``conv1``/``bn1`` attributes
used in hand-written code) cannot be matched without tracing and are reported
as skipped, with the reason.
"""
from __future__ import annotations

import copy
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

from .activations import activation_of
from .nn.conv_bn_act import FusedConvBNAct, _timm_bn_act, why_not_fusable
from .nn.osa import FusedOSA, is_osa_block
from .nn.sequential import FusedSequential


@dataclass
class ReportEntry:
    path: str
    what: str


@dataclass
class OptimizeReport:
    """What :func:`optimize` swapped and what it skipped (with the reason). Printable."""

    swapped: List[ReportEntry] = field(default_factory=list)
    skipped: List[ReportEntry] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"effops.optimize: {len(self.swapped)} swapped, {len(self.skipped)} skipped"]
        width = max([len(e.path) for e in self.swapped + self.skipped] + [4])
        lines += [f"  swapped  {e.path:<{width}}  {e.what}" for e in self.swapped]
        lines += [f"  skipped  {e.path:<{width}}  {e.what}" for e in self.skipped]
        return "\n".join(lines)


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


# timm containers whose forward applies these children in this order and nothing
# else (absent ones are None), checked against timm's source: they convert like an
# nn.Sequential of those children, keeping the child names.
_TIMM_SEQUENTIAL = {
    "ConvNormAct": ("conv", "bn", "aa"),
    "ConvBnAct": ("conv", "bn", "aa"),
    "SeparableConvNormAct": ("conv_dw", "conv_pw", "bn"),
}


def _sequential_children(m: nn.Module) -> Optional[List[Tuple[str, nn.Module]]]:
    """``m``'s children in execution order when its forward is known to apply them
    one after another; ``None`` for anything else."""
    if _is_plain_sequential(m):
        return list(m.named_children())
    t = type(m)
    order = _TIMM_SEQUENTIAL.get(t.__name__) if t.__module__.startswith("timm.") else None
    if order is None:
        return None
    children = [(n, getattr(m, n, None)) for n in order]
    children = [(n, c) for n, c in children if c is not None]
    if {n for n, _ in children} != {n for n, _ in m.named_children()}:
        return None  # a child we don't know the place of
    return children


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d)


def _describe(conv: nn.Conv2d, bn, act_name: str) -> str:
    k = "x".join(map(str, conv.kernel_size))
    s = f" s{conv.stride[0]}" if conv.stride != (1, 1) else ""
    g = f" g{conv.groups}" if conv.groups != 1 else ""
    return f"conv{k}{s}{g} {conv.in_channels}→{conv.out_channels}" + (" + bn" if bn is not None else "") + f" + {act_name}"


class _Converter:
    def __init__(self, model: nn.Module):
        self.report = OptimizeReport()
        self.uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.fused_convs: set = set()
        self.skip_reason: Dict[int, str] = {}

    # -- matching ------------------------------------------------------------
    def _shared(self, conv, bn) -> Optional[str]:
        for m in (conv, bn):
            if m is not None and self.uses[id(m)] > 1:
                return (f"{type(m).__name__} is shared (registered {self.uses[id(m)]} times); "
                        "folding would change its other use")
        return None

    def _runs(self, children: List[Tuple[str, nn.Module]]):
        """Yield (start, length, conv, bn, act, child_names) for each fusable run of
        children; child_names are the (conv, bn, act) names, None where absent."""
        i, n = 0, len(children)
        while i < n:
            conv = children[i][1]
            if not isinstance(conv, nn.Conv2d):
                i += 1
                continue
            j, bn, act = i + 1, None, None
            if j < n and _is_bn(children[j][1]):
                bn, j = children[j][1], j + 1
            if j < n and not (bn is not None and _timm_bn_act(bn)) and activation_of(children[j][1]) is not None \
                    and type(children[j][1]) is not nn.Identity:
                act, j = children[j][1], j + 1
            if bn is None and act is None:
                nxt = f"followed by {type(children[j][1]).__name__}" if j < n else "last in its container"
                self.skip_reason.setdefault(id(conv), f"{nxt}, not BatchNorm2d or a supported activation: nothing to fuse")
                i += 1
                continue
            why = why_not_fusable(conv, bn, act)
            why = self._shared(conv, bn) or why
            if why is not None:
                self.skip_reason[id(conv)] = why
                i = j
                continue
            names = [children[k][0] for k in range(i, j)]
            yield i, j - i, conv, bn, act, (names[0], names[1] if bn is not None else None,
                                             names[-1] if act is not None else None)
            i = j

    def _record(self, path: str, conv, bn, act) -> None:
        self.fused_convs.add(id(conv))
        act_src = bn.act if bn is not None and _timm_bn_act(bn) else act
        self.report.swapped.append(ReportEntry(path, _describe(conv, bn, activation_of(act_src)[0])))

    # -- walking -------------------------------------------------------------
    def _convert_osa(self, module: nn.Module, path: str) -> Optional[nn.Module]:
        try:
            fused = FusedOSA.from_module(module)
        except ValueError as e:
            self.report.skipped.append(ReportEntry(path, f"OSA block not fused: {e}"))
            return None
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and self.uses[id(m)] > 1:
                self.report.skipped.append(ReportEntry(
                    path, f"OSA block not fused: its {type(m).__name__} is shared (registered {self.uses[id(m)]} "
                          "times); folding would change its other use"))
                return None
        self.fused_convs.update(id(m) for m in module.modules() if isinstance(m, nn.Conv2d))
        extras = [w for w, on in (("eSE", fused.has_ese), ("identity", fused.identity),
                                  ("depthwise", fused.depthwise)) if on]
        self.report.swapped.append(ReportEntry(
            path, f"OSA {fused.in_ch}→{fused.layer_per_block}×{fused.stage_ch}→{fused.concat_ch}"
                  + (f" + {' + '.join(extras)}" if extras else "") + f" ({fused.activation[0]})"))
        return fused

    def convert(self, module: nn.Module, prefix: str = "") -> nn.Module:
        if isinstance(module, (FusedConvBNAct, FusedSequential, FusedOSA)):
            return module  # already optimized
        if is_osa_block(module):
            fused = self._convert_osa(module, prefix or "<model>")
            if fused is not None:
                return fused
        children = _sequential_children(module)
        # Runs hold only conv/BN/act modules, which the recursion below never
        # replaces (it swaps containers in place), so matching once is enough.
        runs = list(self._runs(children)) if children is not None else []
        if len(runs) == 1 and runs[0][0] == 0 and runs[0][1] == len(children):
            _, _, conv, bn, act, child_names = runs[0]  # the whole container is one run
            self._record(prefix or "<model>", conv, bn, act)
            return FusedConvBNAct.from_modules(conv, bn, act, names=child_names)
        for name, child in list(module.named_children()):
            new = self.convert(child, f"{prefix}.{name}" if prefix else name)
            if new is not child:
                setattr(module, name, new)
        if not runs:
            return module
        fused_runs = []
        for start, length, conv, bn, act, child_names in runs:
            fused_runs.append((start, length, FusedConvBNAct.from_modules(conv, bn, act, names=child_names)))
            last = children[start + length - 1][0]
            self._record((f"{prefix}." if prefix else "") + f"{child_names[0]}..{last}", conv, bn, act)
        if isinstance(module, nn.Sequential):
            seq = module
        else:  # a timm container: the same children (re-read: containers among them may have been swapped)
            seq = nn.Sequential(OrderedDict(_sequential_children(module)))
        return FusedSequential(seq, fused_runs)

    def report_leftovers(self, model: nn.Module) -> None:
        parents = {id(c): m for m in model.modules() for c in m.children()}
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and id(m) not in self.fused_convs:
                why = self.skip_reason.get(id(m))
                if why is None:
                    parent = parents.get(id(m))
                    why = (f"inside {type(parent).__name__}, which has its own forward: the conv → bn → act order "
                           "can't be seen without tracing") if parent is not None else "a bare conv"
                self.report.skipped.append(ReportEntry(name or "<model>", why))


def optimize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Swap effops' fused modules into ``model``; return the optimized model.

    With ``inplace=False`` (default) the original is deep-copied first and left
    untouched. Weights are shared with (or copied from) the original modules,
    never re-initialised, and the ``state_dict`` keys stay the same. The
    returned model carries ``effops_report`` (an :class:`OptimizeReport`)::

        fast = effops.optimize(model.eval())
        print(fast.effops_report)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    conv = _Converter(model)
    out = conv.convert(model)
    conv.report_leftovers(out)
    out.effops_report = conv.report
    return out
