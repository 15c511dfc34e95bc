"""``conv_bn_act(out=...)`` refuses an ``out`` that shares memory with what the op reads,
and accepts disjoint channel views of one buffer (how OSA stage convs write their concat)."""
import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from effops import ChannelView
from effops.ops.conv import conv_bn_act
from effops.views import overlaps

from helpers import KERNEL_DEVICE, assert_matches, needs_triton

DEV = KERNEL_DEVICE


def _nhwc(n, c, h, w, dtype=torch.float32):
    return torch.randn(n, c, h, w, device=DEV, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _ref(x, w, bias=None, residual=None):
    y = F.conv2d(x.double(), w.double(), None if bias is None else bias.double())
    return y if residual is None else y + residual.double()


# --- the overlap test itself --------------------------------------------------------------
def _addresses(t):
    return {t.data_ptr() + t.element_size() * sum(i * s for i, s in zip(idx, t.stride()))
            for idx in itertools.product(*map(range, t.shape))}


def test_overlaps_is_exact_on_random_strided_views():
    """Against brute force (every element's address) on random views of one buffer: never
    'disjoint' when an element is shared, and exact on all of these (no conservative answer)."""
    rng = random.Random(0)
    base = torch.zeros(1024)

    def view():
        nd = rng.randint(1, 4)
        shape = [rng.randint(1, 4) for _ in range(nd)]
        stride = [rng.choice([0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 48]) for _ in range(nd)]
        return torch.as_strided(base, shape, stride, rng.randint(0, 64))

    for _ in range(400):
        a, b = view(), view()
        shared = bool(_addresses(a) & _addresses(b))
        assert overlaps(a, b) == shared, (a.shape, a.stride(), a.storage_offset(), b.shape, b.stride(),
                                          b.storage_offset())


def test_overlaps_channel_views():
    buf = torch.zeros(2, 12, 3, 5).contiguous(memory_format=torch.channels_last)
    assert not overlaps(buf[:, 0:4], buf[:, 4:8])
    assert not overlaps(buf[:, 0::2], buf[:, 1::2])  # interleaved
    assert not overlaps(buf[:, 0:12:3], buf[:, 1:12:3]) and not overlaps(buf[:, 2:12:3], buf[:, 3:5])
    assert overlaps(buf[:, 0:12:3], buf[:, 1:12:2])  # channel 9 (and 3) in both
    assert overlaps(buf[:, 0:6], buf[:, 5:8]) and overlaps(buf, buf) and overlaps(buf[:, 4:8], buf[:, 7:8])
    assert not overlaps(buf[:1], buf[1:])  # different images
    assert not overlaps(buf, torch.zeros_like(buf))  # different allocations
    flat = torch.zeros(16)
    half = flat.view(torch.float16)  # the same bytes as another element size: compared as byte ranges
    assert overlaps(half[:8], flat[:4]) and overlaps(half[7:9], flat[3:5]) and not overlaps(half[8:16], flat[:4])


# --- conv_bn_act(out=...) refuses overlaps, naming the argument -----------------------------
def test_out_is_x():
    x = _nhwc(1, 4, 3, 3)
    w = torch.randn(4, 4, 1, 1, device=DEV)
    with pytest.raises(ValueError, match="out overlaps x"):
        conv_bn_act(x, w, out=x)


def test_out_is_residual():
    x, r = _nhwc(1, 4, 3, 3), _nhwc(1, 4, 3, 3)
    w = torch.randn(4, 4, 3, 3, device=DEV)
    with pytest.raises(ValueError, match="out overlaps residual"):
        conv_bn_act(x, w, None, None, r, padding=1, out=r)


def test_out_overlaps_x_partially():
    """Same strides, storage offsets 20 elements apart: the tail of x is the head of out."""
    flat = torch.randn(2 * 4 * 3 * 3 + 20, device=DEV)
    x = flat[:72].view(2, 4, 3, 3)
    out = flat[20:92].view(2, 4, 3, 3)
    w = torch.randn(4, 4, 1, 1, device=DEV)
    with pytest.raises(ValueError, match="out overlaps x"):
        conv_bn_act(x, w, out=out)


def test_out_channel_view_overlaps_x_channels():
    buf = _nhwc(2, 10, 3, 3)
    w = torch.randn(4, 4, 1, 1, device=DEV)
    with pytest.raises(ValueError, match="out overlaps x"):
        conv_bn_act(buf[:, 0:4], w, out=ChannelView(buf, 2, 1, 4))  # channels 2, 3 in both
    with pytest.raises(ValueError, match="out overlaps x"):
        conv_bn_act(buf[:, 0:8:2], w, out=ChannelView(buf, 2, 2, 4))  # channels 2, 4, 6 in both


def test_out_overlaps_weight_or_scale():
    store = torch.randn(2 * 4 * 3 * 3 + 16, device=DEV)
    x = torch.randn(2, 4, 3, 3, device=DEV)
    w = store[:16].view(4, 4, 1, 1)
    with pytest.raises(ValueError, match="out overlaps weight"):
        conv_bn_act(x, w, out=store[8:80].view(2, 4, 3, 3))
    scale = store[72:76]
    with pytest.raises(ValueError, match="out overlaps scale"):
        conv_bn_act(x, torch.randn(4, 4, 1, 1, device=DEV), scale, out=store[16:88].view(2, 4, 3, 3))


# --- ...and accepts disjoint channel views of one buffer -----------------------------------
@needs_triton
def test_disjoint_channel_ranges_of_one_buffer_run():
    """x = channels 0..4, residual = 4..8, out = 8..12 of one NaN-free NHWC buffer."""
    buf = _nhwc(2, 12, 3, 4)
    buf[:, 8:12] = float("nan")
    before = buf.clone()
    w, bias = torch.randn(4, 4, 1, 1, device=DEV) / 2, torch.randn(4, device=DEV)
    ref = _ref(buf[:, 0:4], w, bias, buf[:, 4:8])
    out = conv_bn_act(buf[:, 0:4], w, None, bias, buf[:, 4:8], out=ChannelView(buf, 8, 1, 4))
    assert out.data_ptr() == buf[:, 8:12].data_ptr()
    assert_matches(out, ref)
    assert torch.equal(buf[:, :8], before[:, :8])


@needs_triton
def test_interleaved_channel_views_of_one_buffer_run():
    """x = even channels, out = odd channels (step 2) of one NHWC buffer: a 3x3 conv reading
    every pixel's even channels while writing its odd ones."""
    buf = _nhwc(2, 8, 4, 3)
    buf[:, 1::2] = float("nan")
    before = buf.clone()
    w = torch.randn(4, 4, 3, 3, device=DEV) / 6
    x = buf[:, 0::2]
    ref = F.conv2d(x.double(), w.double(), padding=1)
    out = conv_bn_act(x, w, padding=1, act="relu", out=ChannelView(buf, 1, 2))
    assert_matches(out, F.relu(ref))
    assert torch.equal(buf[:, 0::2], before[:, 0::2])
