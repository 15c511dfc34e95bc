"""Channel shuffle (``effops.channel_shuffle``, ``effops.ChannelShuffle``): a permutation, so
every result is compared bit for bit with PyTorch's ``F.channel_shuffle`` (the
view -> transpose -> reshape of ShuffleNet).

Groups 2/3/4/8; batch 1 and 3; 1x1, 7x7, 13x13 images; NCHW, NHWC and channel-view inputs;
output into a channel view of a NaN-poisoned buffer; float32/16/bf16 on the Triton kernel,
float64 and integers on the reference backend; 64-bit addressing; errors; gradients;
torch.compile; opcheck; the device-branch tiles; ``effops.optimize`` swapping
``nn.ChannelShuffle``.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effops
from effops.ops.conv import native_fast
from effops import ChannelView, dispatch
from effops.ops import conv, shuffle
from effops.ops.shuffle import channel_shuffle

from helpers import DTYPES, KERNEL_DEVICE, count_dispatch, device_branch, needs_triton

DEV = KERNEL_DEVICE


def _input(layout, n, c, h, w, dtype=torch.float32):
    """``layout``: "nchw", "nhwc", or "view" (channels 1, 3, 5, ... of an NHWC buffer)."""
    if layout == "view":
        buf = torch.randn(n, 2 * c + 1, h, w, device=DEV).to(dtype).contiguous(memory_format=torch.channels_last)
        return buf[:, 1::2][:, :c]
    x = torch.randn(n, c, h, w, device=DEV).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x


def _expected(x, groups):
    return F.channel_shuffle(x.contiguous(), groups)


def test_reference_matches_pytorch_convention():
    x = torch.arange(12.0).view(1, 12, 1, 1)
    # out[:, c] = x[:, (c % g) * (C // g) + c // g]
    idx = [(c % 3) * 4 + c // 3 for c in range(12)]
    assert effops.ops.reference.channel_shuffle(x, 3).flatten().tolist() == [float(i) for i in idx]
    assert torch.equal(_expected(x, 3).flatten(), torch.tensor(idx, dtype=torch.float32))


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "view"])
@pytest.mark.parametrize("groups, n, hw, cpg", [(2, 1, 1, 3), (3, 3, 7, 5), (4, 1, 13, 2), (8, 3, 7, 3)])
def test_matches_pytorch_exactly(groups, n, hw, cpg, layout):
    x = _input(layout, n, groups * cpg, hw, hw)
    with effops.use_backend("triton"):
        y = channel_shuffle(x, groups)
    assert torch.equal(y, _expected(x, groups))
    # Output in the input's memory format (NHWC for an NHWC buffer's channel view too).
    assert y.is_contiguous(memory_format=torch.contiguous_format if layout == "nchw" else torch.channels_last)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_dtypes_bit_exact(dtype, layout):
    x = _input(layout, 3, 12, 7, 7, dtype)
    x[1, :3, 2, 2] = torch.tensor([float("inf"), -0.0, float("nan")], dtype=dtype)
    with effops.use_backend("triton"):
        y = channel_shuffle(x, 4)
    ref = _expected(x, 4)
    assert y.dtype == dtype
    # Bit patterns, so NaN and -0.0 compare too.
    assert torch.equal(y.contiguous().view(torch.int16 if dtype != torch.float32 else torch.int32),
                       ref.view(torch.int16 if dtype != torch.float32 else torch.int32))


@needs_triton
@pytest.mark.parametrize("out_layout", ["view", "nchw"])
def test_out_into_channel_view_of_poisoned_buffer(out_layout):
    x = _input("nhwc", 3, 6, 13, 13)
    if out_layout == "view":
        buf = torch.full((3, 15, 13, 13), float("nan"), device=DEV).contiguous(memory_format=torch.channels_last)
        view = ChannelView(buf, 2, 2, 6)  # channels 2, 4, ..., 12
        with effops.use_backend("triton"):
            r = channel_shuffle(x, 3, out=view)
        dst = view.as_tensor()
        assert r.data_ptr() == dst.data_ptr()
        assert torch.equal(dst, _expected(x, 3))
        untouched = torch.ones(15, dtype=torch.bool)
        untouched[2:13:2] = False
        assert buf[:, untouched].isnan().all()  # only the view was written
    else:
        dst = torch.full((3, 6, 13, 13), float("nan"), device=DEV)
        with effops.use_backend("triton"):
            r = channel_shuffle(ChannelView.of(x), 3, out=dst)
        assert r is dst and torch.equal(dst, _expected(x, 3))


@needs_triton
def test_device_branch_tiles(monkeypatch):
    """The GPU path's heuristic tiles (pixel-long for NCHW, channel-wide for NHWC), run under the interpreter."""
    device_branch(monkeypatch, autotune=False)
    for layout in ("nchw", "nhwc", "view"):
        x = _input(layout, 3, 24, 7, 7)
        with effops.use_backend("triton"):
            assert torch.equal(channel_shuffle(x, 8), _expected(x, 8)), layout


@needs_triton
def test_int64_addressing():
    """Input and output as views whose last channel lies past 2**31 elements (see test_int64.py):
    32-bit offsets would wrap into a zeroed region and the comparison would fail."""
    from test_int64 import HugeViews

    hv = HugeViews(4)
    vals = torch.arange(1, 17, dtype=torch.float16, device=DEV).view(1, 4, 2, 2)
    x = hv.filled(0, vals)
    out = hv.view(1, (1, 4, 2, 2))
    out.fill_(float("nan"))
    assert conv.needs_int64(x, out)
    with effops.use_backend("triton"):
        channel_shuffle(x, 2, out=out)
        y = channel_shuffle(x, 2)
    ref = F.channel_shuffle(vals, 2)
    assert torch.equal(out.cpu(), ref.cpu()) and torch.equal(y.cpu(), ref.cpu())


def test_float64_and_integers_run_the_reference_backend():
    for dtype in (torch.float64, torch.int64, torch.uint8):
        x = torch.randint(0, 100, (1, 6, 3, 3), device=DEV).to(dtype)
        assert dispatch.reasons("channel_shuffle", x, 2, None)["triton"], dtype
        assert torch.equal(channel_shuffle(x, 2), _expected(x, 2))


def test_errors():
    x = torch.randn(1, 6, 2, 2, device=DEV)
    with pytest.raises(ValueError, match="4-D"):
        channel_shuffle(x[0], 2)
    with pytest.raises(ValueError, match="groups >= 1, got 0"):
        channel_shuffle(x, 0)
    with pytest.raises(ValueError, match="6 channels are not divisible by groups=4"):
        channel_shuffle(x, 4)
    with pytest.raises(TypeError, match="int"):
        channel_shuffle(x, 2.0)
    with pytest.raises(TypeError, match="torch.bool"):
        channel_shuffle(x > 0, 2)
    with pytest.raises(ValueError, match=r"out of shape \(1, 6, 2, 2\)"):
        channel_shuffle(x, 2, out=torch.empty(1, 6, 2, 3, device=DEV))
    with pytest.raises(TypeError, match="float16"):
        channel_shuffle(x, 2, out=torch.empty(1, 6, 2, 2, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="overlaps the input"):
        channel_shuffle(x, 2, out=x)
    buf = torch.randn(1, 12, 2, 2, device=DEV).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="overlaps the input"):  # interleaved views sharing channel 4
        channel_shuffle(buf[:, 0:6], 2, out=ChannelView(buf, 4, 1, 6))
    with pytest.raises(RuntimeError, match="autograd"):
        channel_shuffle(x.requires_grad_(), 2, out=torch.empty(1, 6, 2, 2, device=DEV))


def test_disjoint_interleaved_out_is_allowed():
    buf = torch.randn(1, 12, 2, 2, device=DEV).contiguous(memory_format=torch.channels_last)
    src = buf[:, 0::2].clone()
    channel_shuffle(buf[:, 0::2], 3, out=ChannelView(buf, 1, 2, 6))
    assert torch.equal(buf[:, 1::2], _expected(src, 3))


def test_gradcheck_reference_fp64():
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, device=DEV, requires_grad=True)
    with effops.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda t: channel_shuffle(t, 3), (x,))
        assert torch.autograd.gradgradcheck(lambda t: channel_shuffle(t, 2), (x,))


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gradient_triton(layout):
    x = _input(layout, 2, 12, 3, 3).requires_grad_()
    g = torch.randn(2, 12, 3, 3, device=DEV)
    with effops.use_backend("triton"):
        (channel_shuffle(x, 3) * g).sum().backward()
    xr = x.detach().clone().requires_grad_()
    (F.channel_shuffle(xr, 3) * g).sum().backward()
    assert torch.equal(x.grad, xr.grad)
    assert torch.equal(x.grad, F.channel_shuffle(g, 4))  # the inverse shuffle has C // groups groups


@needs_triton
def test_torch_compile_fullgraph(monkeypatch):
    calls = count_dispatch(monkeypatch)

    def f(x, dst):
        y = channel_shuffle(x, 4).relu()
        channel_shuffle(y, 2, out=dst)
        return y, dst

    x = _input("nhwc", 1, 8, 3, 3)
    dst = torch.empty(1, 8, 3, 3, device=DEV)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, d = compiled(x, dst)
    assert calls.count("channel_shuffle") == 2  # both ran as effops ops, not traced through
    ry = _expected(x, 4).relu()
    assert torch.equal(y, ry) and torch.equal(d, _expected(ry, 2))
    assert y.is_contiguous(memory_format=torch.channels_last)


@needs_triton
def test_opcheck():
    x = torch.randn(1, 6, 2, 3, device=DEV, requires_grad=True)
    torch.library.opcheck(shuffle._OP, (x, 3))
    torch.library.opcheck(shuffle._OUT_OP, (x.detach(), 2, torch.empty(1, 6, 2, 3, device=DEV)))


class _Unit(nn.Module):
    """A ShuffleNet-style unit with a hand-written forward holding an nn.ChannelShuffle child."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.shuffle = nn.ChannelShuffle(4)

    def forward(self, x):
        return self.shuffle(torch.relu(self.bn(self.conv(x)))) + x


def test_module_is_a_drop_in():
    m = effops.ChannelShuffle(3)
    assert isinstance(m, nn.ChannelShuffle) and m.groups == 3 and len(m.state_dict()) == 0
    assert list(m.parameters()) == [] and "groups=3" in repr(m)
    x = torch.randn(2, 6, 3, 3, device=DEV)
    assert torch.equal(m(x), nn.ChannelShuffle(3)(x))
    x3 = torch.randn(2, 6, 5, device=DEV)  # other ranks: PyTorch's own shuffle
    assert torch.equal(m(x3), nn.ChannelShuffle(3)(x3))


@needs_triton
def test_optimize_swaps_channel_shuffle(monkeypatch):
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ChannelShuffle(2), _Unit()).eval()
    x = torch.randn(1, 4, 5, 5, device=DEV)
    with torch.no_grad():
        ref = model.to(DEV)(x)
    fast = effops.optimize(model)
    assert type(model[3]) is nn.ChannelShuffle  # the original is untouched
    assert type(fast[3]) is effops.ChannelShuffle and type(fast[4].shuffle) is effops.ChannelShuffle
    assert fast[4].shuffle.groups == 4
    swapped = {e.path: e.what for e in fast.effops_report.swapped}
    assert swapped["3"] == "channel shuffle g=2" and swapped["4.shuffle"] == "channel shuffle g=4"
    assert fast.state_dict().keys() == model.state_dict().keys()
    calls = count_dispatch(monkeypatch)
    with torch.no_grad():
        out = fast(x)
    # Both shuffles follow a fused conv, so each conv writes its output shuffled: no shuffle pass.
    # (The native CPU path calls the extension directly: no dispatcher call at all.)
    assert calls == ([] if DEV == "cpu" and native_fast(x) else ["conv_bn_act", "conv_bn_act"])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    again = effops.optimize(fast)  # already swapped: not reported twice
    assert not any("channel shuffle" in e.what for e in again.effops_report.swapped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "view"])
def test_reference_backend_equals_the_specification(layout, dtype):
    """The reference backend runs ATen's channel_shuffle: bit for bit reference.channel_shuffle,
    in output_format(x), for every dtype, channel views included; out= too."""
    base = torch.randn(3, 16, 5, 7) * 10
    x = base.to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "view":
        x = x.contiguous(memory_format=torch.channels_last)[:, 2:14]
    with torch.no_grad(), effops.use_backend("reference"):
        for g in (2, 3, 4):
            if x.shape[1] % g:
                continue
            y = channel_shuffle(x, g)
            assert y.dtype == dtype and torch.equal(y, effops.ops.reference.channel_shuffle(x, g))
            assert y.is_contiguous(memory_format=effops.ops.conv.output_format(x))
            out = torch.empty_like(y)
            channel_shuffle(x, g, out=out)
            assert torch.equal(out, y)
