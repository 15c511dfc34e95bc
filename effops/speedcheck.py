"""The speed check behind :func:`effops.optimize`: every converted block is timed against the
module it replaced, on the input it gets in the model, and the original stays wherever it
measured faster (or where the converted block's output differs from the original's).

Why measure: whether a fused block beats the ATen/oneDNN ops it replaces depends on the shapes,
the layout, the thread count and the CPU. A 1×1 conv at 7² with 1280 channels, a depthwise conv at
112², a whole VoVNet stage: the per-problem choices inside the native backend settle the kernel,
but not whether effops' block as a whole (its Python, its layout choices, the work it fuses) beats
the eager block it replaces. Only a measurement on the real input settles that, so
``optimize`` keeps, per block, what measured faster; that is what makes "never slower than the
original model" hold by construction (within the timing noise of the machine).

The check, given one probe input (``optimize(model, example_inputs=...)``, or the first eval-mode
call of the optimized model when none is given):

1. the optimized model runs once on the probe, with forward pre-hooks recording the input of every
   converted block as the optimized model hands it on (channels-last from the first fused block on,
   where the original model passes NCHW); a *structure copy* of the model taken before conversion
   (modules copied, parameters and buffers shared, so it costs no weight memory), rebound to the live
   model's tensors, supplies the input of a block the optimized forward never calls on its own;
2. top-down from the root, each converted block (a swapped module, or a module whose forward
   effops rewrote) is timed against a structure copy of its original on that recorded input:
   a few untimed calls (first calls pack weights and make the native backend's own per-problem
   choices), then calls interleaved A/B/A/B, median of each. Where the original is faster (in that
   measurement and in a second one), or the outputs differ beyond a dtype-sized tolerance, the
   original goes back in (same parameter objects,
   same ``state_dict`` keys) and the blocks inside it are not looked at; otherwise the blocks
   inside are checked the same way;
3. a block whose replacement would break the rewritten forward of a module above it (that forward
   calls the block as it was fused) is decided with that module, not on its own.

The outcome is in the report: ``report.measured`` (every timing and what was kept) and a "kept the
original" entry in ``report.skipped`` for each block left alone.
"""
from __future__ import annotations

import copy
import itertools
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from . import native
from .nn.common import revalidate_snapshots, structure_changed
from .nn.traced import traced_forward_of

ENV = "EFFOPS_CHECK_SPEED"

# Relative error (norm of the difference / norm of the original's output) above which a converted
# block is called wrong, not just rounded differently. Two correct fp32 implementations of a whole
# network differ by ~1e-6..1e-5; a wrong kernel by O(1). The margins are wide on purpose: this is a
# safety net in front of users, not the numerical test suite (tests/ holds those, at 1e-5 vs fp64).
_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


@dataclass
class Measurement:
    """One block's timing: the converted block (``fused_ms``) against its original, median ms per
    call on the probe input; ``kept`` is ``"fused"`` or ``"original"``; ``why`` says why the
    original was kept when it was not for speed."""

    path: str
    fused_ms: float
    original_ms: float
    kept: str
    why: str = ""

    def __str__(self) -> str:
        ratio = self.original_ms / self.fused_ms if self.fused_ms > 0 else float("inf")
        return (f"effops {self.fused_ms:.3f} ms vs original {self.original_ms:.3f} ms ({ratio:.2f}x): kept {self.kept}"
                + (f" ({self.why})" if self.why else ""))


def mode_from_env(check_speed) -> object:
    """``check_speed`` as given, or from ``EFFOPS_CHECK_SPEED`` (``0``/``off`` → False, ``1`` → True)
    when it is ``"auto"``."""
    if check_speed != "auto":
        return check_speed
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("0", "off", "false", "no"):
        return False
    if env in ("1", "on", "true", "yes"):
        return True
    return "auto"


def structure_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``'s modules that shares its parameters and buffers (no weight memory)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def _rebind(copy_root: nn.Module, live_root: nn.Module) -> None:
    """Point every parameter and buffer of ``copy_root`` at the live model's tensor of the same
    name (state_dict-compatible conversion keeps the names), so a ``.to()``, ``load_state_dict`` or a
    replaced parameter after ``optimize`` is what the original blocks are timed with."""
    live = dict(live_root.named_modules(remove_duplicate=False))
    for name, m in copy_root.named_modules(remove_duplicate=False):
        src = live.get(name)
        if src is None:
            continue
        for k in m._parameters:
            if k in src._parameters and src._parameters[k] is not None:
                m._parameters[k] = src._parameters[k]
        for k in m._buffers:
            if k in src._buffers and src._buffers[k] is not None:
                m._buffers[k] = src._buffers[k]


def _tensors(args, kwargs) -> List[torch.Tensor]:
    return [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]


def probe_usable(args, kwargs, cpu_only: bool) -> Optional[str]:
    """Why this call can't serve as the probe, or None."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return "tracing"
    ts = _tensors(args, kwargs)
    if not ts:
        return "no tensor input"
    for t in ts:
        if type(t) not in (torch.Tensor, nn.Parameter):
            return f"a {type(t).__name__} input"
        if t.device.type == "meta":
            return "a meta tensor input (nothing runs to time)"
        if cpu_only and t.device.type != "cpu":
            return f"the input is on {t.device.type} (the automatic check measures CPU models; check_speed=True measures on any device)"
    return None


def _clone(t):
    return t.clone() if isinstance(t, torch.Tensor) else t


def _sync_for(args, kwargs) -> Callable[[], None]:
    devs = {t.device for t in _tensors(args, kwargs) if t.device.type == "cuda"}
    if not devs:
        return lambda: None
    return lambda: [torch.cuda.synchronize(d) for d in devs]


def measure_pair(fused: Callable, original: Callable, args, kwargs, *, path: str = "", warmup: int = 2,
                 min_reps: int = 5, max_reps: int = 31, budget_s: float = 0.25) -> Tuple[float, float, object, object]:
    """``(fused_ms, original_ms, fused_out, original_out)`` for the block at ``path``: medians of
    interleaved calls on one input. Interleaving (A B B A A B ...) makes drift on a shared machine
    hit both sides alike."""
    sync = _sync_for(args, kwargs)

    def call(f):
        sync()
        t0 = time.perf_counter()
        out = f(*args, **kwargs)
        sync()
        return time.perf_counter() - t0, out

    outs = {}
    for f, key in ((fused, "f"), (original, "o")):
        # The compared outputs come from fresh copies of the input: a block that writes its input
        # in place must not hand the second side a different one.
        a, kw = tree_map(_clone, (args, kwargs))
        outs[key] = f(*a, **kw)
        for _ in range(max(warmup - 1, 0)):
            call(f)
    times: Dict[str, List[float]] = {"f": [], "o": []}
    start = time.perf_counter()
    for i in range(max_reps):
        order = (("f", fused), ("o", original)) if i % 2 == 0 else (("o", original), ("f", fused))
        for key, f in order:
            times[key].append(call(f)[0])
        if i + 1 >= min_reps and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times["f"]) * 1e3, statistics.median(times["o"]) * 1e3, outs["f"], outs["o"]


def outputs_differ(fused_out, original_out) -> Optional[str]:
    """Why the two outputs are not the same result up to rounding, or None."""
    a, b = tree_leaves(fused_out), tree_leaves(original_out)
    if len(a) != len(b):
        return f"{len(a)} outputs against {len(b)}"
    for x, y in zip(a, b):
        if not isinstance(y, torch.Tensor):
            continue
        if not isinstance(x, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
            return "an output of another shape or dtype"
        if not y.is_floating_point() or y.numel() == 0:
            if not torch.equal(x, y):
                return "an integer output differs"
            continue
        yd, xd = y.double(), x.double()
        if not torch.isfinite(yd).all():
            continue  # nothing to compare against
        err = ((xd - yd).norm() / yd.norm().clamp_min(1e-30)).item()
        tol = _TOLERANCE.get(y.dtype, 1e-3)
        if not err <= tol:
            return f"its output differs from the original's (relative error {err:.1e} > {tol:.0e})"
    return None


def _changed(live: nn.Module, orig: nn.Module) -> bool:
    return type(live) is not type(orig) or (traced_forward_of(live) is not None and traced_forward_of(orig) is None)


def _atomic(m: nn.Module) -> bool:
    """An effops module: decided whole (its children are its fused plan's)."""
    from .convert import _is_fused_module

    return _is_fused_module(m)


def _decided_whole(live: nn.Module, orig: nn.Module) -> bool:
    """A converted block whose insides are not looked at: an effops module, or one of another type."""
    return _atomic(live) or type(live) is not type(orig)


def _candidates(live: nn.Module, orig: nn.Module, path: str, out: List[str]) -> None:
    """Paths of converted blocks (pre-order), for recording their probe inputs."""
    if _changed(live, orig):
        out.append(path)
        if _decided_whole(live, orig):
            return
    for name, child in live.named_children():
        o = orig._modules.get(name)
        if o is not None:
            _candidates(child, o, f"{path}.{name}" if path else name, out)


def _record_inputs(root: nn.Module, paths: List[str], args, kwargs) -> Dict[str, tuple]:
    """Run ``root`` once; the first input each block at ``paths`` received (cloned: an in-place op
    later in the forward must not change it)."""
    probes: Dict[str, tuple] = {}
    handles = []

    for p in paths:
        if not p:
            continue
        try:
            m = root.get_submodule(p)
        except AttributeError:
            continue

        def hook(mod, a, kw, p=p):
            if p not in probes:
                probes[p] = (tree_map(_clone, a), tree_map(_clone, kw))

        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        root(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return probes


def _probe_inputs(live_root: nn.Module, orig_root: nn.Module, paths: List[str], args, kwargs) -> Dict[str, tuple]:
    """The input each converted block gets **in the optimized model**, where it runs.

    Recorded from the live model, not the original: the two differ in layout. effops' blocks hand
    on channels-last outputs, so from the first converted block on, every block of the optimized
    model sees NHWC tensors where the original model passed NCHW ones; timing a block (fused or
    original) on the original's NCHW input measures a layout it never gets (an ATen max pool on an
    NCHW input takes more than 10x its NHWC time). A block the live forward never calls on its own (absorbed
    into a fused forward above it) falls back to its input in the original model; such a block is
    decided with that forward anyway."""
    probes = _record_inputs(orig_root, [p for p in paths if p], args, kwargs)
    probes.update(_record_inputs(live_root, [p for p in paths if p], args, kwargs))
    probes[""] = tree_map(_clone, (args, kwargs))
    return probes


def _put_child(parent: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    """``parent.<name> = new``. When ``parent``'s forward is one effops rewrote and its graph calls
    that child as it is (a plain call, not absorbed into a fused step), the graph is re-pointed at
    the new child too, so it stays in use instead of falling back to the class forward."""
    parent._modules[name] = new
    structure_changed()  # a direct _modules write: the registration hook does not see it
    tf = traced_forward_of(parent)
    if tf is None or tf.children_at_trace.get(name) is not old:
        return
    gm = tf.graph_module
    called = any(n.op == "call_module" and n.target == name for n in gm.graph.nodes)
    absorbed = any(d is old._modules for d in tf.absorbed._live)
    if called and not absorbed and gm._modules.get(name) is old:
        gm._modules[name] = new
        tf.children_at_trace[name] = new


def _breaks_ancestor(ancestors: List[nn.Module]) -> bool:
    """Whether a rewritten forward above now sees a child replaced under it (and would run unfused)."""
    for a in ancestors:
        tf = traced_forward_of(a)
        if tf is not None and tf.changed():
            return True
    return False


class _Checker:
    def __init__(self, report, probes, root_replaceable: bool, measure: Callable):
        self.report = report
        self.probes = probes
        self.root_replaceable = root_replaceable
        self.measure = measure
        self.new_root: Optional[nn.Module] = None

    def decide(self, live: nn.Module, orig: nn.Module, path: str, parent: Optional[nn.Module], name: str,
               ancestors: List[nn.Module]) -> None:
        label = path or "<model>"
        if _changed(live, orig):
            kept = self._decide_one(live, orig, path, label, parent, name, ancestors)
            if kept == "original" or _decided_whole(live, orig):
                return
        for child_name, child in list(live.named_children()):
            o = orig._modules.get(child_name)
            if o is not None:
                self.decide(child, o, f"{path}.{child_name}" if path else child_name, live, child_name,
                            ancestors + [live])

    def _decide_one(self, live, orig, path, label, parent, name, ancestors) -> str:
        probe = self.probes.get(path)
        if probe is None:
            return "fused"  # not called by the probe input: nothing to measure
        candidate = structure_copy(orig)
        if type(live) is type(orig):
            # A module whose forward effops rewrote holds both forms: switch it between them.
            forms = _TwoForms(live, candidate)
            fused_fn, orig_fn = forms.fused_call, forms.original_call
            install_original, restore_fused = forms.to_original, forms.to_fused
        elif parent is not None:
            fused_fn, orig_fn = live, candidate
            install_original = lambda: _put_child(parent, name, live, candidate)  # noqa: E731
            restore_fused = lambda: _put_child(parent, name, candidate, live)  # noqa: E731
        elif self.root_replaceable:
            fused_fn, orig_fn = live, candidate
            install_original = lambda: setattr(self, "new_root", candidate)  # noqa: E731
            restore_fused = lambda: setattr(self, "new_root", None)  # noqa: E731
        else:
            self.report.measured.append(Measurement(label, float("nan"), float("nan"), "fused",
                                                    "not timed: the model's own module type was swapped, and "
                                                    "the check can't swap it back in place"))
            return "fused"
        # A block that a rewritten forward above calls as fused is decided with that forward (it was
        # measured as part of it), not alone: putting the original back would unfuse that forward.
        install_original()
        broken = _breaks_ancestor(ancestors)
        restore_fused()
        if broken:
            return "fused"
        args, kwargs = probe
        try:
            fused_ms, orig_ms, f_out, o_out = self.measure(fused_fn, orig_fn, args, kwargs, path=label)
            why = outputs_differ(f_out, o_out)
            if why is None and fused_ms > orig_ms:
                # A burst of load on a shared machine can cover one whole measurement; the original
                # goes back in only if a second measurement agrees.
                fused_ms, orig_ms, _, _ = self.measure(fused_fn, orig_fn, args, kwargs, path=label)
        finally:
            restore_fused()
        if why is None and fused_ms <= orig_ms:
            self.report.measured.append(Measurement(label, fused_ms, orig_ms, "fused"))
            return "fused"
        if why is not None:
            warnings.warn(f"effops.optimize: {label}: {why}; the original block is kept", RuntimeWarning,
                          stacklevel=3)
        install_original()
        self.report.measured.append(Measurement(label, fused_ms, orig_ms, "original", why or ""))
        self.report.keep_original(path, why or f"the original measured faster ({orig_ms:.3f} ms against "
                                                f"{fused_ms:.3f} ms fused on the probe input)")
        return "original"


class _TwoForms:
    """One module in its fused form (effops' rewritten forward and children) or its original one (the
    class forward and the original children), switched by swapping two dict entries."""

    def __init__(self, live: nn.Module, orig_copy: nn.Module):
        self.live = live
        self.fused = (live.__dict__.get("forward"), dict(live._modules))
        self.original = (orig_copy.__dict__.get("forward"), dict(orig_copy._modules))

    def _set(self, form) -> None:
        fwd, children = form
        self.live.__dict__.pop("forward", None)
        if fwd is not None:  # effops' forward, or (original form) the user's own instance forward
            self.live.__dict__["forward"] = fwd
        self.live._modules.clear()
        self.live._modules.update(children)
        structure_changed()

    def to_fused(self) -> None:
        self._set(self.fused)

    def to_original(self) -> None:
        self._set(self.original)

    def fused_call(self, *args, **kwargs):
        self.to_fused()
        return self.live(*args, **kwargs)

    def original_call(self, *args, **kwargs):
        self.to_original()
        return self.live(*args, **kwargs)


def run(live_root: nn.Module, orig_root: nn.Module, report, args, kwargs, *, root_replaceable: bool,
        measure: Optional[Callable] = None) -> nn.Module:
    """The check on one probe input. Returns the root to use (``live_root``, or the original's structure
    copy where the whole model is kept as it was and ``root_replaceable``)."""
    measure = measure or measure_pair  # looked up per run: tests substitute a deterministic one
    _rebind(orig_root, live_root)
    flags = {id(m): m.training for m in live_root.modules()}
    orig_flags = {name: m.training for name, m in orig_root.named_modules()}
    checker = None
    try:
        live_root.eval()
        orig_root.eval()
        paths: List[str] = []
        _candidates(live_root, orig_root, "", paths)
        if not paths:
            report.speed_check = "done: nothing was converted"
            return live_root
        with torch.no_grad():
            probes = _probe_inputs(live_root, orig_root, paths, args, kwargs)
            checker = _Checker(report, probes, root_replaceable, measure)
            checker.decide(live_root, orig_root, "", None, "", [])
    finally:
        # Every module gets its mode back; an original put back in gets its own mode from before.
        root = checker.new_root if checker is not None and checker.new_root is not None else live_root
        for name, m in root.named_modules():
            m.training = flags.get(id(m), orig_flags.get(name, m.training))
    shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device.type}"
                       for t in _tensors(args, kwargs)[:3])
    n_orig = sum(m.kept == "original" for m in report.measured)
    report.speed_check = (f"done on input {shapes}: {len(report.measured)} blocks timed, "
                          f"{n_orig} kept as the original")
    return checker.new_root if checker.new_root is not None else live_root


class LazyCheck:
    """Forward pre-hook on an optimized model: the check runs on the first eval-mode call whose
    input qualifies (CPU tensors in automatic mode; not while tracing or compiling), then the hook
    removes itself. Holds the structure copy of the original model (no weight memory)."""

    def __init__(self, orig_root: nn.Module, report, cpu_only: bool):
        self.orig_root = orig_root
        self.report = report
        self.cpu_only = cpu_only

    @staticmethod
    def _drop(module: nn.Module, which) -> None:
        for k in [k for k, h in module._forward_pre_hooks.items() if which(h)]:
            module._forward_pre_hooks.pop(k, None)
            module._forward_pre_hooks_with_kwargs.pop(k, None)

    def _remove(self, module: nn.Module) -> None:
        self._drop(module, lambda h: h is self)

    @staticmethod
    def remove_all(module: nn.Module) -> None:
        """Drop every pending check on ``module`` (optimizing it again registers a check of its own)."""
        LazyCheck._drop(module, lambda h: isinstance(h, LazyCheck))

    def __call__(self, module: nn.Module, args, kwargs=None):
        # (kwargs=None: torch passes no kwargs when it finds the hook unregistered mid-call)
        kwargs = {} if kwargs is None else kwargs
        if module.training:
            return None
        why = probe_usable(args, kwargs, self.cpu_only)
        if why == "tracing":
            return None
        self._remove(module)
        if why is not None:
            self.report.speed_check = f"not run: {why}"
            return None
        try:
            run(module, self.orig_root, self.report, args, kwargs, root_replaceable=False)
            revalidate_snapshots()
            native.save_choices()  # what the check's calls measured, for later processes
        except Exception as e:  # noqa: BLE001 - a failed check must never fail the user's forward
            warnings.warn(f"effops.optimize: the speed check failed ({type(e).__name__}: {e}); the model runs "
                          "as converted", RuntimeWarning, stacklevel=2)
            self.report.speed_check = f"failed: {type(e).__name__}: {e}"
        self.orig_root = None
        return None
