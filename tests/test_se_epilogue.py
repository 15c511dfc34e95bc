"""The SE squeeze riding the producing conv's epilogue.

``conv_bn_act_with_channel_sums`` (the GEMM kernel's ``CH_SUM`` epilogue: per-(image, pixel
block) fp32 channel sums of the stored output), ``se_gate_from_sums`` and the converter's
``SEEpilogueStep`` (an SE bottleneck's conv3 + bn3 → SE → + shortcut → act with no pool pass).
"""
import pytest
import torch
from torch import nn

import effops
import effops.nn.se  # noqa: F401 - registers the squeeze-excite block rule
from effops.nn.traced import traced_forward_of
from effops.ops import reference, se as se_ops
from effops.ops.conv import conv_bn_act, conv_bn_act_with_channel_sums
from effops.ops.se import se_gate, se_gate_from_sums

from helpers import KERNEL_DEVICE, assert_matches, count_dispatch, needs_triton, randomize_bn, rel_err

SE_POOL_OPS = {"aten::mean", "aten::adaptive_avg_pool2d", "aten::_adaptive_avg_pool2d", "aten::avg_pool2d"}


def _conv_args(k, C_in, C_out, dtype, groups=1):
    g = torch.Generator().manual_seed(k * 100 + C_out)
    w = (torch.randn(C_out, C_in // groups, k, k, generator=g) / (C_in // groups * k * k) ** 0.5).to(dtype)
    scale = torch.rand(C_out, generator=g) + 0.5
    bias = torch.randn(C_out, generator=g) * 0.1
    return [t.to(KERNEL_DEVICE) for t in (w, scale, bias)]


def _input(N, C, H, dtype, nhwc):
    x = torch.randn(N, C, H, H, generator=torch.Generator().manual_seed(N * 10 + H)).to(dtype).to(KERNEL_DEVICE)
    return x.contiguous(memory_format=torch.channels_last) if nhwc else x


# (kernel size, batch, H = W, NHWC, dtype, groups, residual + act): every size, layout and dtype
# at least once, 1x1 and 3x3 each with batch 1 and 3, kept few (the interpreter is slow).
CASES = [
    (1, 1, 7, False, torch.float32, 1, False),
    (3, 3, 13, True, torch.float32, 1, True),
    (1, 3, 13, True, torch.float16, 1, False),
    (3, 1, 13, False, torch.float16, 1, True),
    (1, 3, 7, False, torch.bfloat16, 1, True),
    (3, 1, 7, True, torch.bfloat16, 1, False),
    (3, 3, 7, True, torch.float32, 8, False),  # depthwise: runs the GEMM kernel
]


@needs_triton
@pytest.mark.parametrize("k,N,H,nhwc,dtype,groups,res", CASES)
def test_channel_sums_match_the_pool(k, N, H, nhwc, dtype, groups, res):
    C_in, C_out = 8, (8 if groups > 1 else 12)
    x = _input(N, C_in, H, dtype, nhwc)
    w, scale, bias = _conv_args(k, C_in, C_out, dtype, groups)
    r = _input(N, C_out, H, dtype, nhwc) if res else None
    kw = dict(padding=k // 2, groups=groups, act="relu" if res else "identity")
    with effops.use_backend("triton"):
        y, psum, num_hb = conv_bn_act_with_channel_sums(x, w, scale, bias, r, **kw)
        plain = conv_bn_act(x, w, scale, bias, r, **kw)
        pool, pool_hb = se_ops._launch_pool(y)
    # The sums change nothing about the output: it is the plain conv's, to the dtype's rule against
    # float64 (not bit for bit: under the interpreter each tile product is a numpy matmul whose
    # summation order can depend on the tile's rows, and channel sums tile rows per image).
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = reference.conv_scale_bias_act(d(x), d(w), d(scale), d(bias), d(r), padding=(k // 2, k // 2),
                                          groups=groups, act=kw["act"])
    assert_matches(y, ref64, plain)
    assert_matches(plain, ref64, plain)
    assert psum.dtype == torch.float32 and psum.shape == (N * num_hb, C_out)
    totals = psum.view(N, num_hb, C_out).sum(1)
    ref = y.double().sum((2, 3))
    # fp32 rule: each an fp32 sum of the same stored values, in its own order.
    assert rel_err(totals, ref) <= 1e-5
    assert rel_err(totals, pool.view(N, pool_hb, C_out).sum(1).double()) <= 1e-5


@needs_triton
def test_channel_sums_deterministic_and_empty():
    x = _input(3, 8, 13, torch.float16, True)
    w, scale, bias = _conv_args(1, 8, 12, torch.float16)
    with effops.use_backend("triton"):
        a = conv_bn_act_with_channel_sums(x, w, scale, bias, act="silu")
        b = conv_bn_act_with_channel_sums(x, w, scale, bias, act="silu")
        assert a[2] == b[2] and a[2] > 1  # several pixel blocks per image
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        y, psum, num_hb = conv_bn_act_with_channel_sums(x[:0], w, scale, bias)
    assert y.shape == (0, 12, 13, 13) and psum.shape == (0, 12) and num_hb == 1
    with pytest.raises(ValueError, match="channels"):
        conv_bn_act_with_channel_sums(x[:, :4], w, scale, bias)


def test_channel_sums_reference_backend():
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    w, scale, bias = (t.double().cpu() for t in _conv_args(3, 6, 4, torch.float32))
    with effops.use_backend("reference"):
        y, psum, num_hb = conv_bn_act_with_channel_sums(x, w, scale, bias, padding=1)
    assert num_hb == 1 and psum.dtype == torch.float64
    torch.testing.assert_close(psum, y.sum((2, 3)), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="inference-only"):
        conv_bn_act_with_channel_sums(x, w.requires_grad_(), scale, bias, padding=1)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "reference"])
def test_gate_from_sums_matches_se_gate(backend):
    N, C, R = 3, 12, 4
    y = torch.randn(N, C, 7, 7, generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE)
    rw, rb = torch.randn(R, C, 1, 1).to(KERNEL_DEVICE) * 0.3, torch.randn(R).to(KERNEL_DEVICE)
    ew, eb = torch.randn(C, R, 1, 1).to(KERNEL_DEVICE) * 0.3, torch.randn(C).to(KERNEL_DEVICE)
    ref = se_gate(y.double(), rw.double(), rb.double(), ew.double(), eb.double())
    with effops.use_backend(backend):
        num_hb = 3
        psum = torch.stack([y[:, :, :2].sum((2, 3)), y[:, :, 2:5].sum((2, 3)), y[:, :, 5:].sum((2, 3))], 1)
        g = se_gate_from_sums(y, psum.reshape(N * num_hb, C), num_hb, rw, rb, ew, eb)
    assert g.dtype == torch.float32
    assert_matches(g, ref)
    with pytest.raises(ValueError, match="psum"):
        se_gate_from_sums(y, psum.reshape(N * num_hb, C)[1:], num_hb, rw, rb, ew, eb)


def _bottleneck():
    from timm.models.resnet import Bottleneck

    # inplanes 16 = planes 4 * expansion 4: an identity shortcut; SE 16 → 8 → 16.
    return randomize_bn(Bottleneck(16, 4, attn_layer="se")).eval()


@needs_triton
def test_se_bottleneck_squeeze_rides_conv3(monkeypatch):
    model = _bottleneck()
    fast = effops.optimize(model)
    steps = [type(traced_forward_of(fast).graph_module.get_submodule(n.target)).__name__
             for n in traced_forward_of(fast).graph_module.graph.nodes
             if n.op == "call_module" and n.target.startswith("_effops_step")]
    assert steps[-1] == "SEEpilogueStep" and "SEResidualStep" not in steps, steps
    what = [e.what for e in fast.effops_report.swapped if e.what.startswith("SE gate + residual")]
    assert len(what) == 1 and "the squeeze rides the conv's epilogue" in what[0], str(fast.effops_report)
    x = torch.randn(2, 16, 7, 7).to(KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref64 = model.double()(x.double())
    model.float()
    pools = []
    launch_pool = se_ops._launch_pool
    monkeypatch.setattr(se_ops, "_launch_pool", lambda t: pools.append(t.shape) or launch_pool(t))
    calls = count_dispatch(monkeypatch)
    with torch.no_grad(), effops.use_backend("triton"), \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fast(x)
    assert_matches(out, ref64)
    assert pools == [] and "se_gate" not in calls and calls.count("se_apply") == 1, (pools, calls)
    names = [e.name for e in prof.events()]
    assert not [n for n in names if n in SE_POOL_OPS or "se_pool" in n], names
    # A hook on the SE: the modules run (the hook sees the SE's output), same result.
    seen = []
    h = fast.se.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad(), effops.use_backend("triton"):
        assert_matches(fast(x), ref64)
    assert seen == [(2, 16, 7, 7)]
    h.remove()
    # Gradients wanted: the registered ops (the SE's own pool), same result.
    pools.clear()
    with effops.use_backend("triton"):
        out = fast(x)
    assert out.requires_grad and len(pools) == 1
    assert_matches(out.detach(), ref64)


def test_se_bottleneck_compiles_without_graph_breaks():
    """Under torch.compile the step runs the conv and the SE's own (registered, traceable) ops."""
    model = _bottleneck()
    fast = effops.optimize(model)
    assert "the squeeze rides the conv's epilogue" in str(fast.effops_report)
    x = torch.randn(1, 16, 5, 5)
    with torch.no_grad(), effops.use_backend("reference"):
        ref64 = model.double()(x.double())
        y = torch.compile(fast, backend="aot_eager", fullgraph=True)(x)
    assert_matches(y, ref64)


@pytest.mark.skipif(not effops.native.available() or effops.dispatch.CPU_PREFERENCE != "native",
                    reason="the native CPU backend's path (not in the EFFOPS_CPU_BACKEND=triton pass)")
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("gemm", [True, False], ids=["gemm", "onednn"])
def test_se_bottleneck_native_pools_in_the_gemm(batch, gemm, monkeypatch):
    """On the native CPU backend the SE squeeze rides the 1×1 conv3's GEMM (``pool=``: each image's
    channel means summed as the tiles are stored), the excitation reads the means, and one in-place
    se_apply adds the shortcut: no pool pass, no se_gate over the tensor; float64-exact to the fp32
    rule. The first call plans the conv (the usual path); later calls take the pooled one. Where
    oneDNN runs the conv (``onednn``), the means come from one pass after it: same result."""
    from effops.native import module as native_module

    model = _bottleneck()
    fast = effops.optimize(model, check_speed=False)
    x = torch.randn(batch, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref64 = model.double()(x.double())
    model.float()
    nat = native_module()
    policy = nat.pointwise_policy()
    nat.set_pointwise_policy(1 if gemm else 0)  # every 1x1 conv on the GEMM / on oneDNN (not measured)
    try:
        _pooled_calls(fast, x, ref64, nat, monkeypatch, gemm)
    finally:
        nat.set_pointwise_policy(policy)


def _pooled_calls(fast, x, ref64, nat, monkeypatch, gemm):
    seen = []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(nat, name)
            # (conv_bn_act_segments' last argument is ``pool``: the means its GEMM fills)
            return lambda *a, **k: (seen.append((name, isinstance(a[-1], torch.Tensor))), fn(*a, **k))[1]

    with torch.no_grad():
        assert_matches(fast(x), ref64)  # plans the convs
        monkeypatch.setattr("effops.nn.traced.native_module", lambda: Spy())
        monkeypatch.setattr("effops.nn.conv_bn_act.native_module", lambda: Spy())
        calls = count_dispatch(monkeypatch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = fast(x)
    assert_matches(out, ref64)
    assert ("conv_bn_act_segments", True) in seen and ("se_gate_of_means", False) in seen, seen
    assert "se_gate" not in calls and calls.count("se_apply") == 1, calls
    names = [e.name for e in prof.events()]
    assert "effops::se_gate" not in names and ("effops::aggregate_gemm" in names) == gemm, names
    if gemm:
        assert not [n for n in names if n in SE_POOL_OPS], names
