"""``effops.optimize``: swap fused modules into an existing model, by structure.

The converter never looks at model or class names of whole networks; it
recognises *structures*. Every rule below rewrites the eval-mode forward only: in
``train()`` the original modules and forwards run (batch statistics, autograd), and
every fused step computes exactly what the code it replaces computed, falling back
to that code on every call where the fused path can't (a hook watching a module, a
gradient needed where a kernel has none, a BN in training mode, autocast, a child
replaced since ``optimize``). Containers:

* a container that is exactly conv → BatchNorm2d [→ activation], or conv (+ bias)
  → activation (VGG, SSD's dilated conv6 and extra layers) (an ``nn.Sequential`` of
  those children, torchvision ``Conv2dNormActivation``, timm ``ConvNormAct`` with
  ``BatchNormAct2d``) becomes a :class:`~effops.FusedConvBNAct` that keeps the
  container's child names, so the model's ``state_dict`` keys are unchanged;
* a One-Shot-Aggregation block (the classic VoVNet module: a ``layers``
  ModuleList of conv-BN-ReLU containers + a ``concat`` conv-BN-ReLU + an
  ``identity`` flag [+ ``ese``, ``conv_reduction``]; or timm's ``OsaBlock``)
  becomes a :class:`~effops.FusedOSA` with the block's own child names;
* whole blocks matched by a registered :class:`~effops.nn.common.BlockRule` (tried
  first, before looking inside a module): squeeze-excite modules (timm, torchvision,
  CenterMask) become :class:`~effops.nn.se.SqueezeExcite`, and the rules of the other
  effops modules (ShuffleNetV2 units, ghost modules, RepVGG blocks);
* an ``nn.Sequential`` holding such runs among other layers (e.g. built from
  an ``OrderedDict`` with names like ``stem_1/conv``), or a timm container
  known to apply its children in sequence (``SeparableConvNormAct``: dw conv →
  pw conv → BN-act), becomes a :class:`~effops.nn.FusedSequential` with the
  same children. In a plain ``nn.Sequential`` two more kinds of step join runs:
  a squeeze-excite child directly before a 1×1 conv (the gate is folded into the
  conv's operand load: torchvision MobileNetV3 / EfficientNet ``block``, RegNetY
  ``BottleneckTransform``), and a channel shuffle directly after a fused conv (the
  conv writes its output shuffled);
* an ``nn.ChannelShuffle`` becomes a :class:`~effops.ChannelShuffle` (same groups, no state).

Inside a module with a hand-written ``forward`` (ResNet's ``conv1``/``bn1``/``relu``
with ``out += identity``, timm's blocks, YOLO's ELAN), the module's own forward is
traced with ``torch.fx`` (children stay opaque calls), rewritten, and installed as
that instance's eval-mode forward (:mod:`effops.nn.traced`); the class and children
stay as they were. The rewrites, in the order they are applied:

1. ``act(se(x) [→ drop-path] + shortcut)`` (timm ResNet bottlenecks with SE:
   SE-ResNet, ResNet-RS) → one :class:`~effops.nn.traced.SEResidualStep`:
   ``se.forward_residual(x, shortcut, act)``, gate, add and activation in one pass;
2. conv → BN [→ act] [+ residual, before or after the act], or conv (+ bias) →
   act / residual without a BN → one :class:`~effops.nn.traced.FusedStep`. A chain
   may start at a converted container: one ending in an activation-free conv → BN
   takes the residual add and activation after it (timm RegNet's
   ``act3(conv3(x) + shortcut)``, MobileNetV2's ``x + self.conv(x)``), one ending in a
   bare conv takes the BN and activation after it (ResNet-RS's deep stem). A
   squeeze-excite call feeding a 1×1 conv (``conv_pwl(se(x))`` in timm's EfficientNet /
   MobileNetV3 blocks, ``conv3(se(x))`` in timm's RegNetY) joins the step: only the
   gate ``se.gate_of(x)`` is computed, and the conv applies it as it loads ``x``;
3. ``torch.cat(segments, dim=1)`` (a list or tuple of up to 16 tensors, or a list
   passed in, as DLA's roots get) whose only user is a fused 1×1 stride-1 conv → BN
   [→ act] [+ residual] → one :class:`~effops.nn.traced.AggregateStep`: the
   N-segment aggregation (:func:`effops.ops.aggregate`) reads each segment where it
   lies, so the concatenated tensor never exists (CSPNet / CS3Darknet cross stages,
   DLA roots, YOLOv7 ELAN, torchvision's ASPP);
4. a fused conv whose output only feeds a channel shuffle (an ``nn.ChannelShuffle``,
   ``F.channel_shuffle``, or the ``view → transpose → reshape`` sequence with the
   conv's own sizes, as torchvision's ``channel_shuffle`` function traces) → one
   :class:`~effops.nn.traced.ShuffleStep`: the conv stores every channel at its
   shuffled position, no shuffle pass;
5. ``torch.cat`` of fused convs used only there (YOLOv7's MP transition) → one
   :class:`~effops.nn.traced.ConcatStep`: each conv writes its channel range of one
   buffer, no concat copy;
6. a fused conv step (no residual, no gate) whose only user is an SE-residual step
   (the SE bottleneck's conv3 + bn3 → SE → + shortcut → act) → one
   :class:`~effops.nn.traced.SEEpilogueStep`: the conv's epilogue writes the
   per-image channel sums the SE excitation reads, so no pool pass reads the conv's
   output;
7. a squeeze-excite call whose only user is a converted ghost module (timm's
   GhostBottleneck: ``ghost2(se(x))``) → one :class:`~effops.nn.traced.GhostGateStep`:
   only the gate is computed, and the ghost module's primary conv applies it as it
   loads ``x`` (a V2/V3 ghost module, whose gate branch also reads ``x``, is left as is).

The report (``model.effops_report``) lists, per block, what was fused into what
(one entry per conv, updated when a later rule extends its step) and what was
skipped, with the reason: untraceable forwards, a conv whose output is used twice,
unsupported activations, a concat before a conv the aggregation can't compute.
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

from . import native
from .activations import activation_of, make_activation
from .nn.common import (BLOCK_RULES, is_plain_sequential, looks_like_batch_norm, revalidate_snapshots,
                        sequential_children, timm_bn_act)
from .nn.conv_bn_act import DepthwisePointwise, FusedConvBNAct, PointwiseDepthwise, resolve_padding, why_not_fusable
from .nn.ghost import FusedGhostModule
from .nn.osa import FusedOSA, FusedOSAStages, describe_osa_stages, is_osa_block, is_osa_stages
from .nn.se import SqueezeExcite
from .nn.sequential import FusedSequential
from .nn.linear import MAX_NATIVE_ROWS, Linear, plain_linear
from .nn.pool import MaxPool2d
from .nn.shuffle import ChannelShuffle
from .nn.traced import (AggregateStep, ConcatStep, DwPairStep, FusedStep, FusedTailStep, GhostGateStep, PairStep,
                        SEEpilogueStep, SEResidualStep, ShuffleStep, TracedForward, traced_forward_of)
from .ops.osa import MAX_SEGMENTS
from .speedcheck import Measurement


@dataclass
class ReportEntry:
    path: str
    what: str


@dataclass
class OptimizeReport:
    """What :func:`optimize` swapped and what it skipped (with the reason). Printable."""

    swapped: List[ReportEntry] = field(default_factory=list)
    skipped: List[ReportEntry] = field(default_factory=list)
    #: The speed check (effops.speedcheck): every converted block timed against its original.
    measured: List[Measurement] = field(default_factory=list)
    #: Whether the speed check ran, is pending (first eval-mode call), or why not.
    speed_check: str = "off"

    def keep_original(self, path: str, why: str) -> None:
        """The block at ``path`` (``""``: the whole model) stays as it was: its swaps are withdrawn."""
        inside = (lambda p: True) if not path else (lambda p: p == path or p.startswith(path + "."))
        self.swapped = [e for e in self.swapped if not inside(e.path)]
        self.skipped.append(ReportEntry(path or "<model>", f"kept the original: {why}"))

    def __str__(self) -> str:
        lines = [f"effops.optimize: {len(self.swapped)} swapped, {len(self.skipped)} skipped; speed check: "
                 f"{self.speed_check}"]
        width = max([len(e.path) for e in self.swapped + self.skipped + self.measured] + [4])
        lines += [f"  swapped  {e.path:<{width}}  {e.what}" for e in self.swapped]
        lines += [f"  skipped  {e.path:<{width}}  {e.what}" for e in self.skipped]
        lines += [f"  timed    {m.path:<{width}}  {m}" for m in self.measured]
        return "\n".join(lines)


def _describe(conv: nn.Conv2d, bn, act_name: str) -> str:
    k = "x".join(map(str, conv.kernel_size))
    s = f" s{conv.stride[0]}" if conv.stride != (1, 1) else ""
    g = f" g{conv.groups}" if conv.groups != 1 else ""
    d = f" d{conv.dilation[0]}" if tuple(conv.dilation) != (1, 1) else ""
    return f"conv{k}{s}{d}{g} {conv.in_channels}→{conv.out_channels}" + (" + bn" if bn is not None else "") + f" + {act_name}"


def _describe_step(conv: nn.Conv2d, bn, act_name: str, mode: Optional[str], se) -> str:
    what = _describe(conv, bn, act_name) + (f" + residual ({mode.replace('_', ' ')})" if mode else "")
    return f"SE gate → {what} (gate applied in the conv's operand load)" if se is not None else what


def _gateable(conv: nn.Module) -> bool:
    """A conv a squeeze-excite gate can be folded into: 1×1, dense (the gate scales its input channels)."""
    return type(conv) is nn.Conv2d and tuple(conv.kernel_size) == (1, 1) and conv.groups == 1


def _pointwise(conv: nn.Conv2d) -> bool:
    """A conv the N-segment aggregation computes: 1×1, stride 1, no padding, dense."""
    return _gateable(conv) and tuple(conv.stride) == (1, 1) and resolve_padding(conv) == (0, 0)


def _conv_of(m: Optional[nn.Module]) -> Optional[FusedConvBNAct]:
    """The fused conv that ``m`` computes on its one input in eval: ``m`` itself (a swapped
    container), or a module whose installed traced forward is exactly one fused conv step
    from its input to its output (e.g. YOLO's ``Conv``: ``act(bn(conv(x)))``). Else None."""
    if isinstance(m, FusedConvBNAct):
        return m
    fwd = traced_forward_of(m) if m is not None else None
    if fwd is None:
        return None
    nodes = list(fwd.graph_module.graph.nodes)
    if [n.op for n in nodes] != ["placeholder", "call_module", "output"] or nodes[1].args != (nodes[0],) \
            or nodes[1].kwargs or nodes[2].args != (nodes[1],):
        return None
    step = fwd.graph_module.get_submodule(nodes[1].target)
    if type(step) is FusedStep and step.residual is None and step.se is None:
        return step.fused
    return None


def _conv_head(m: Optional[nn.Module]):
    """``(fused conv, the steps after it)`` when ``m``'s eval forward starts with a fused conv on its one
    input: :func:`_conv_of`, or a ``FusedSequential`` whose first step is one (torchvision's ASPP
    ``project``: conv → BN → ReLU → Dropout). Else None."""
    fused = _conv_of(m)
    if fused is not None:
        return fused, []
    if isinstance(m, FusedSequential) and m._plan and isinstance(m._plan[0], FusedConvBNAct):
        return m._plan[0], list(m._plan[1:])
    return None


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
_CATS = (torch.cat, torch.concat, torch.concatenate)
_SHUFFLE_FUNCTIONS = (F.channel_shuffle, torch.channel_shuffle, torch.native_channel_shuffle)


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
    """``(prefix steps, tail, se)`` when ``m``'s output is the output of an activation-free
    ``FusedConvBNAct`` with a BN (its last step, possibly gated by a squeeze-excite module
    ``se``, else None): a converted container whose last conv can still absorb a residual add
    and an activation that follow ``m``; or of a bare ``nn.Conv2d`` after other steps (``tail``
    is that conv), which can absorb a BN that follows ``m``. Else None."""
    if isinstance(m, FusedConvBNAct):
        steps = [m]
    elif isinstance(m, FusedSequential):
        steps = list(m._plan)
    elif m is not None and is_plain_sequential(m):
        steps = list(m.children())
    else:
        return None
    tail = steps[-1] if steps else None
    se = None
    if type(tail) is FusedStep and tail.residual is None and tail.se is not None:  # a gated run [SE, conv]
        tail, se = tail.fused, tail.se
    if isinstance(tail, FusedConvBNAct) and tail.activation[0] == "identity" and tail.bn is not None:
        return steps[:-1], tail, se
    if type(tail) is nn.Conv2d and len(steps) > 1:
        # An open tail: a container ending in a bare conv whose BN lives in the caller
        # (timm ResNet-RS's deep stem: conv1 = Sequential(..., conv), then bn1, act1 in ResNet.forward).
        return steps[:-1], tail, None
    return None


def _se_input(node: torch.fx.Node, owner: nn.Module) -> Optional[torch.fx.Node]:
    """The ``se(x)`` node feeding ``node`` (its only argument) when a ``SqueezeExcite`` is called on
    one traced value and ``node`` is its only user; else None."""
    x = node.args[0] if node.args else None
    if not isinstance(x, torch.fx.Node) or x.op != "call_module" or len(x.users) != 1 or x.kwargs \
            or len(x.args) != 1 or not isinstance(x.args[0], torch.fx.Node):
        return None
    return x if isinstance(_submodule(owner, x.target), SqueezeExcite) else None


def _channel_cat(node: torch.fx.Node):
    """The segments argument (a list of nodes, or one node holding a list) if ``node`` is
    ``torch.cat(segments, dim=1)``; else None."""
    if node.op != "call_function" or node.target not in _CATS or not node.args or set(node.kwargs) - {"dim"}:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    segs = node.args[0]
    if dim != 1 or isinstance(dim, bool) or len(node.args) > 2:
        return None
    if isinstance(segs, (list, tuple)) and segs and all(isinstance(t, torch.fx.Node) for t in segs):
        return list(segs)
    return segs if isinstance(segs, torch.fx.Node) else None


def _dim_of(node, p: torch.fx.Node) -> Optional[int]:
    """``i`` (0..3) when ``node`` is ``p``'s size along dim ``i``: ``p.size()[i]``, ``p.shape[i]``, ``p.size(i)``."""
    if not isinstance(node, torch.fx.Node):
        return None
    i = None
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and node.args[0] is p:
        i = node.args[1]
    elif node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2 \
            and _is_shape_query(node.args[0], p) and len(node.args[0].args) == (1 if node.args[0].op == "call_method" else 2):
        i = node.args[1]
    if isinstance(i, bool) or not isinstance(i, int) or not -4 <= i < 4:
        return None
    return i % 4


def _is_shape_query(node, p: torch.fx.Node) -> bool:
    """``p.size(...)`` or ``p.shape``: a use of ``p`` that reads only its shape."""
    return isinstance(node, torch.fx.Node) and not node.kwargs and node.args[:1] == (p,) and (
        (node.op == "call_method" and node.target == "size")
        or (node.op == "call_function" and node.target is getattr and node.args == (p, "shape")))


def _shape_arg(node: torch.fx.Node) -> Optional[list]:
    """The target shape of a ``view`` / ``reshape`` call (given as arguments or as one tuple)."""
    if node.kwargs:
        return None
    a = node.args[1:]
    return list(a[0]) if len(a) == 1 and isinstance(a[0], (tuple, list)) else list(a)


def _single_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _shuffle_of(p: torch.fx.Node, owner: nn.Module, c_out: int):
    """How ``p``'s output (``c_out`` channels) is channel-shuffled, if that is its only use:
    ``(nodes to remove in graph order, groups, shuffle module or None)``; else None. Recognised:
    an ``nn.ChannelShuffle`` module (effops' included), ``F.channel_shuffle`` / ``torch.channel_shuffle``,
    and ShuffleNet's ``view(n, g, c // g, h, w) → transpose(1, 2) [→ contiguous] → view(n, c, h, w)``
    (``reshape`` / ``permute(0, 2, 1, 3, 4)`` / ``flatten(1, 2)`` as well; the sizes must be ``p``'s own,
    read from ``p.size()`` / ``p.shape`` or equal constants), which torchvision's ``channel_shuffle``
    function traces into."""
    users = list(p.users)
    data = [u for u in users if not _is_shape_query(u, p)]
    if len(data) != 1:
        return None
    s = data[0]
    if len(users) == 1 and s.args[:1] == (p,):
        if s.op == "call_module" and isinstance(_submodule(owner, s.target), nn.ChannelShuffle) \
                and len(s.args) == 1 and not s.kwargs:
            m = _submodule(owner, s.target)
            return [s], m.groups, m
        if s.op == "call_function" and s.target in _SHUFFLE_FUNCTIONS:
            g = s.args[1] if len(s.args) == 2 and not s.kwargs else s.kwargs.get("groups") if len(s.args) == 1 else None
            if isinstance(g, int) and not isinstance(g, bool) and set(s.kwargs) <= {"groups"}:
                return [s], g, None
        return None
    # view → transpose → [contiguous] → view
    if s.op != "call_method" or s.target not in ("view", "reshape") or s.args[:1] != (p,):
        return None
    dims = _shape_arg(s)
    if dims is None or len(dims) != 5 or isinstance(dims[1], bool) or not isinstance(dims[1], int) or dims[1] < 1:
        return None
    g = dims[1]
    cpg = dims[2]
    ok_cpg = cpg == -1 or (isinstance(cpg, int) and not isinstance(cpg, bool) and cpg * g == c_out) or (
        isinstance(cpg, torch.fx.Node) and cpg.op == "call_function" and cpg.target is operator.floordiv
        and len(cpg.args) == 2 and cpg.args[1] == g and _dim_of(cpg.args[0], p) == 1)
    if not ok_cpg or not (dims[0] == -1 or _dim_of(dims[0], p) == 0) or _dim_of(dims[3], p) != 2 \
            or _dim_of(dims[4], p) != 3 or sum(d == -1 for d in dims if isinstance(d, int)) > 1:
        return None
    chain = [s]
    t = _single_user(s)
    if t is None or t.kwargs or t.args[:1] != (s,):
        return None
    swap = (t.op == "call_method" and t.target == "transpose") or (t.op == "call_function" and t.target is torch.transpose)
    if swap and tuple(t.args[1:]) not in ((1, 2), (2, 1)):
        return None
    if not swap:
        perm = _shape_arg(t) if t.op == "call_method" and t.target == "permute" else None
        if perm != [0, 2, 1, 3, 4]:
            return None
    chain.append(t)
    f = _single_user(t)
    if f is not None and f.op == "call_method" and f.target == "contiguous" and f.args == (t,) and not f.kwargs:
        chain.append(f)
        f = _single_user(f)
    if f is None or f.args[:1] != (chain[-1],) or f.kwargs:
        return None
    if f.op == "call_method" and f.target in ("view", "reshape"):
        out = _shape_arg(f)
        ok_c = out is not None and len(out) == 4 and (out[1] == -1 or _dim_of(out[1], p) == 1 or (
            isinstance(out[1], int) and not isinstance(out[1], bool) and out[1] == c_out))
        if not ok_c or not (out[0] == -1 or _dim_of(out[0], p) == 0) or _dim_of(out[2], p) != 2 \
                or _dim_of(out[3], p) != 3 or sum(d == -1 for d in out if isinstance(d, int)) > 1:
            return None
    elif not ((f.op == "call_method" and f.target == "flatten") or (f.op == "call_function" and f.target is torch.flatten)) \
            or tuple(f.args[1:]) != (1, 2):
        return None
    chain.append(f)
    return chain, g, None


# Modules that are the identity in eval (drop-path, stochastic depth) and may sit between an SE
# and its residual add; the fused step runs them as modules whenever one is in training mode.
def _eval_identity(m: Optional[nn.Module]) -> bool:
    t = type(m)
    return t is nn.Identity or (t.__name__ == "DropPath" and t.__module__.startswith("timm.")) or \
        (t.__name__ == "StochasticDepth" and t.__module__.startswith("torchvision."))


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
        self.se_entries: Dict[int, ReportEntry] = {}  # id(SEResidualStep) -> its report entry

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
        """``(chain nodes, x, residual node, residual mode, conv, bn, act module, container tail, se module,
        se node)`` for a chain starting at ``head``, or a skip reason string. ``head`` calls an ``nn.Conv2d``
        (then a BatchNorm2d, an activation or a residual add must follow) or a ``FusedConvBNAct`` without
        activation that an earlier rule swapped in (then it is extended with the residual add and activation
        that follow it, e.g. ``act3(conv3(x) + shortcut)``). A ``SqueezeExcite`` call feeding a 1×1 conv
        (``conv_pwl(se(x))``) joins the chain as its gate."""
        if len(head.args) != 1 or head.kwargs:
            return "called with extra arguments"
        chain = [head]
        m = owner.get_submodule(head.target)
        tail = _tail_of(m)
        se = None
        if tail is not None and isinstance(tail[1], FusedConvBNAct):
            conv, bn, se = tail[1].conv, tail[1].bn, tail[2]
            last = head
        else:
            conv = m if tail is None else tail[1]
            if id(conv) in self.fused_convs:
                return None
            bn_node = _only_user(head, owner, chain)
            if bn_node is None:
                return "its output is used more than once"
            bn = _submodule(owner, bn_node.target) if bn_node.op == "call_module" else None
            if looks_like_batch_norm(bn) and bn_node.args == (chain[-1],) and not bn_node.kwargs:
                chain.append(bn_node)
            else:
                bn = None  # conv (+ bias) → activation / residual add, no BN (VGG-style)
            last = chain[-1]
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
        if (tail is None or isinstance(tail[1], nn.Conv2d)) and bn is None and act is None and mode is None:
            return "not followed by a BatchNorm2d, an activation or a residual add: nothing to fuse"
        se_node = None
        if se is None and (tail is None or not tail[0]) and _gateable(conv):
            se_node = _se_input(head, owner)
        if tail is not None and mode is None and act is None and se_node is None:
            return None  # nothing to add to a module that is already fused
        act_mod = None
        if act is not None:
            act_mod = act[2] if act[2] is not None else make_activation(act[0], act[1])
        why = why_not_fusable(conv, bn, act_mod) or self._shared(conv, bn)
        if why is not None:
            return why
        return chain, head.args[0], res, mode, conv, bn, act_mod, tail, se, se_node

    def _replace_entry(self, conv: nn.Module, path: str, what: str) -> None:
        """Report ``conv`` as swapped by ``what``: the entry recorded for it before (one entry per conv)
        is replaced in place."""
        entry = ReportEntry(path, what)
        old = self.entry_of_conv.get(id(conv))
        idx = next((i for i, e in enumerate(self.report.swapped) if e is old), None)
        if idx is None:
            self.report.swapped.append(entry)
        else:
            self.report.swapped[idx] = entry
        self.entry_of_conv[id(conv)] = entry

    def _trace(self, module: nn.Module, prefix: str) -> None:
        """Fuse conv → BN chains inside ``module``'s hand-written forward (see effops.nn.traced)."""
        if "forward" in module.__dict__:  # an instance-level forward (ours or the user's): leave it alone
            fwd = module.__dict__["forward"]
            if isinstance(fwd, TracedForward):  # optimized before: its fused convs are not "skipped"
                self.fused_convs.update(_traced_convs(fwd))
            return
        direct = [c for c in module.children() if type(c) is nn.Conv2d and id(c) not in self.fused_convs]
        # Children a rewrite can extend or feed: converted containers, SE modules, fused convs.
        others = [c for c in module.children()
                  if _tail_of(c) is not None or _conv_head(c) is not None or isinstance(c, SqueezeExcite)]
        if not direct and not others:
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
        where = f"{prefix}." if prefix else ""
        steps: Dict[str, nn.Module] = {}
        labels: Dict[str, str] = {}  # step name -> the last op of its chain, for report paths
        calls = {n.name: n.target for n in graph.nodes if n.op == "call_module"}

        def insert(step: nn.Module, args: tuple, chain: List[torch.fx.Node]) -> str:
            name = f"_effops_step{len(steps)}"
            steps[name] = step
            with graph.inserting_before(chain[-1]):
                new = graph.call_module(name, args)
            chain[-1].replace_all_uses_with(new)
            for n in reversed(chain):
                graph.erase_node(n)
            return name

        # SE → add first: the add then no longer extends the shortcut's conv (a converted downsample).
        self._se_residuals(graph, module, where, insert)
        for node in list(graph.nodes):
            if node.op != "call_module":
                continue
            try:
                m = module.get_submodule(node.target)
            except AttributeError:
                continue
            extendable = _tail_of(m) is not None
            if isinstance(m, FusedGhostModule):
                self._gate_ghost(node, m, module, where, insert)
                continue
            if not extendable and isinstance(m, FusedConvBNAct):
                self._gate_child(node, m, module, where, insert, labels)
                continue
            if not extendable and (type(m) is not nn.Conv2d or id(m) in self.fused_convs):
                continue
            match = self._match_traced(node, module)
            if match is None:
                continue
            if isinstance(match, str):
                if not extendable:
                    self.skip_reason.setdefault(id(m), f"in {type(module).__name__}.forward: {match}")
                continue
            chain, x, res, mode, conv, bn, act_mod, tail, se, se_node = match
            if se_node is not None:
                se, x = _submodule(module, se_node.target), se_node.args[0]
                chain.insert(0, se_node)
            fused = FusedConvBNAct.from_modules(conv, bn, act_mod, names=("conv", "bn", None))
            step = FusedStep(fused, mode, se=se)
            if tail is not None and tail[0]:
                step = FusedTailStep(tail[0], step)
            # Trailing nn.Identity calls are absorbed; the label names the last real op.
            last = next(n for n in reversed(chain)
                        if not (n.op == "call_module" and type(_submodule(module, n.target)) is nn.Identity))
            path = f"{where}{chain[0].target}..{last.name}"
            labels[insert(step, (x,) if res is None else (x, res), chain)] = last.name
            self.fused_convs.add(id(conv))
            what = _describe_step(conv, bn, fused.activation[0], mode, se) + " [traced]"
            # An extended container: this entry replaces the one recorded for that conv before.
            self._replace_entry(conv, path, what)
        self._aggregations(graph, module, where, steps, labels)
        self._shuffled_writes(graph, module, where, steps)
        self._concat_writes(graph, module, where, steps)
        self._se_epilogues(graph, module, steps)
        self._pointwise_depthwise(graph, steps)
        self._depthwise_pointwise(graph, module, where, steps)
        if not steps:
            return
        graph.lint()
        targets = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
        # A step a later rule absorbed (a FusedStep inside an AggregateStep) is no longer called.
        root = {t: steps[t] if t in steps else _resolve(module, t) for t in targets}
        gm = torch.fx.GraphModule(root, graph, class_name=f"{type(module).__name__}_effops")
        alive = {n.name for n in graph.nodes}
        absorbed = {t for name, t in calls.items() if name not in alive}
        module.forward = TracedForward(module, gm, [module.get_submodule(t) for t in sorted(absorbed)])

    def _gate_child(self, node, m: FusedConvBNAct, owner, where, insert, labels) -> None:
        """``m(se(x))`` with ``m`` a converted container (a 1×1 conv with its own activation) → one
        gated step."""
        se_node = _se_input(node, owner)
        if se_node is None or len(node.args) != 1 or node.kwargs or not _gateable(m.conv):
            return
        se = _submodule(owner, se_node.target)
        labels[insert(FusedStep(m, None, se=se), (se_node.args[0],), [se_node, node])] = node.name
        self._replace_entry(m.conv, f"{where}{se_node.target}..{node.target}",
                            _describe_step(m.conv, m.bn, m.activation[0], None, se) + " [traced]")

    def _gate_ghost(self, node, m: FusedGhostModule, owner, where, insert) -> None:
        """``m(se(x))`` with ``m`` a converted ghost module (timm GhostBottleneck: SE → ghost2) whose
        primary conv takes an input gate → one :class:`GhostGateStep`."""
        se_node = _se_input(node, owner)
        if se_node is None or len(node.args) != 1 or node.kwargs or not m.takes_gate():
            return
        se = _submodule(owner, se_node.target)
        insert(GhostGateStep(se, m), (se_node.args[0],), [se_node, node])
        self.report.swapped.append(ReportEntry(
            f"{where}{se_node.target}..{node.target}",
            f"SE gate → ghost module {m.in_chs}→{m._plan.out_keep} (gate applied in its primary conv's operand "
            "load) [traced]"))

    def _se_residuals(self, graph, owner, where, insert) -> None:
        """``act(se(x) [→ drop-path] + shortcut)`` → one :class:`SEResidualStep`."""
        for node in list(graph.nodes):
            if node.op != "call_module" or not isinstance(_submodule(owner, node.target), SqueezeExcite) \
                    or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
                continue
            chain, passthrough, cur = [node], [], node
            while len(cur.users) == 1:
                user = next(iter(cur.users))
                m = _submodule(owner, user.target) if user.op == "call_module" else None
                if not (_eval_identity(m) and user.args == (cur,) and not user.kwargs):
                    break
                chain.append(user)
                if type(m) is not nn.Identity:
                    passthrough.append(m)
                cur = user
            add = next(iter(cur.users)) if len(cur.users) == 1 else None
            res = _residual_of(add, cur)
            if res is None:
                continue
            chain.append(add)
            after = _only_user(add, owner, chain)
            act = _node_act(after, owner, chain[-1])
            if act is not None:
                chain.append(after)
            name, param, act_mod = act if act is not None else ("identity", 0.0, None)
            se = _submodule(owner, node.target)
            last = chain[-1]
            step = SEResidualStep(se, name, param, act_mod, passthrough)
            insert(step, (node.args[0], res), chain)
            entry = ReportEntry(f"{where}{node.target}..{last.name}",
                                f"SE gate + residual + {name}: one pass (SqueezeExcite.forward_residual) [traced]")
            self.report.swapped.append(entry)
            self.se_entries[id(step)] = entry

    def _pointwise_depthwise(self, graph, steps) -> None:
        """A plain fused expand 1×1 conv step whose only user is a plain fused depthwise conv step
        → one :class:`PairStep`."""
        for node in list(graph.nodes):
            if node.op != "call_module" or type(steps.get(node.target)) is not FusedStep or len(node.args) != 1 \
                    or node.kwargs:
                continue
            prev = node.args[0]
            if not isinstance(prev, torch.fx.Node) or prev.op != "call_module" \
                    or type(steps.get(prev.target)) is not FusedStep or len(prev.users) != 1 or len(prev.args) != 1 \
                    or prev.kwargs:
                continue
            first, second = steps[prev.target], steps[node.target]
            if any(s.se is not None or s.residual is not None for s in (first, second)) \
                    or not PointwiseDepthwise.applies(first.fused, second.fused):
                continue
            name = f"_effops_step{len(steps)}"
            steps[name] = PairStep(first, second)
            with graph.inserting_before(node):
                new = graph.call_module(name, (prev.args[0],))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            graph.erase_node(prev)

    def _depthwise_pointwise(self, graph, owner, where, steps) -> None:
        """A plain fused depthwise conv step, or a bare depthwise conv (nothing after it to fuse:
        timm's SeparableConvNormAct), whose only user is a fused 1×1 conv step (with or without a
        residual, no SE) → one :class:`DwPairStep`."""
        for node in list(graph.nodes):
            if node.op != "call_module" or type(steps.get(node.target)) is not FusedStep or not node.args \
                    or len(node.args) > 2 or node.kwargs:
                continue
            prev = node.args[0]
            if not isinstance(prev, torch.fx.Node) or prev.op != "call_module" or len(prev.users) != 1 \
                    or len(prev.args) != 1 or prev.kwargs:
                continue
            second = steps[node.target]
            first = steps.get(prev.target)
            bare = first is None and type(_submodule(owner, prev.target)) is nn.Conv2d
            if bare:
                dw = _submodule(owner, prev.target)
            elif type(first) is not FusedStep or first.se is not None or first.residual is not None:
                continue
            if second.se is not None or (second.residual is None) != (len(node.args) == 1) \
                    or not DepthwisePointwise.applies(dw if bare else first.fused, second.fused):
                continue
            name = f"_effops_step{len(steps)}"
            steps[name] = DwPairStep(dw if bare else first, second)
            if bare:  # the bare conv is fused now: reported with the 1×1 conv it feeds
                self.fused_convs.add(id(dw))
                old = self.entry_of_conv.get(id(second.fused.conv))
                if old is not None:
                    self._replace_entry(second.fused.conv, f"{where}{prev.target}..{old.path.split('..')[-1]}",
                                        f"{_describe_dw(dw)} → {old.what}")
            with graph.inserting_before(node):
                new = graph.call_module(name, (prev.args[0],) + tuple(node.args[1:]))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            graph.erase_node(prev)

    def _se_epilogues(self, graph, owner, steps) -> None:
        """A plain fused conv step whose only user is an SE-residual step → one
        :class:`SEEpilogueStep` (the squeeze rides the conv's epilogue)."""
        for node in list(graph.nodes):
            if node.op != "call_module" or node.target not in steps or type(steps[node.target]) is not SEResidualStep \
                    or len(node.args) != 2 or node.kwargs:
                continue
            prev = node.args[0]
            if not isinstance(prev, torch.fx.Node) or prev.op != "call_module" or prev.target not in steps \
                    or len(prev.users) != 1 or len(prev.args) != 1 or prev.kwargs:
                continue
            conv_step, se_step = steps[prev.target], steps[node.target]
            if type(conv_step) is not FusedStep or conv_step.se is not None or conv_step.residual is not None \
                    or not isinstance(se_step.se, SqueezeExcite):
                continue
            name = f"_effops_step{len(steps)}"
            steps[name] = SEEpilogueStep(conv_step, se_step)
            with graph.inserting_before(node):
                new = graph.call_module(name, (prev.args[0], node.args[1]))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            graph.erase_node(prev)
            entry = self.se_entries.get(id(se_step))
            if entry is not None:
                entry.what = entry.what.replace(
                    "(SqueezeExcite.forward_residual)",
                    "(SqueezeExcite.forward_residual_from_sums); the squeeze rides the conv's epilogue "
                    f"({conv_step.fused.conv.out_channels}-channel sums written with its output, no pool pass)")

    def _aggregations(self, graph, owner, where, steps, labels) -> None:
        """``torch.cat(segments, 1)`` whose only user is a fused 1×1 conv → one :class:`AggregateStep`."""
        for node in list(graph.nodes):
            segs = _channel_cat(node)
            if segs is None or len(node.users) != 1:
                continue
            user = next(iter(node.users))
            if user.op != "call_module" or not user.args or user.args[0] is not node or user.kwargs:
                continue
            res, rest = None, []
            if user.target in steps:
                inner = steps[user.target]
                if type(inner) is not FusedStep or inner.se is not None:
                    continue
                fused, mode, label = inner.fused, inner.residual, labels[user.target]
                res = user.args[1] if len(user.args) > 1 else None
            else:
                inner = _submodule(owner, user.target)
                head = _conv_head(inner)
                if head is None or len(user.args) != 1:
                    continue
                (fused, rest), mode, label = head, None, user.target
            conv, bn = fused.conv, fused.bn
            n = f"{len(segs)} segments" if isinstance(segs, list) else "a list of segments"
            desc = _describe(conv, bn, fused.activation[0]) + (f" + residual ({mode.replace('_', ' ')})" if mode else "")
            path = f"{where}{node.name}..{label}"
            if not _pointwise(conv):
                self.report.skipped.append(ReportEntry(
                    path, f"cat({n}) → {desc}: the concat stays (not a 1×1 stride-1 dense conv without padding)"))
                continue
            if isinstance(segs, list) and len(segs) > MAX_SEGMENTS:
                self.report.skipped.append(ReportEntry(
                    path, f"cat({n}) → {desc}: the concat stays (the aggregation takes at most {MAX_SEGMENTS})"))
                continue
            name = f"_effops_step{len(steps)}"
            steps[name] = AggregateStep(inner, fused, mode, rest)
            labels[name] = label
            with graph.inserting_before(user):
                new = graph.call_module(name, (segs,) if res is None else (segs, res))
            user.replace_all_uses_with(new)
            graph.erase_node(user)
            graph.erase_node(node)
            self.fused_convs.add(id(conv))
            then = f", then {', '.join(type(m).__name__ for m in rest)}" if rest else ""
            self._replace_entry(conv, path, f"cat({n}) → {desc}: N-segment aggregation, no concat{then} [traced]")

    def _shuffled_writes(self, graph, owner, where, steps) -> None:
        """A fused conv whose output only feeds a channel shuffle → one :class:`ShuffleStep`."""
        for node in list(graph.nodes):
            if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
                continue
            if node.target in steps:
                inner = steps[node.target]
                if type(inner) is not FusedStep:
                    continue
                step = inner
            else:
                inner = _submodule(owner, node.target)
                fused = _conv_of(inner)
                if fused is None or len(node.args) != 1 or node.kwargs:
                    continue
                step = FusedStep(fused)
            conv = step.fused.conv
            found = _shuffle_of(node, owner, conv.out_channels)
            if found is None:
                continue
            chain, groups, shuffle = found
            name = f"_effops_step{len(steps)}"
            steps[name] = ShuffleStep(step, groups, shuffle, inner)
            with graph.inserting_before(node):
                new = graph.call_module(name, node.args)
            node.replace_all_uses_with(new)  # shape queries now read the shuffled output: same shape
            chain[-1].replace_all_uses_with(new)
            dims = [a for n in chain for a in n.args[1:] if isinstance(a, torch.fx.Node)]
            for n in reversed(chain):
                graph.erase_node(n)
            while dims:  # the size arithmetic only the removed view used
                d = dims.pop()
                if not d.users and d.op in ("call_method", "call_function") and d in graph.nodes:
                    dims.extend(a for a in d.args if isinstance(a, torch.fx.Node))
                    graph.erase_node(d)
            graph.erase_node(node)
            self.fused_convs.add(id(conv))
            old = self.entry_of_conv.get(id(conv))
            start = old.path.split("..")[0] if old is not None else f"{where}{node.target}"
            desc = _describe_step(conv, step.fused.bn, step.fused.activation[0], step.residual, step.se)
            self._replace_entry(conv, f"{start}..{chain[-1].name}", f"{desc} + channel shuffle g={groups}: the conv "
                                                                     "writes its output shuffled, no shuffle pass [traced]")

    def _concat_writes(self, graph, owner, where, steps) -> None:
        """``torch.cat([conv_0(x_0), ...], 1)`` of fused convs used only there → one :class:`ConcatStep`
        (each conv writes its channel range of one buffer)."""
        for node in list(graph.nodes):
            segs = _channel_cat(node)
            if not isinstance(segs, list) or len(segs) < 2:
                continue
            producers, convs = [], []
            for seg in segs:
                if seg.op != "call_module" or len(seg.users) != 1 or len(seg.args) != 1 or seg.kwargs \
                        or segs.count(seg) != 1 or not isinstance(seg.args[0], torch.fx.Node):
                    break
                if seg.target in steps:
                    p = steps[seg.target]
                    f = p.fused if type(p) is FusedStep and p.residual is None and p.se is None else None
                else:
                    p = _submodule(owner, seg.target)
                    f = _conv_of(p)
                if f is None:
                    break
                producers.append(p)
                convs.append(f)
            else:
                name = f"_effops_step{len(steps)}"
                steps[name] = ConcatStep(producers, convs)
                with graph.inserting_before(node):
                    new = graph.call_module(name, tuple(seg.args[0] for seg in segs))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                for seg in segs:
                    graph.erase_node(seg)
                self.report.swapped.append(ReportEntry(
                    f"{where}{node.name}", f"cat({len(segs)} segments): each conv writes its channel range of one "
                                           "buffer, no concat copy [traced]"))

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

    def _sequence_steps(self, seq: nn.Sequential, fused_runs, prefix: str):
        """``fused_runs`` (``(start, length, step)`` over ``seq``'s children) with
        * every squeeze-excite child that directly precedes a 1×1 conv (a fused run, or a container
          converted before) joined to it as one gated :class:`FusedStep` (torchvision's MobileNetV3 /
          EfficientNet blocks, RegNetY's ``BottleneckTransform``);
        * every channel-shuffle child that directly follows a fused conv joined to it as one
          :class:`ShuffleStep` (the conv writes its output shuffled)."""
        where = f"{prefix}." if prefix else ""
        live = list(seq.named_children())
        by_start = {start: (length, step) for start, length, step in fused_runs}
        for i, (se_name, se) in enumerate(live[:-1]):
            if not isinstance(se, SqueezeExcite) or i in by_start:
                continue
            if i + 1 in by_start:
                length, fused = by_start[i + 1]
                last = live[i + length][0]
            else:
                length, fused, last = 1, live[i + 1][1], live[i + 1][0]
            if not isinstance(fused, FusedConvBNAct) or not _gateable(fused.conv):
                continue
            by_start.pop(i + 1, None)
            by_start[i] = (length + 1, FusedStep(fused, None, se=se))
            self._replace_entry(fused.conv, f"{where}{se_name}..{last}",
                                _describe_step(fused.conv, fused.bn, fused.activation[0], None, se))
        for i, (sh_name, shuffle) in enumerate(live):
            if i == 0 or not isinstance(shuffle, nn.ChannelShuffle) or i in by_start:
                continue
            prev = next(((st, ln, step) for st, (ln, step) in by_start.items() if st + ln == i), None)
            if prev is None and isinstance(live[i - 1][1], FusedConvBNAct):
                prev = (i - 1, 1, live[i - 1][1])
            if prev is None:
                continue
            start, length, inner = prev
            step = FusedStep(inner) if isinstance(inner, FusedConvBNAct) else inner
            if type(step) is not FusedStep:
                continue
            by_start[start] = (length + 1, ShuffleStep(step, shuffle.groups, shuffle, inner))
            conv = step.fused.conv
            desc = _describe_step(conv, step.fused.bn, step.fused.activation[0], None, step.se)
            self._replace_entry(conv, f"{where}{live[start][0]}..{sh_name}",
                                f"{desc} + channel shuffle g={shuffle.groups}: the conv writes its output shuffled, "
                                "no shuffle pass")
        return [(start, length, step) for start, (length, step) in sorted(by_start.items())]

    def _optimized_before(self, module: nn.Module) -> bool:
        """Whether ``module`` is an effops module a previous ``optimize`` swapped in. The convs fused in it
        (and below it) are then not reported as skipped."""
        if not _is_fused_module(module):
            return False
        for m in module.modules():
            if isinstance(m, FusedSequential):
                children = {id(c) for c in m.children()}
                self.fused_convs.update(id(c) for s in m._plan if id(s) not in children
                                        for c in s.modules() if isinstance(c, nn.Conv2d))
                self.fused_convs.update(id(c) for c in _bare_depthwise_paired(m))
            elif _is_fused_module(m):
                self.fused_convs.update(id(c) for c in m.modules() if isinstance(c, nn.Conv2d))
            elif traced_forward_of(m) is not None:
                self.fused_convs.update(_traced_convs(traced_forward_of(m)))
        return True

    def convert(self, module: nn.Module, prefix: str = "") -> nn.Module:
        if self._optimized_before(module):
            return module
        if type(module) is nn.MaxPool2d and not module.return_indices:  # a leaf: the same values, no indices
            k, s = _as_pair(module.kernel_size), _as_pair(module.stride or module.kernel_size)
            self.report.swapped.append(ReportEntry(
                prefix or "<model>", f"max pool {k[0]}x{k[1]} s{s[0]}" + (" ceil" if module.ceil_mode else "")
                + " (NHWC, no indices)"))
            return MaxPool2d.from_module(module)
        if plain_linear(module):  # a leaf: the same parameters; small batches stream the weight natively
            self.report.swapped.append(ReportEntry(
                prefix or "<model>", f"linear {module.in_features}->{module.out_features} (native matrix-vector "
                f"product up to {MAX_NATIVE_ROWS} rows)"))
            return Linear.from_module(module)
        if type(module) is nn.ChannelShuffle:  # a leaf: the same permutation by effops' kernel
            self.report.swapped.append(ReportEntry(prefix or "<model>", f"channel shuffle g={module.groups}"))
            return ChannelShuffle(module.groups)
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
                new.training = child.training  # a new module starts in train mode: take the replaced one's
                setattr(module, name, new)
        if children is None and type(module).forward is not nn.Module.forward:
            self._trace(module, prefix)
        fused_runs = []
        for start, length, conv, bn, act, child_names in runs:
            fused_runs.append((start, length, FusedConvBNAct.from_modules(conv, bn, act, names=child_names)))
            last = children[start + length - 1][0]
            self._record((f"{prefix}." if prefix else "") + f"{child_names[0]}..{last}", conv, bn, act)
        if is_plain_sequential(module):
            fused_runs = self._sequence_steps(module, fused_runs, prefix)
        if not fused_runs and is_osa_stages(module):  # timm VoVNet's stages, their blocks fused above
            stages = FusedOSAStages.from_sequential(module)
            self.report.swapped.append(ReportEntry(prefix or "<model>", describe_osa_stages(stages)))
            return stages
        if not fused_runs:
            return module
        if isinstance(module, nn.Sequential):
            seq = module
        else:  # a timm container: the same children (re-read: containers among them may have been swapped)
            seq = nn.Sequential(OrderedDict(sequential_children(module)))
        fs = FusedSequential(seq, fused_runs)
        names = {id(c): n for n, c in seq.named_children()}
        for dw in _bare_depthwise_paired(fs):  # fused now: reported with the 1×1 conv it feeds
            self.fused_convs.add(id(dw))
            self.skip_reason.pop(id(dw), None)
            pw = next(s.pw for s in fs._steps if isinstance(s, DepthwisePointwise) and s.dw is dw)
            old = self.entry_of_conv.get(id(pw.conv))
            if old is not None:
                self._replace_entry(pw.conv, (f"{prefix}." if prefix else "") + f"{names[id(dw)]}.."
                                    f"{old.path.split('..')[-1]}", f"{_describe_dw(dw)} → {old.what}")
        return fs

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


def _as_pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def _bare_depthwise_paired(fs: FusedSequential) -> list:
    """The bare depthwise convs of ``fs`` that run in a banded pair with the 1×1 unit after them."""
    return [s.dw for s in fs._steps if isinstance(s, DepthwisePointwise) and type(s.dw) is nn.Conv2d]


def _describe_dw(conv: nn.Conv2d) -> str:
    """A bare depthwise conv run in a banded pair with the 1×1 conv after it, for the report."""
    k, s = conv.kernel_size, conv.stride
    return f"depthwise conv{k[0]}x{k[1]}{f' s{s[0]}' if s[0] > 1 else ''} {conv.in_channels}ch (banded pair)"


def _is_fused_module(m: nn.Module) -> bool:
    return isinstance(m, (FusedConvBNAct, FusedSequential, FusedOSA)) or any(isinstance(m, r.fused_type)
                                                                           for r in BLOCK_RULES)


def _traced_convs(fwd: TracedForward):
    """ids of the convs the fused steps of a rewritten forward compute."""
    return [id(m.fused.conv) for m in fwd.graph_module.modules() if isinstance(m, (FusedStep, AggregateStep))] \
        + [id(m.first) for m in fwd.graph_module.modules() if isinstance(m, DwPairStep) and type(m.first) is nn.Conv2d]


def _resolve(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def optimize(model: nn.Module, example_inputs=None, *, inplace: bool = False, check_speed="auto") -> nn.Module:
    """Swap effops' fused modules into ``model``; return the optimized model.

    With ``inplace=False`` (default) the original is deep-copied first and left
    untouched. Weights are shared with (or copied from) the original modules,
    never re-initialised, and the ``state_dict`` keys stay the same. The
    returned model carries ``effops_report`` (an :class:`OptimizeReport`)::

        fast = effops.optimize(model.eval(), example_inputs=(x,))
        print(fast.effops_report)

    The speed check (:mod:`effops.speedcheck`) times every converted block against the module it
    replaced, on the input the block gets in the model, and keeps the original wherever that measured
    faster (the report says which and why), so the optimized model is not slower than the original:

    * ``example_inputs`` (a tuple of positional arguments, or a single tensor): the check runs now, on
      that input; give it in the layout and dtype the model will run (e.g. channels_last).
    * without it, the check runs on the model's first eval-mode call (its input is the probe; that
      call takes a few times longer), and the report is completed then.
    * ``check_speed``: ``"auto"`` (default) checks models on CPU (``EFFOPS_CHECK_SPEED=0`` turns it
      off, ``=1`` on for every device); ``True`` checks on any device (CUDA timings synchronise);
      ``False`` never checks: every fusion that applies is kept.
    """
    from . import speedcheck

    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects an nn.Module, got {type(model).__name__}")
    if check_speed not in ("auto", True, False):
        raise ValueError(f"check_speed must be 'auto', True or False, got {check_speed!r}")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    mode = speedcheck.mode_from_env(check_speed)
    if not inplace:
        # Outside inference mode: a copy made inside it would hold inference tensors, which have no
        # version counter, so the native CPU backend could not cache their folded weights (a fold
        # and repack on every call).
        with torch.inference_mode(False):
            model = copy.deepcopy(model)
    original, copy_error = None, None
    if mode is not False:
        try:
            original = speedcheck.structure_copy(model)
        except Exception as e:  # noqa: BLE001 - an uncopyable attribute only costs the check, never the conversion
            copy_error = f"not run: the model's modules can't be deep-copied ({type(e).__name__}: {e})"
    conv = _Converter(model)
    out = conv.convert(model)
    out.training = model.training
    conv.report_leftovers(out)
    report = conv.report
    if mode is False:
        report.speed_check = "off"
    elif copy_error is not None:
        report.speed_check = copy_error
    elif example_inputs is not None:
        why = speedcheck.probe_usable(tuple(example_inputs), {}, cpu_only=mode == "auto")
        if why is None:
            out = speedcheck.run(out, original, report, tuple(example_inputs), {}, root_replaceable=True)
        else:
            report.speed_check = f"not run: {why}"
    else:
        report.speed_check = "pending: runs on the first eval-mode call"
        # A model optimized before (effops.models builds theirs optimized) may carry that call's
        # pending check: this one replaces it (two would run nested on the first call).
        speedcheck.LazyCheck.remove_all(out)
        out.register_forward_pre_hook(speedcheck.LazyCheck(original, report, cpu_only=mode == "auto"),
                                      with_kwargs=True)
    out.effops_report = report
    revalidate_snapshots()  # so a torch.compile that comes next traces the cheap structure check
    native.save_choices()  # the native convs' per-problem choices the speed check measured
    return out
