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
from operator import mul
from typing import Iterable, Optional, Tuple

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


# ----------------------------------------------------------------------------
# Memory overlap of strided views (``conv_bn_act(out=...)`` checks its inputs with it)
# ----------------------------------------------------------------------------
_OVERLAP_BUDGET = 64  # search steps before :func:`overlaps` gives up and answers True


def overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` may share a memory element (``False``: certainly disjoint).

    Exact whenever both have one element size and their start addresses differ by whole
    elements, in particular for any two views of one buffer such as channel views of an
    NHWC tensor (``buf[:, 0:4]`` vs ``buf[:, 4:8]``, or interleaved ``buf[:, 0::2]`` vs
    ``buf[:, 1::2]``); conservative (``True``) only when the byte ranges intersect and
    the element sizes differ, the offset is not a whole number of elements, or the
    stride layout would need a larger search than a few dozen steps. Tensors on
    different devices are not compared (callers check devices first). Cost: ~1 us when
    the byte ranges are disjoint (different allocations), a few us otherwise.

    Why it is exact: ``a``'s elements are ``{A + sum_k i_k * s_k : 0 <= i_k < n_k}`` and
    ``b``'s ``{B + sum_k j_k * s_k : 0 <= j_k < m_k}`` over the union of both stride sets
    (a stride missing from one tensor has size 1 there; two dims of one tensor with the
    same stride are one dim of size ``n1 + n2 - 1``, the same set of sums; size-1 and
    stride-0 dims add nothing). They share an element iff ``d = B - A`` equals
    ``sum_k t_k * s_k`` with ``-m_k < t_k < n_k`` (``t = i - j``). Taking the strides from
    the largest down, the remaining smaller terms reach ``[lo, hi]``, so ``t_k`` must put
    ``d - t_k * s_k`` into that interval: when strides are nested (each larger than the
    reach ``hi - lo`` of the smaller ones, e.g. N, H, W strides of NCHW/NHWC tensors)
    there is at most one candidate per level and the search is a straight line; for
    channel views with a step, the pixel-stride level has at most two candidates (the
    channel index sets compared modulo the pixel stride), and the last level is a
    divisibility test.
    """
    return first_overlap(a, (("b", b),)) is not None


def first_overlap(t: Tensor, named: Iterable[Tuple[str, Optional[Tensor]]]) -> Optional[str]:
    """The name of the first tensor of ``named`` (``(name, tensor or None)`` pairs) that may
    share memory with ``t`` (:func:`overlaps`), or None; ``t``'s extent is computed once."""
    zt = t.shape
    if 0 in zt:
        return None
    st, et, pt = t.stride(), t.element_size(), t.data_ptr()
    end_t = pt + (sum(map(mul, zt, st)) - sum(st) + 1) * et  # last element at sum((n - 1) * s)
    for name, u in named:
        if u is None:
            continue
        zu = u.shape
        if 0 in zu:
            continue
        su, eu, pu = u.stride(), u.element_size(), u.data_ptr()
        # Disjoint byte ranges: different allocations, or separate parts of one.
        if pu >= end_t or pt >= pu + (sum(map(mul, zu, su)) - sum(su) + 1) * eu:
            continue
        if eu != et or (pu - pt) % et or _shared_element((pu - pt) // et, zt, st, zu, su):
            return name
    return None


def _shared_element(d: int, za, sa, zb, sb) -> bool:
    """Whether ``d == sum_k t_k * s_k`` with ``-m_k < t_k < n_k`` (see :func:`overlaps`)."""
    # (stride, a's index range, b's index range) per dim, size-1 and stride-0 dims dropped
    dims = sorted([(st, n - 1, 0) for n, st in zip(za, sa) if n > 1 and st]
                  + [(st, 0, m - 1) for m, st in zip(zb, sb) if m > 1 and st])
    levels = []  # (stride, t_lo, t_hi, reach_lo, reach_hi of the smaller strides' terms), ascending
    lo = hi = i = 0
    while i < len(dims):
        st, up, down = dims[i]
        i += 1
        while i < len(dims) and dims[i][0] == st:  # equal strides: one level, ranges add up
            up += dims[i][1]
            down += dims[i][2]
            i += 1
        levels.append((st, -down, up, lo, hi))
        lo -= down * st
        hi += up * st
    return lo <= d <= hi and _representable(d, levels, len(levels), [_OVERLAP_BUDGET])


def _representable(d: int, levels, k: int, budget) -> bool:
    # d is within the reach of the k smallest levels' terms; try each t_k that leaves the
    # rest within the reach of the k - 1 smaller ones.
    while k:
        k -= 1
        st, t_lo, t_hi, lo, hi = levels[k]
        first = max(t_lo, -((hi - d) // st))  # ceil((d - hi) / st)
        last = min(t_hi, (d - lo) // st)  # floor((d - lo) / st)
        if first > last:
            return False
        if first < last:  # several candidates (not nested): search them, within the budget
            for t in range(first, last + 1):
                budget[0] -= 1
                if budget[0] < 0 or _representable(d - t * st, levels, k, budget):
                    return True  # found, or too long a search: conservatively "may overlap"
            return False
        d -= first * st
    return d == 0
