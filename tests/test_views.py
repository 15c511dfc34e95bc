import pytest
import torch
import torch.nn.functional as F

from effops import ChannelView
from effops.ops import conv_bn_act

from helpers import KERNEL_DEVICE, needs_triton, rel_err


def test_view_is_a_strided_slice():
    buf = torch.randn(2, 10, 3, 4).contiguous(memory_format=torch.channels_last)
    v = ChannelView(buf, offset=1, step=3)
    assert v.channels == 3 and v.shape == (2, 3, 3, 4)
    t = v.as_tensor()
    assert torch.equal(t, buf[:, 1::3])
    assert t.data_ptr() == buf[:, 1:].data_ptr()  # no copy


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(offset=10), "outside"),
        (dict(step=0), "step"),
        (dict(offset=4, step=2, channels=4), "does not fit"),
    ],
)
def test_view_bad_arguments(kwargs, msg):
    buf = torch.zeros(1, 10, 2, 2)
    with pytest.raises(ValueError, match=msg):
        ChannelView(buf, **kwargs)
    with pytest.raises(ValueError, match="4-D"):
        ChannelView(torch.zeros(10, 2, 2))


@needs_triton
@pytest.mark.parametrize("offset, step", [(3, 1), (1, 2)])
def test_conv_writes_into_channel_view(offset, step):
    """A conv writes its 6 output channels into a slice of a 16-channel NHWC
    buffer; every other channel keeps its NaN poison."""
    dev = KERNEL_DEVICE
    x = torch.randn(2, 5, 7, 9, device=dev).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 5, 3, 3, device=dev) * 0.3
    b = torch.randn(6, device=dev)
    buf = torch.full((2, 16, 7, 9), float("nan"), device=dev).contiguous(memory_format=torch.channels_last)
    view = ChannelView(buf, offset, step, 6)
    out = conv_bn_act(x, w, None, b, padding=1, act="relu", out=view)
    ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1))  # PyTorch, fp64
    idx = list(range(offset, offset + 6 * step, step))
    assert rel_err(buf[:, idx], ref) < 1e-5
    assert out.data_ptr() == buf[:, offset:].data_ptr()
    others = [c for c in range(16) if c not in idx]
    assert torch.isnan(buf[:, others]).all(), "the kernel wrote outside its channel view"


@needs_triton
def test_conv_reads_channel_view_input():
    """The input may itself be a channel view (a split): strides are honoured."""
    dev = KERNEL_DEVICE
    buf = torch.randn(1, 12, 6, 6, device=dev).contiguous(memory_format=torch.channels_last)
    x = ChannelView(buf, 2, 2, 5).as_tensor()
    w = torch.randn(4, 5, 1, 1, device=dev)
    out = conv_bn_act(x, w, act="identity")
    ref = F.conv2d(x.double(), w.double())
    assert rel_err(out, ref) < 1e-5


def test_out_shape_mismatch_is_an_error():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(3, 4, 1, 1)
    buf = torch.zeros(1, 8, 5, 5)
    with pytest.raises(ValueError, match="expected out of shape"):
        conv_bn_act(x, w, out=ChannelView(buf, 0, 1, 4))
