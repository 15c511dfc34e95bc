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

* an ``nn.ChannelShuffle`` becomes a :class:`~effops.ChannelShuffle` (same groups, no state).

* inside a module with a hand-written ``forward`` (ResNet's ``conv1``/``bn1``/``relu``
  with ``out += identity``, timm's blocks), the module's own forward is traced with
  ``torch.fx`` (children stay opaque calls) and each conv → BN [→ act] chain,
  with a residual add before or after the activation, becomes one fused step; the
  rewritten graph is installed as that instance's eval-mode forward
  (:mod:`effops.nn.traced`), the class and children stay as they were.

What can't be matched (untraceable forwards, a conv whose output is used twice,
unsupported activations) is reported as skipped, with the reason.
"""
from __future__ import annotations

import copy
import inspect
import operator
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .activations import activation_of, make_activation
from .nn.common import BLOCK_RULES, is_plain_sequential, looks_like_batch_norm, sequential_children, timm_bn_act
from .nn.conv_bn_act import FusedConvBNAct, why_not_fusable
from .nn.osa import FusedOSA, is_osa_block
from .nn.sequential import FusedSequential
from .nn.shuffle import ChannelShuffle
from .nn.traced import FusedStep, FusedTailStep, TracedForward


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


def _describe(conv: nn.Conv2d, bn, act_name: str) -> str:
    k = "x".join(map(str, conv.kernel_size))
    s = f" s{conv.stride[0]}" if conv.stride != (1, 1) else ""
    g = f" g{conv.groups}" if conv.groups != 1 else ""
    return f"conv{k}{s}{g} {conv.in_channels}→{conv.out_channels}" + (" + bn" if bn is not None else "") + f" + {act_name}"


# -- tracing hand-written forwards ----------------------------------------------
class _ChildrenAsLeaves(torch.fx.Tracer):
    """Trace only the module's own forward: every submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


# Functional activations a traced forward may call on the BN output (args: the tensor only).
_FUNCTION_ACTS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6",
    F.silu: "silu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid", F.gelu: "gelu",
}
_METHOD_ACTS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
_ADDS = (operator.add, operator.iadd, torch.add)


def _untraceable_signature(module: nn.Module) -> Optional[str]:
    """Why ``module.forward``'s signature makes a trace unsafe, or None.

    torch.fx evaluates Python control flow on arguments against Proxies without
    complaint: ``if shortcut is None: shortcut = x`` silently takes the "not None"
    branch, and the graph is then wrong for every call that passes None (timm's DLA
    blocks do exactly this). So only forwards whose parameters are all required
    (no defaults, no ``*args`` / ``**kwargs``) are traced."""
    try:
        sig = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return "has no inspectable signature"
    for i, p in enumerate(sig.parameters.values()):
        if i == 0:
            continue  # self
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return f"takes *{p.name}: tracing would fix its Python branches"
        if p.default is not p.empty:
            return f"has the optional argument {p.name!r}: tracing would fix the branches that test it"
    return None


def _submodule(owner: nn.Module, target: str) -> Optional[nn.Module]:
    """``owner.get_submodule(target)``, or None for nodes this pass inserted (fused steps)."""
    try:
        return owner.get_submodule(target)
    except AttributeError:
        return None


def _node_act(node: Optional[torch.fx.Node], owner: nn.Module,
              prev: torch.fx.Node) -> Optional[Tuple[str, float, Optional[nn.Module]]]:
    """``(name, param, module_or_None)`` if ``node`` applies a supported activation to ``prev`` alone."""
    if node is None or node.args[:1] != (prev,) or len(node.args) != 1:
        return None
    extra = set(node.kwargs) - {"inplace"}
    if node.op == "call_module":
        m = _submodule(owner, node.target)
        if m is None:
            return None
        a = activation_of(m)
        if a is None or type(m) is nn.Identity or node.kwargs:
            return None
        return a[0], a[1], m
    if node.op == "call_function" and node.target in _FUNCTION_ACTS:
        if node.target is F.gelu:
            approx = node.kwargs.get("approximate", "none")
            extra -= {"approximate"}
            if extra or approx not in ("none", "tanh"):
                return None
            return ("gelu" if approx == "none" else "gelu_tanh"), 0.0, None
        return (None if extra else (_FUNCTION_ACTS[node.target], 0.0, None))
    if node.op == "call_method" and node.target in _METHOD_ACTS and not node.kwargs:
        return _METHOD_ACTS[node.target], 0.0, None
    return None


def _only_user(node: torch.fx.Node, owner: nn.Module, chain: List[torch.fx.Node]) -> Optional[torch.fx.Node]:
    """The single user of ``node``, looking through ``nn.Identity`` calls (appended to ``chain``)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module" and type(_submodule(owner, user.target)) is nn.Identity \
                and user.args == (node,) and not user.kwargs:
            chain.append(user)
            node = user
            continue
        return user
    return None


def _tail_of(m: Optional[nn.Module]):
    """``(prefix steps, tail)`` when ``m``'s output is the output of an activation-free
    ``FusedConvBNAct`` with a BN (its last step): a converted container whose last conv
    can still absorb a residual add and an activation that follow ``m``. Else None."""
    if isinstance(m, FusedConvBNAct):
        steps = [m]
    elif isinstance(m, FusedSequential):
        steps = list(m._plan)
    elif m is not None and is_plain_sequential(m):
        steps = list(m.children())
    else:
        return None
    tail = steps[-1] if steps else None
    if isinstance(tail, FusedConvBNAct) and tail.activation[0] == "identity" and tail.bn is not None:
        return steps[:-1], tail
    return None


def _residual_of(node: Optional[torch.fx.Node], prev: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The other operand if ``node`` is ``prev + r`` (r a traced value), else None."""
    if node is None or node.op != "call_function" or node.target not in _ADDS or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    other = b if a is prev else (a if b is prev else None)
    return other if isinstance(other, torch.fx.Node) and other is not prev else None


class _Converter:
    def __init__(self, model: nn.Module):
        self.report = OptimizeReport()
        self.uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.fused_convs: set = set()
        self.skip_reason: Dict[int, str] = {}
        self.entry_of_conv: Dict[int, ReportEntry] = {}

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
            if j < n and looks_like_batch_norm(children[j][1]):
                bn, j = children[j][1], j + 1
            if j < n and not (bn is not None and timm_bn_act(bn)) and activation_of(children[j][1]) is not None \
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
        act_src = bn.act if bn is not None and timm_bn_act(bn) else act
        entry = ReportEntry(path, _describe(conv, bn, activation_of(act_src)[0]))
        self.report.swapped.append(entry)
        self.entry_of_conv[id(conv)] = entry

    # -- hand-written forwards ---------------------------------------------------
    def _match_traced(self, head, owner):
        """``(chain nodes, x, residual node, residual mode, conv, bn, act module, container tail)`` for a chain starting at
        ``head``, or a skip reason string. ``head`` calls an ``nn.Conv2d`` (then a BatchNorm2d must follow)
        or a ``FusedConvBNAct`` without activation that an earlier rule swapped in (then it is extended
        with the residual add and activation that follow it, e.g. ``act3(conv3(x) + shortcut)``)."""
        if len(head.args) != 1 or head.kwargs:
            return "called with extra arguments"
        chain = [head]
        m = owner.get_submodule(head.target)
        tail = _tail_of(m)
        if tail is not None:
            conv, bn = tail[1].conv, tail[1].bn
            last = head
        else:
            conv = m
            bn_node = _only_user(head, owner, chain)
            if bn_node is None:
                return "its output is used more than once"
            bn = _submodule(owner, bn_node.target) if bn_node.op == "call_module" else None
            if not (looks_like_batch_norm(bn) and bn_node.args == (chain[-1],) and not bn_node.kwargs):
                return "not followed by a BatchNorm2d: nothing to fuse"
            chain.append(bn_node)
            last = bn_node
        act, mode, res = None, None, None
        nxt = _only_user(last, owner, chain)
        if bn is not None and timm_bn_act(bn) and type(bn.act) is not nn.Identity:
            # The activation is inside the BN module: an add right after it is "after act".
            res = _residual_of(nxt, chain[-1])
            if res is not None:
                chain.append(nxt)
                mode = "after_act"
        elif (act := _node_act(nxt, owner, chain[-1])) is not None:
            chain.append(nxt)
            after = _only_user(nxt, owner, chain)
            res = _residual_of(after, chain[-1])
            if res is not None:
                chain.append(after)
                mode = "after_act"
        elif (res := _residual_of(nxt, chain[-1])) is not None:
            chain.append(nxt)
            mode = "before_act"
            after = _only_user(nxt, owner, chain)
            act = _node_act(after, owner, chain[-1])
            if act is not None:
                chain.append(after)
        if tail is not None and mode is None and act is None:
            return None  # nothing to add to a module that is already fused
        act_mod = None
        if act is not None:
            act_mod = act[2] if act[2] is not None else make_activation(act[0], act[1])
        why = why_not_fusable(conv, bn, act_mod) or self._shared(conv, bn)
        if why is not None:
            return why
        return chain, head.args[0], res, mode, conv, bn, act_mod, tail

    def _trace(self, module: nn.Module, prefix: str) -> None:
        """Fuse conv → BN chains inside ``module``'s hand-written forward (see effops.nn.traced)."""
        if "forward" in module.__dict__:  # an instance-level forward (ours or the user's): leave it alone
            fwd = module.__dict__["forward"]
            if isinstance(fwd, TracedForward):  # optimized before: its fused convs are not "skipped"
                self.fused_convs.update(id(m.fused.conv) for m in fwd.graph_module.modules() if isinstance(m, FusedStep))
            return
        direct = [c for c in module.children() if type(c) is nn.Conv2d and id(c) not in self.fused_convs]
        extendable = [c for c in module.children() if _tail_of(c) is not None]
        if not direct and not extendable:
            return
        why = _untraceable_signature(module)
        if why is not None:
            for c in direct:
                self.skip_reason.setdefault(id(c), f"inside {type(module).__name__}, whose forward {why}")
            return
        # The graph only ever runs in eval, so trace in eval: a forward that reads self.training
        # (F.dropout(x, p, self.training), drop-path) must not bake in the caller's train mode.
        flags = [(m, m.training) for m in module.modules()]
        try:
            module.eval()
            graph = _ChildrenAsLeaves().trace(module)
        except Exception as e:  # noqa: BLE001 - any tracing failure means "leave this forward alone"
            why = f"inside {type(module).__name__}, whose forward torch.fx can't trace ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
            for c in direct:
                self.skip_reason.setdefault(id(c), why)
            return
        finally:
            for m, was_training in flags:
                m.training = was_training
        steps = {}
        for node in list(graph.nodes):
            if node.op != "call_module":
                continue
            try:
                m = module.get_submodule(node.target)
            except AttributeError:
                continue
            extendable = _tail_of(m) is not None
            if not extendable and (type(m) is not nn.Conv2d or id(m) in self.fused_convs):
                continue
            match = self._match_traced(node, module)
            if match is None:
                continue
            if isinstance(match, str):
                if not extendable:
                    self.skip_reason.setdefault(id(m), f"in {type(module).__name__}.forward: {match}")
                continue
            chain, x, res, mode, conv, bn, act_mod, tail = match
            fused = FusedConvBNAct.from_modules(conv, bn, act_mod, names=("conv", "bn", None))
            name = f"_effops_step{len(steps)}"
            steps[name] = FusedStep(fused, mode)
            if tail is not None and tail[0]:
                steps[name] = FusedTailStep(tail[0], steps[name])
            with graph.inserting_before(chain[-1]):
                new = graph.call_module(name, (x,) if res is None else (x, res))
            chain[-1].replace_all_uses_with(new)
            for n in reversed(chain):
                graph.erase_node(n)
            self.fused_convs.add(id(conv))
            where = f"{prefix}." if prefix else ""
            # Trailing nn.Identity calls are absorbed; the label names the last real op.
            last = next(n for n in reversed(chain)
                        if not (n.op == "call_module" and type(_submodule(module, n.target)) is nn.Identity))
            if tail is not None:  # extended: this entry replaces the one recorded for that conv before
                old = self.entry_of_conv.get(id(conv))
                self.report.swapped = [e for e in self.report.swapped if e is not old]
            what = _describe(conv, bn, fused.activation[0]) + (f" + residual ({mode.replace('_', ' ')})" if mode else "")
            entry = ReportEntry(f"{where}{chain[0].target}..{last.name}", what + " [traced]")
            self.report.swapped.append(entry)
            self.entry_of_conv[id(conv)] = entry
        if not steps:
            return
        graph.lint()
        targets = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")} - set(steps)
        root = {t: _resolve(module, t) for t in targets}
        root.update(steps)
        gm = torch.fx.GraphModule(root, graph, class_name=f"{type(module).__name__}_effops")
        module.forward = TracedForward(module, gm)

    # -- walking -------------------------------------------------------------
    def _convert_osa(self, module: nn.Module, path: str) -> Optional[nn.Module]:
        try:
            fused = FusedOSA.from_module(module)
        except ValueError as e:
            self.report.skipped.append(ReportEntry(path, f"OSA block not fused: {e}"))
            return None
        for m in module.modules():
            if (isinstance(m, nn.Conv2d) or looks_like_batch_norm(m)) and self.uses[id(m)] > 1:
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

    def _convert_block(self, rule, module: nn.Module, path: str) -> Optional[nn.Module]:
        """A whole block by a registered :class:`~effops.nn.common.BlockRule`, or None (reported
        as skipped; the converter then looks inside the block as usual)."""
        for m in module.modules():
            if (isinstance(m, nn.Conv2d) or looks_like_batch_norm(m)) and self.uses[id(m)] > 1:
                self.report.skipped.append(ReportEntry(
                    path, f"{rule.name} not fused: its {type(m).__name__} is shared (registered "
                          f"{self.uses[id(m)]} times); folding would change its other use"))
                return None
        try:
            fused = rule.build(module)
        except ValueError as e:
            self.report.skipped.append(ReportEntry(path, f"{rule.name} not fused: {e}"))
            return None
        self.fused_convs.update(id(m) for m in module.modules() if isinstance(m, nn.Conv2d))
        self.report.swapped.append(ReportEntry(path, rule.describe(fused)))
        return fused

    def convert(self, module: nn.Module, prefix: str = "") -> nn.Module:
        if isinstance(module, (FusedConvBNAct, FusedSequential, FusedOSA)):
            return module  # already optimized
        if type(module) is nn.ChannelShuffle:  # a leaf: the same permutation by effops' kernel
            self.report.swapped.append(ReportEntry(prefix or "<model>", f"channel shuffle g={module.groups}"))
            return ChannelShuffle(module.groups)
        for rule in BLOCK_RULES:
            if isinstance(module, rule.fused_type):
                return module  # already optimized
        for rule in BLOCK_RULES:
            if rule.matches(module):
                fused = self._convert_block(rule, module, prefix or "<model>")
                if fused is not None:
                    return fused
                break
        if is_osa_block(module):
            fused = self._convert_osa(module, prefix or "<model>")
            if fused is not None:
                return fused
        children = sequential_children(module)
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
        if children is None and type(module).forward is not nn.Module.forward:
            self._trace(module, prefix)
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
            seq = nn.Sequential(OrderedDict(sequential_children(module)))
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


def _resolve(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
