"""``FusedClassifierHead``: timm's ``ClassifierHead`` (global average pool → dropout → linear) whose
small-batch CPU inference is one native call. Importing this module registers the converter's
``"classifier-head"`` block rule."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..native import module as native_module
from ..ops.conv import native_fast
from ..ops.linear import POOL_LINEAR_NATIVE_OP
from .common import BlockRule, SameObjects, hook_dicts, hooked, register_block_rule, timm_type
from .linear import MAX_NATIVE_ROWS, Linear, plain_linear


def _average_pool(gp: nn.Module) -> bool:
    """timm ``SelectAdaptivePool2d`` that computes ``x.mean((2, 3))`` as [N, C]: ``pool_type='avg'``
    (``nn.AdaptiveAvgPool2d(1)`` then ``nn.Flatten(1)``) or ``'fast'`` / ``'fastavg'`` with flatten."""
    if not timm_type(gp, "SelectAdaptivePool2d"):
        return False
    pool, flat = gp._modules.get("pool"), gp._modules.get("flatten")
    if type(pool) is nn.AdaptiveAvgPool2d:
        return pool.output_size in (1, (1, 1)) and type(flat) is nn.Flatten and flat.start_dim == 1 \
            and flat.end_dim == -1
    return timm_type(pool, "FastAdaptiveAvgPool") and pool.flatten is True and tuple(pool.dim) == (2, 3) \
        and type(flat) is nn.Identity


def _pool_drop_linear(mods) -> bool:
    """Children that compute ``fc(drop(x.mean((2, 3))))``: an average pool, a dropout, a linear
    classifier, no flatten after it."""
    return set(mods) == {"global_pool", "drop", "fc", "flatten"} and _average_pool(mods["global_pool"]) \
        and type(mods["drop"]) is nn.Dropout and isinstance(mods["fc"], nn.Linear) \
        and type(mods["flatten"]) is nn.Identity


def _matches(m: nn.Module) -> bool:
    return timm_type(m, "ClassifierHead") and _pool_drop_linear(m._modules) \
        and (plain_linear(m._modules["fc"]) or type(m._modules["fc"]) is Linear)


class FusedClassifierHead(nn.Module):
    """Drop-in for timm's ``ClassifierHead`` with average pooling and a linear classifier: the same
    children (``global_pool``, ``drop``, ``fc``, ``flatten``), so the same ``state_dict``; its
    attributes and its ``reset()`` (``model.reset_classifier``) are timm's.

    Equivalent PyTorch::

        y = self.fc(self.drop(x.mean((2, 3))))   # pre_logits=True: x.mean((2, 3)) after drop

    Inference (no gradient mode) on a 4-D float32 CPU input of 1 to ``MAX_NATIVE_ROWS`` rows, with
    the dropout in eval mode (or p = 0), runs ``pool_linear`` (csrc/se.cpp): the channel means and
    the matrix-vector product in one call instead of five module calls and two ATen ops, which run
    from cold caches after the last block (from evicted caches, 0.16 against 0.37 ms for
    ese_vovnet19b_dw's 1024 → 1000 head: ``pytest benchmarks/test_native_kernels.py -k pool_linear``).
    It holds the children it checked and the objects its call reads
    (:class:`~effops.nn.common.SameObjects`), so a child replaced, a parameter reassigned, a
    dropout put in train mode or a hook registered makes it run timm's forward, as does everything
    else (``pre_logits``, gradients, larger batches, other dtypes and devices). Under torch.compile
    the same kernel is the op ``effops::pool_linear_native`` where the same conditions hold while
    tracing."""

    @classmethod
    def from_module(cls, head: nn.Module) -> "FusedClassifierHead":
        if not _matches(head):
            raise ValueError(f"FusedClassifierHead: not a timm ClassifierHead with average pooling and a linear "
                             f"classifier: {head}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for k, v in head.__dict__.items():  # timm's plain attributes (in_features, use_conv, input_fmt...)
            if not k.startswith("_") and k != "training":
                new.__dict__[k] = v
        for n, m in head._modules.items():
            new.add_module(n, m)
        if plain_linear(new.fc):  # the same Parameters: state_dict unchanged
            new.fc = Linear.from_module(new.fc)
        new.__dict__["_head_type"] = type(head)
        new.__dict__["_fast"] = None
        new.__dict__["_hooks"] = hook_dicts([new])
        new.train(head.training)
        return new

    def reset(self, *args, **kwargs):
        """timm's ``ClassifierHead.reset`` (a new classifier; the next call checks the children again)."""
        out = self._head_type.reset(self, *args, **kwargs)
        self.__dict__["_hooks"] = hook_dicts([self])
        return out

    def _native_weights(self):
        """``(weight, bias)`` of the classifier where the head is ``fc(x.mean((2, 3)))`` with float32 CPU
        weights and a dropout that does nothing (eval, or p = 0); else None."""
        mods = self._modules
        if not _pool_drop_linear(mods) or (mods["drop"].training and mods["drop"].p != 0):
            return None
        fc = mods["fc"]
        w, b = fc._parameters.get("weight"), fc._parameters.get("bias")
        if not isinstance(w, Tensor) or w.dtype != torch.float32 or not w.is_cpu or w.dim() != 2 \
                or (b is not None and (b.dtype != torch.float32 or not b.is_cpu or b.shape != (w.shape[0],))):
            return None
        return w, b

    def _plan(self) -> Optional[SameObjects]:
        """The reads that keep the native call valid, after checking what it needs once."""
        wb = self._native_weights()
        if wb is None:
            return None
        w, b = wb
        mods = self._modules
        gp, drop, fc = mods["global_pool"], mods["drop"], mods["fc"]
        pool = gp._modules["pool"]
        reads = [(mods, "global_pool"), (mods, "drop"), (mods, "fc"), (mods, "flatten"),
                 (gp._modules, "pool"), (gp._modules, "flatten"), (drop.__dict__, "training"), (drop.__dict__, "p"),
                 (fc._parameters, "weight"), (fc._parameters, "bias")]
        reads += [(pool.__dict__, k) for k in ("output_size", "flatten", "dim") if k in pool.__dict__]
        return SameObjects(reads, (w, b))

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        fast = self._fast
        if fast is not None and not pre_logits and type(x) is Tensor and not torch.is_grad_enabled() \
                and x.dtype is torch.float32 and x.dim() == 4 and 0 < x.shape[0] <= MAX_NATIVE_ROWS \
                and not torch.compiler.is_compiling() and native_fast(x) and not hooked(self._hooks) \
                and fast.current():
            w, b = fast.payload
            return native_module().pool_linear(x, w, b)
        if torch.compiler.is_compiling():
            if not pre_logits and not torch.is_grad_enabled() and isinstance(x, Tensor) and x.dim() == 4 \
                    and x.dtype == torch.float32 and 0 < x.shape[0] <= MAX_NATIVE_ROWS and native_fast(x):
                wb = self._native_weights()  # read while tracing: the structure becomes the graph's guards
                if wb is not None:
                    return POOL_LINEAR_NATIVE_OP(x, *wb)
            return self._head_type.forward(self, x, pre_logits)
        if not pre_logits and type(x) is Tensor and native_fast(x):
            self.__dict__["_fast"] = self._plan()  # used from the next call on, when it applies
        return self._head_type.forward(self, x, pre_logits)


def _describe(h: FusedClassifierHead) -> str:
    fc = h.fc
    return (f"classifier head: global average pool → linear {fc.in_features}->{fc.out_features} in one native call "
            f"(up to {MAX_NATIVE_ROWS} rows)")


register_block_rule(BlockRule("classifier-head", _matches, FusedClassifierHead.from_module, _describe,
                              FusedClassifierHead))
