"""64-bit addressing: every kernel on views whose *channel x stride* products pass 2**31.

Each case puts its tensors in one float16 buffer of 2**32 + a few thousand elements
(``torch.empty`` maps it without touching it: 8 GiB of address space, a few pages of
memory) as views whose channel ``c`` lives at ``P + c * CS``: ``CS < 2**31`` (a 32-bit
kernel argument) but ``(C - 1) * CS >= 2**31``, so only the last channel's offset needs
64 bits, while pixel offsets stay tiny. ``needs_int64`` sees it (sum of size x stride),
and the kernels must form ``channel * stride`` in int64. ``P`` is chosen so that an
offset wrapped to 32 bits still lands inside the buffer (in an unused, zeroed region):
without the widening a test reads zeros or writes elsewhere and fails its comparison
instead of crashing. Outputs are NaN-poisoned views, compared element by element with
an fp64 PyTorch reference computed on contiguous copies. Values are small integers
(sums exact in fp16) except where the eSE gate makes them fractional.

Under Triton's interpreter int32 arithmetic wraps as on a GPU; on a GPU the same tests
run on CUDA (8 GiB of device memory).
"""
import pytest
import torch
import torch.nn.functional as F

from effops.ops import conv, osa
from effops.ops.conv import conv_bn_act, needs_int64, tma_eligible

from effops import use_backend
from helpers import KERNEL_DEVICE, TRITON_RUNS, device_branch, needs_triton


@pytest.fixture(autouse=True)
def _triton_kernels():
    """These tests check the Triton kernels' int64 addressing, so they run on the triton backend
    whatever backend CPU tensors prefer (the native backend's views: tests/test_native.py)."""
    if TRITON_RUNS:
        with use_backend("triton"):
            yield
    else:
        yield

pytestmark = needs_triton
DEV = KERNEL_DEVICE
F16 = torch.float16
SLOT = 256  # elements of one tensor inside each channel slab (N * H * W <= SLOT)


class HugeViews:
    """Views of one 2**32 + small element buffer: ``view(j, shape)`` is an (N, C, H, W)
    tensor, pixel-dense within channel slabs ``CS`` elements apart, at slot ``j``."""

    def __init__(self, c_max: int, slots: int = 4):
        assert c_max >= 3  # with 2 channels CS itself would be >= 2**31 (a 64-bit argument)
        self.cs = -(-(2**31) // (c_max - 1) // 64) * 64  # (c_max - 1) * CS >= 2**31 > (c_max - 2) * CS
        assert self.cs < 2**31 and (c_max - 1) * self.cs >= 2**31 > (c_max - 2) * self.cs
        # A 32-bit offset (c_max - 1) * CS - 2**32 < 0 from P lands at >= 0: slot j's wrapped last
        # channel at j * SLOT, which no view uses (zeroed below).
        self.p = 2**32 - (c_max - 1) * self.cs
        assert self.p >= slots * SLOT
        try:
            self.base = torch.empty(2**32 + slots * SLOT, dtype=F16, device=DEV)
        except (RuntimeError, MemoryError) as e:  # pragma: no cover - a machine refusing 8 GiB of address space
            pytest.skip(f"can't map an 8 GiB buffer here: {e}")
        self.base[: slots * SLOT].zero_()

    def view(self, j: int, shape) -> torch.Tensor:
        n, c, h, w = shape
        assert n * h * w <= SLOT
        return torch.as_strided(self.base, shape, (h * w, self.cs, w, 1), self.p + j * SLOT)

    def filled(self, j: int, values: torch.Tensor) -> torch.Tensor:
        v = self.view(j, values.shape)
        v.copy_(values)
        return v

    def poisoned(self, j: int, shape) -> torch.Tensor:
        v = self.view(j, shape)
        v.fill_(float("nan"))
        return v


def ints(*shape, dtype=F16):
    """Nonzero small integers: exact in fp16, and a value read from the wrong place shows."""
    v = torch.randint(1, 3, shape) * (torch.randint(0, 2, shape) * 2 - 1)
    return v.to(dtype).to(DEV)


def check(out: torch.Tensor, ref64: torch.Tensor, rtol=0.0, atol=0.0):
    got = out.double().cpu()
    assert not torch.isnan(got).any(), f"{int(torch.isnan(got).sum())} output elements never written"
    torch.testing.assert_close(got, ref64.cpu(), rtol=rtol, atol=atol)


class Spy:
    """Records the compile-time arguments of every launch of a kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.launches.append(kw)
            return self.kernel[grid](*args, **kw)
        return run

    def __getattr__(self, name):
        return getattr(self.kernel, name)


def spy(monkeypatch, module, name) -> Spy:
    s = Spy(getattr(module, name))
    monkeypatch.setattr(module, name, s)
    return s


def conv_ref(x, w, scale, bias, res=None, groups=1, padding=0, act=None):
    y = F.conv2d(x.double().cpu(), w.double().cpu(), None, 1, padding, 1, groups)
    y = y * scale.double().cpu().view(1, -1, 1, 1) + bias.double().cpu().view(1, -1, 1, 1)
    if res is not None:
        y = y + res.double().cpu()
    return y if act is None else act(y)


def test_huge_views_need_int64_only_for_channel_products():
    hv = HugeViews(3)
    x = hv.view(0, (1, 3, 2, 2))
    assert needs_int64(x)
    assert x.stride(1) < 2**31 <= 2 * x.stride(1)  # a 32-bit argument; channel 2's offset needs 64 bits
    assert not needs_int64(x[:, :1])


@pytest.mark.parametrize("groups", [1, 2], ids=["dense", "grouped"])
def test_conv_pointwise(monkeypatch, groups):
    """POINTWISE GEMM loop: (ci0 + ci) * sxc on the input; co * soc on the output."""
    k = spy(monkeypatch, conv, "_conv_bn_act_kernel")
    hv = HugeViews(4)
    x = hv.filled(0, ints(1, 4, 2, 3))
    out = hv.poisoned(1, (1, 4, 2, 3))
    w = ints(4, 4 // groups, 1, 1)
    scale, bias = ints(4, dtype=torch.float32), ints(4, dtype=torch.float32)
    conv_bn_act(x, w, scale, bias, groups=groups, out=out)
    assert [(m["POINTWISE"], m["IDX64"]) for m in k.launches] == [(True, True)]
    check(out, conv_ref(x, w, scale, bias, groups=groups))


def test_conv_3x3_with_residual(monkeypatch):
    """General K loop (padding, taps): input, residual (co * src) and output channel products."""
    k = spy(monkeypatch, conv, "_conv_bn_act_kernel")
    hv = HugeViews(3)
    x = hv.filled(0, ints(2, 3, 3, 4))
    res = hv.filled(1, ints(2, 3, 3, 4))
    out = hv.poisoned(2, (2, 3, 3, 4))
    w = ints(3, 3, 3, 3)
    scale, bias = ints(3, dtype=torch.float32), ints(3, dtype=torch.float32)
    conv_bn_act(x, w, scale, bias, res, padding=1, act="leaky_relu", act_param=0.5, out=out)
    assert [(m["POINTWISE"], m["IDX64"]) for m in k.launches] == [(False, True)]
    check(out, conv_ref(x, w, scale, bias, res, padding=1, act=lambda y: F.leaky_relu(y, 0.5)))


def test_depthwise(monkeypatch):
    """The depthwise kernel: co * sxc, co * src, co * soc."""
    k = spy(monkeypatch, conv, "_depthwise_kernel")
    hv = HugeViews(3)
    x = hv.filled(0, ints(2, 3, 3, 3))
    res = hv.filled(1, ints(2, 3, 3, 3))
    out = hv.poisoned(2, (2, 3, 3, 3))
    w = ints(3, 1, 3, 3)
    scale, bias = ints(3, dtype=torch.float32), ints(3, dtype=torch.float32)
    conv_bn_act(x, w, scale, bias, res, padding=1, groups=3, residual_after_act=True, out=out)
    assert [m["IDX64"] for m in k.launches] == [True]
    check(out, conv_ref(x, w, scale, bias, res, groups=3, padding=1))


TMA_TILE = dict(TMA=True, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=3)
POINTER_TILE = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=3)


def _tma_problem():
    if DEV == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("this GPU has no TMA (sm_90+)")
    hv = HugeViews(3)
    x = ints(1, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    w = ints(3, 16, 3, 3).contiguous(memory_format=torch.channels_last)  # OHWI
    scale, bias = ints(3, dtype=torch.float32), ints(3, dtype=torch.float32)
    out = hv.poisoned(0, (1, 3, 3, 3))
    args = (x, w, scale, bias, None, out, [1, 1], [1, 1], [1, 1], 1, "identity", 0.0, False)
    # The input side is fine for TMA: only the output's channel offsets need 64 bits.
    assert tma_eligible(x, w, out, [1, 1], [1, 1], 1) and needs_int64(out)
    return hv, args


def test_tma_kernel_refused_for_int64_problems():
    """The TMA kernel addresses in int32 throughout: an explicit TMA tile is refused for a problem
    that needs 64 bits, and an input whose own pixel offsets pass 2**31 is not TMA-eligible."""
    hv, args = _tma_problem()
    with pytest.raises(ValueError, match="TMA kernel"):
        conv._run_triton(*args, config=TMA_TILE)
    assert torch.isnan(args[5].cpu()).all()
    x, w = args[0], args[1]
    small = ints(1, 16, 2, 2).contiguous(memory_format=torch.channels_last)
    out = torch.empty(1, 3, 2, 2, dtype=F16, device=DEV)
    assert tma_eligible(small, w, out, [1, 1], [1, 1], 1)
    # Pixel stride 2**29: (N*H*W + H*W) * stride > 2**31 (TMA coordinates are int32).
    wide = torch.as_strided(hv.base, (1, 16, 2, 2), (4 * 2**29, 1, 2 * 2**29, 2**29), 0)
    assert not tma_eligible(wide, w, out, [1, 1], [1, 1], 1)


def test_tuned_tma_tile_falls_back_to_the_pointer_kernel_for_int64_problems(monkeypatch):
    """On the device path a TMA tile tuned for the same shapes (cached from an int32 call) must
    not run an int64 problem: the launcher takes its pointer-kernel FALLBACK, which gets it right."""
    from effops import tuning

    hv, args = _tma_problem()
    if DEV == "cpu":
        device_branch(monkeypatch, autotune=False)
    monkeypatch.setattr(tuning, "pick", lambda *a, **k: dict(TMA_TILE, FALLBACK=POINTER_TILE))
    tma = []
    monkeypatch.setattr(conv, "_launch_tma", lambda *a: tma.append(a))
    k = spy(monkeypatch, conv, "_conv_bn_act_kernel")
    conv._run_triton(*args)
    assert tma == [] and [(m["IDX64"], m["BLOCK_M"]) for m in k.launches] == [(True, 32)]
    x, w, scale, bias = args[:4]
    check(args[5], conv_ref(x, w, scale, bias, padding=1))


def _agg_ref(x, s, w, scale, bias, act=None):
    y = F.conv2d(torch.cat([x.double(), s.double()], 1).cpu(), w.double().cpu())
    y = y * scale.double().cpu().view(1, -1, 1, 1) + bias.double().cpu().view(1, -1, 1, 1)
    return y if act is None else act(y)


def test_osa_aggregation_flat(monkeypatch):
    """The two-segment K loop (ci * sxc, ci * ssc), the residual (offs_n * src) and the output."""
    k = spy(monkeypatch, osa, "_osa_agg_kernel")
    hv = HugeViews(3)
    x = hv.filled(0, ints(2, 3, 2, 3))
    s = hv.filled(1, ints(2, 3, 2, 3))
    out = hv.poisoned(2, (2, 3, 2, 3))
    w = ints(3, 6, 1, 1)
    scale, bias = ints(3, dtype=torch.float32), ints(3, dtype=torch.float32)
    osa._launch_aggregate((x, s), w, scale, bias, x, out, "identity", 0.0, want_psum=False)
    assert [(m["PER_IMAGE"], m["IDX64"]) for m in k.launches] == [(False, True)]
    check(out, _agg_ref(x, s, w, scale, bias) + x.double().cpu())


def test_osa_aggregation_per_image_ese_and_gate_residual(monkeypatch):
    """eSE path: per-image aggregation (partial sums), the gate, then y * gate + residual in place,
    with the output and the residual huge views (the gate kernel's channel products)."""
    agg = spy(monkeypatch, osa, "_osa_agg_kernel")
    gate = spy(monkeypatch, osa, "_gate_residual_kernel")
    hv = HugeViews(3)
    x = hv.filled(0, ints(2, 3, 3, 3))
    s = hv.filled(1, ints(2, 3, 3, 3))
    res = hv.filled(2, ints(2, 3, 3, 3))
    out = hv.poisoned(3, (2, 3, 3, 3))
    w = ints(3, 6, 1, 1)
    scale, bias = ints(3, dtype=torch.float32), ints(3, dtype=torch.float32)
    ese_w, ese_b = torch.randn(3, 3, 1, 1, device=DEV), torch.randn(3, device=DEV)
    psum, num_hb = osa._launch_aggregate((x, s), w, scale, bias, None, out, "relu", 0.0, want_psum=True)
    osa._launch_ese(out, psum, num_hb, ese_w, ese_b, res)
    assert [(m["PER_IMAGE"], m["IDX64"]) for m in agg.launches] == [(True, True)]
    assert [m["IDX64"] for m in gate.launches] == [True]
    y = _agg_ref(x, s, w, scale, bias, F.relu)
    g = F.hardsigmoid(F.conv2d(y.mean((2, 3), keepdim=True), ese_w.double().cpu(), ese_b.double().cpu()))
    y16 = y.to(F16).double()  # the aggregation stores y in fp16 before the gate pass reads it back
    check(out, y16 * g + res.double().cpu(), rtol=2e-3, atol=2e-3)


def test_osa_dw_pw(monkeypatch):
    """Depthwise 3x3 inside the 1x1's K loop: ci * sxc on the input, offs_n * soc on the output."""
    k = spy(monkeypatch, osa, "_dw_pw_kernel")
    hv = HugeViews(3)
    x = hv.filled(0, ints(2, 3, 3, 3))
    out = hv.poisoned(1, (2, 3, 3, 3))
    dw_w = ints(3, 1, 3, 3)
    pw_w = ints(3, 3, 1, 1)
    scale, bias = ints(3, dtype=torch.float32), ints(3, dtype=torch.float32)
    osa._launch_dw_pw(x, dw_w, pw_w, scale, bias, out, "identity", 0.0)
    assert [m["IDX64"] for m in k.launches] == [True]
    dw = F.conv2d(x.double().cpu(), dw_w.double().cpu(), None, 1, 1, 1, 3)
    check(out, conv_ref(dw, pw_w, scale, bias))


def test_osa_block_public_entry(monkeypatch):
    """``osa_block`` with an eSE + identity block whose input is a huge view: the stage conv, the
    aggregation's x segment and the gate pass's residual read all take x's channel products."""
    agg = spy(monkeypatch, osa, "_osa_agg_kernel")
    hv = HugeViews(3)
    x = hv.filled(0, ints(1, 3, 2, 3))
    mid_w, mid_b = ints(2, 3, 3, 3), ints(2, dtype=torch.float32)
    agg_w, agg_b = ints(3, 5, 1, 1), ints(3, dtype=torch.float32)
    ese_w, ese_b = torch.randn(3, 3, 1, 1, device=DEV), torch.randn(3, device=DEV)
    y = osa.osa_block(x, [mid_w], [mid_b], agg_w, agg_b, ese_w=ese_w, ese_b=ese_b, identity=True, act="relu")
    assert [m["IDX64"] for m in agg.launches] == [True]
    x64 = x.double().cpu()
    f1 = F.relu(F.conv2d(x64, mid_w.double().cpu(), mid_b.double().cpu(), padding=1)).to(F16).double()
    a = F.relu(F.conv2d(torch.cat([x64, f1], 1), agg_w.double().cpu(), agg_b.double().cpu()))
    g = F.hardsigmoid(F.conv2d(a.mean((2, 3), keepdim=True), ese_w.double().cpu(), ese_b.double().cpu()))
    check(y, a.to(F16).double() * g + x64, rtol=2e-3, atol=2e-3)
