"""FusedRepVGGBlock against timm's RepVggBlock: the fp64 merge against timm's own
re-parameterisation, the merge op (effops::reparam_merge: Triton kernel and reference backend
bit for bit against merge_branches), eval on both backends, train, gradients, state_dict,
freshness, hooks, autocast, replaced children, bad input, the converter rule, and repvgg_a2 whole."""
import copy
import math

import pytest
import torch
from torch import nn

import effops
from effops.nn.common import BLOCK_RULES
from effops import dispatch
from effops.nn.repvgg import FusedRepVGGBlock, merge_branches
from effops.ops import reference, reparam
from effops.ops.conv import needs_int64

from helpers import (
    KERNEL_DEVICE, assert_matches, assert_same_state_and_grads, count_dispatch, needs_triton, randomize_bn,
    rel_err)

timm = pytest.importorskip("timm")
from timm.layers import get_attn  # noqa: E402
from timm.models.byobnet import LayerFn, RepVggBlock  # noqa: E402

DEV = KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """One intra-op thread: with ``-n 2`` each worker has a core (two OpenMP threads per worker
    spin against each other under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


VARIANTS = {
    "identity": lambda: RepVggBlock(6, 6),                        # 3x3 + 1x1 + identity
    "stride2": lambda: RepVggBlock(5, 7, stride=2),               # 3x3 + 1x1, no identity
    "groups": lambda: RepVggBlock(8, 8, group_size=2),            # groups 4: identity on each group's diagonal
    "se": lambda: RepVggBlock(8, 8, layers=LayerFn(attn=get_attn("se"))),  # conv → SE → act
    "dilated": lambda: RepVggBlock(6, 6, dilation=(2, 2)),
    "deployed": lambda: _deployed(RepVggBlock(6, 6)),
}


def _deployed(m):
    randomize_bn(m).eval().reparameterize()
    return m


def _orig(variant):
    m = randomize_bn(VARIANTS[variant]())
    return m.eval().to(DEV)


def _x(c, n=2, h=7, w=7, dtype=torch.float32, channels_last=True, device=DEV):
    x = torch.randn(n, c, h, w, device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# -- the merge itself ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["identity", "stride2", "groups", "dilated"])
def test_merge_equals_timm_reparameterize_and_the_branch_sum(variant):
    ref = _orig(variant).cpu()
    fused = FusedRepVGGBlock.from_module(copy.deepcopy(ref))
    with torch.no_grad():
        w64, b64 = fused.merged_weight_bias(torch.float64)
        deployed = copy.deepcopy(ref)
        deployed.reparameterize()  # timm's own merge, in fp32
        torch.testing.assert_close(w64.float(), deployed.reparam_conv.weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b64.float(), deployed.reparam_conv.bias, rtol=1e-6, atol=1e-6)
        # ...and in fp64 exactly the sum of the three branches (before the activation).
        m64 = copy.deepcopy(ref).double()
        x = torch.randn(2, fused.in_chs, 6, 5, dtype=torch.float64)
        c = m64.conv_kxk.conv
        want = m64.conv_kxk(x) + m64.conv_1x1(x) + (m64.identity(x) if m64.identity is not None else 0)
        got = torch.nn.functional.conv2d(x, w64, b64, c.stride, c.padding, c.dilation, c.groups)
        assert rel_err(got, want) < 1e-14
    w32, b32 = fused.merged_weight_bias(torch.float16, torch.channels_last)
    assert w32.dtype == torch.float16 and b32.dtype == torch.float32
    assert w32.is_contiguous(memory_format=torch.channels_last)


def test_merge_branches_smaller_kernels_are_centred():
    """A 5x5 + 3x3 + 1x1 + identity merge (MobileOne/GhostNetV3-style branch sets)."""
    convs = [nn.Conv2d(4, 4, k, padding=k // 2, groups=2, bias=False).double() for k in (5, 3, 1)]
    bns = [randomize_bn(nn.BatchNorm2d(4)).double().eval() for _ in range(4)]
    state = lambda bn: (None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)  # noqa: E731
    with torch.no_grad():
        w, b = merge_branches([(c.weight, state(bn)) for c, bn in zip(convs, bns)], state(bns[3]), groups=2)
        x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
        want = sum(bn(c(x)) for c, bn in zip(convs, bns)) + bns[3](x)
        assert rel_err(torch.nn.functional.conv2d(x, w, b, padding=2, groups=2), want) < 1e-14


# -- the merge op: effops::reparam_merge --------------------------------------------------------------
# name: (C_in, C_out, groups, branch kernels (largest first), identity)
MERGES = {
    "3x3+1x1+id": (6, 6, 1, (3, 1), True),              # RepVGG
    "g2_3x3+1x1+id": (8, 8, 2, (3, 1), True),           # identity on each group's diagonal
    "g2_3x3+id": (6, 6, 2, (3,), True),                 # no 1x1
    "3x3+1x1_5to7": (5, 7, 1, (3, 1), False),           # no identity (stride-2 / channel-changing block)
    "3x3": (5, 4, 1, (3,), False),
    "dw_3x(3x3)+1x1+id": (6, 6, 6, (3, 3, 3, 1), True),  # GhostNetV3's cheap op: three same-size branches
    "5x5+1x1+id": (4, 4, 1, (5, 1), True),
    "3x(1x1)": (5, 6, 1, (1, 1, 1), False),             # GhostNetV3's primary conv
}
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
FORMATS = [torch.contiguous_format, torch.channels_last]


def _bn_state(bn):
    return (None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)


def _merge_case(name, dtype=torch.float32, device=DEV):
    """``(branches, identity_bn, groups)`` with random weights (a few -0.0 among them) and BN state."""
    c_in, c_out, g, kernels, ident = MERGES[name]
    branches = []
    for i, k in enumerate(kernels):
        w = torch.randn(c_out, c_in // g, k, k, dtype=dtype)
        w.view(-1)[::7] = -0.0  # the sign of a zero must survive the merge
        bn = randomize_bn(nn.BatchNorm2d(c_out)).to(dtype).eval()
        bn.eps = (1e-5, 1e-3)[i % 2]
        branches.append((w.to(device), _bn_state(bn.to(device))))
    identity = _bn_state(randomize_bn(nn.BatchNorm2d(c_out)).to(dtype).eval().to(device)) if ident else None
    return branches, identity, g


def _ieee_bn_scale_bias_many(states, dtype):
    """``reference.bn_scale_bias_many`` with every float64 step rounded once (Python's sqrt and
    division), as the kernel computes it (sqrt.rn, div.rn; numpy's under the interpreter) and as
    PyTorch's CPU rsqrt does (1 / an IEEE sqrt). CUDA's float64 rsqrt is only within 1 ulp."""
    out = []
    for _, g, b, m, v, eps in states:
        inv = torch.tensor([1.0 / math.sqrt(x + eps) for x in v.double().tolist()], dtype=torch.float64)
        s = inv.to(v.device) * g.double()
        out.append((s, b.double() - m.double() * s))
    return out


def _ulps(a, b):
    """Largest distance in units in the last place between two float tensors of one dtype."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    mask = (1 << (8 * a.element_size() - 1)) - 1
    ia, ib = (t.contiguous().view(bits).long() for t in (a, b))
    ia, ib = (torch.where(i < 0, -(i & mask), i) for i in (ia, ib))  # sign-magnitude -> ordered integers
    return int((ia - ib).abs().max()) if a.numel() else 0


@needs_triton
@pytest.mark.parametrize("name", list(MERGES))
def test_merge_kernel_is_merge_branches_bit_for_bit(name, monkeypatch):
    """The Triton kernel (every output dtype, OIHW and OHWI) against merge_branches: bit-identical
    when both take the BN scale 1 / sqrt(var + eps) with each step rounded once (same float64
    operations in the same order, no fused multiply-add, then float64 -> float32 -> dtype as
    PyTorch casts). PyTorch's CPU rsqrt is that, so on a CPU merge_branches itself is matched bit
    for bit; on CUDA its rsqrt is within 1 ulp of float64, so the kernel is within 1 ulp of the
    dtype (and equal unless a value sits within ~1e-16 of a rounding boundary)."""
    branches, identity, g = _merge_case(name)
    with torch.no_grad():
        for dtype in OUT_DTYPES:
            for fmt in FORMATS:
                with effops.use_backend("triton"):
                    w, b = reparam.reparam_merge(branches, identity, g, dtype, fmt)
                assert w.dtype == dtype and b.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                assert w.is_contiguous(memory_format=fmt)
                w_ref, b_ref = merge_branches(branches, identity, g, dtype, fmt)
                if w.device.type == "cpu":
                    assert torch.equal(w, w_ref), (dtype, fmt, _ulps(w, w_ref))
                    # A lone BN takes bn_scale_bias's addcmul, which fuses the multiply-add on a CPU
                    # (the kernel, like the batched BN math of several branches, rounds twice).
                    assert torch.equal(b, b_ref) if len(branches) + (identity is not None) > 1 else \
                        _ulps(b, b_ref) <= 1
                elif dtype != torch.float64:
                    assert _ulps(w, w_ref) <= 1 and _ulps(b, b_ref) <= 1, (dtype, fmt)
                else:  # sums of branches can cancel: float64 ulps of the result are not bounded by 1
                    torch.testing.assert_close(w, w_ref, rtol=1e-14, atol=1e-14)
                    torch.testing.assert_close(b, b_ref, rtol=1e-14, atol=1e-14)
                with monkeypatch.context() as mp:
                    mp.setattr(reference, "bn_scale_bias_many", _ieee_bn_scale_bias_many)
                    w_ieee, b_ieee = merge_branches(branches, identity, g, dtype, fmt)
                assert torch.equal(w, w_ieee) and torch.equal(b, b_ieee), (dtype, fmt, _ulps(w, w_ieee))
                assert torch.equal(w.signbit(), w_ieee.signbit())  # -0.0 kept
                assert w.stride() == w_ieee.stride()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_kernel_half_precision_model(dtype, monkeypatch):
    """Weights and BN state in float16 / bfloat16 (a .half() model): read as they are, merged in
    float64, written in the model's dtype."""
    branches, identity, g = _merge_case("g2_3x3+1x1+id", dtype)
    monkeypatch.setattr(reference, "bn_scale_bias_many", _ieee_bn_scale_bias_many)
    with torch.no_grad():
        with effops.use_backend("triton"):
            w, b = reparam.reparam_merge(branches, identity, g, None, torch.channels_last)
        w_ref, b_ref = merge_branches(branches, identity, g, None, torch.channels_last)
    assert w.dtype == dtype and torch.equal(w, w_ref) and torch.equal(b, b_ref)


@needs_triton
def test_merge_kernel_int64_addressing():
    """A weight view whose last output channel lies past 2**31 elements from its first: the kernel
    must form channel x stride in int64. The view sits in an untouched 2**32 + small float16
    buffer; a 32-bit offset would wrap to the zeroed start of the buffer and read zeros."""
    c_out, c_in, k = 4, 3, 3
    cs = -(-(2**31) // (c_out - 1) // 64) * 64  # (c_out - 1) * cs >= 2**31 > cs
    p = 2**32 - (c_out - 1) * cs
    try:
        base = torch.empty(2**32 + 4096, dtype=torch.float16, device=DEV)
    except (RuntimeError, MemoryError) as e:  # pragma: no cover - a machine refusing 8 GiB of address space
        pytest.skip(f"can't map an 8 GiB buffer here: {e}")
    base[:4096].zero_()
    w = torch.as_strided(base, (c_out, c_in, k, k), (cs, k * k, k, 1), p)
    w.copy_(torch.randint(-3, 4, (c_out, c_in, k, k)).to(torch.float16))
    assert needs_int64(w)
    bns = [_bn_state(randomize_bn(nn.BatchNorm2d(c_out)).eval().to(DEV)) for _ in range(1)]
    branches = [(w, bns[0])]
    with torch.no_grad():
        with effops.use_backend("triton"):
            got, gb = reparam.reparam_merge(branches, None, 1, torch.float32, torch.channels_last)
        want, wb = reparam.reparam_merge([(w.contiguous(), bns[0])], None, 1, torch.float32, torch.channels_last)
    assert _ulps(got, want) <= 1 and _ulps(gb, wb) <= 1
    assert (got != 0).sum() == (want != 0).sum()  # no row read as zeros


@pytest.mark.parametrize("name", list(MERGES) + ["5x5+3x3+1x1+id", "conv_bias_nonaffine"])
def test_merge_reference_backend_is_merge_branches_bit_for_bit(name, monkeypatch):
    """The reference backend (what runs on a CPU) against merge_branches, bit for bit: one chunk,
    and chunks of 1 and 5 output channels (identity diagonals across chunk and group boundaries)."""
    if name == "5x5+3x3+1x1+id":  # a 3x3 inside a 5x5: not the kernel's structure, the reference's
        convs = [nn.Conv2d(4, 4, k, groups=2, bias=False) for k in (5, 3, 1)]
        branches = [(c.weight, _bn_state(randomize_bn(nn.BatchNorm2d(4)).eval())) for c in convs]
        identity, g = _bn_state(randomize_bn(nn.BatchNorm2d(4)).eval()), 2
    elif name == "conv_bias_nonaffine":  # a conv bias and a BN without affine weights
        c = nn.Conv2d(6, 6, 3, bias=True)
        bn = randomize_bn(nn.BatchNorm2d(6, affine=False)).eval()
        branches = [(c.weight, (c.bias,) + _bn_state(bn)[1:]),
                    (torch.randn(6, 6, 1, 1), _bn_state(randomize_bn(nn.BatchNorm2d(6)).eval()))]
        identity, g = _bn_state(randomize_bn(nn.BatchNorm2d(6)).eval()), 1
    else:
        branches, identity, g = _merge_case(name, device="cpu")
    per_row = branches[0][0][0].numel()
    with torch.no_grad(), effops.use_backend("reference"):
        if name in ("5x5+3x3+1x1+id", "conv_bias_nonaffine"):
            assert dispatch.reasons("reparam_merge", *reparam._op_args(branches, identity, g, torch.float32,
                                                                     torch.contiguous_format))["triton"]
        for chunk in (1 << 19, per_row, 5 * per_row):
            monkeypatch.setattr(reparam, "_CPU_CHUNK", chunk)
            for dtype in OUT_DTYPES:
                for fmt in FORMATS:
                    w, b = reparam.reparam_merge(branches, identity, g, dtype, fmt)
                    w_ref, b_ref = merge_branches(branches, identity, g, dtype, fmt)
                    assert torch.equal(w, w_ref) and torch.equal(b, b_ref), (chunk, dtype, fmt)
                    assert w.stride() == w_ref.stride() and b.dtype == b_ref.dtype
                    assert torch.equal(w.signbit(), w_ref.signbit())


def test_merge_op_registration_and_checks():
    """The op traces (opcheck: schema, fake implementation), dispatch says why the kernel can't take
    a structure, and bad arguments get errors naming what was expected."""
    branches, identity, g = _merge_case("g2_3x3+1x1+id", device="cpu")
    args = reparam._op_args(branches, identity, g, torch.float16, torch.channels_last)
    detached = tuple([t if t is None else t.detach() for t in a] if isinstance(a, list) and a and not isinstance(
        a[0], float) else a for a in args)  # inference only: no autograd formula to check
    with effops.use_backend("reference"):
        torch.library.opcheck(reparam._OP, detached)
    w3 = branches[0][0]
    bad = reparam._op_args([(w3, branches[0][1]), (w3[:, :, :1], branches[1][1])], None, g, torch.float32,
                           torch.contiguous_format)
    assert any("at most one 1x1 branch" in r for r in dispatch.reasons("reparam_merge", *bad)["triton"])
    strided = reparam._op_args([(w3, (None, torch.ones(16)[::2]) + branches[0][1][2:])], None, g, torch.float32,
                               torch.contiguous_format)
    assert any("stride other than 1" in r for r in dispatch.reasons("reparam_merge", *strided)["triton"])
    with pytest.raises(ValueError, match="can't be centred"):
        reparam.reparam_merge([(w3[:, :, :2, :2], branches[0][1]), (w3, branches[1][1])])
    with pytest.raises(ValueError, match=r"must be \[8, 4, kh, kw\]"):
        reparam.reparam_merge([(w3, branches[0][1]), (w3[:, :2], branches[1][1])])
    with pytest.raises(ValueError, match="identity branch needs C_in == C_out"):
        reparam.reparam_merge([(w3[:, :, :, :], branches[0][1])], identity, 1)
    with pytest.raises(ValueError, match=r"one per output channel"):
        reparam.reparam_merge([(w3, (None,) + tuple(t[:4] for t in branches[0][1][1:5]) + (1e-5,))])
    with pytest.raises(TypeError, match="dtype must be"):
        reparam.reparam_merge(branches, identity, g, torch.int32)
    with pytest.raises(ValueError, match="channels_last"):
        reparam.reparam_merge(branches, identity, g, None, torch.channels_last_3d)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        reparam.reparam_merge([(w3.clone().requires_grad_(), branches[0][1])])


def test_merged_weight_is_differentiable_when_a_gradient_is_needed():
    """With autograd on, the block's merge is merge_branches (gradients reach every branch's
    parameters); without, the op: the same values."""
    fused = FusedRepVGGBlock.from_module(_orig("groups").cpu())
    with effops.use_backend("reference"):
        w, b = fused.merged_weight_bias()
        with torch.no_grad():
            w0, b0 = fused.merged_weight_bias()
    assert w.grad_fn is not None and w0.grad_fn is None
    # With autograd each BN's bias is bn_scale_bias's addcmul (a fused multiply-add on a CPU), not the
    # batched no-grad math: the bias may differ in its last bit.
    assert torch.equal(w.detach(), w0) and _ulps(b.detach(), b0) <= 1
    (w.sum() + b.sum()).backward()
    assert all(p.grad is not None for p in fused.parameters())


def test_compile_fullgraph_traces_the_merge_op():
    """torch.compile(fullgraph=True) traces the block as one graph holding the merge op and the
    conv op (their fake implementations; no Inductor code generation), and runs it correctly."""
    torch._dynamo.reset()
    ref = _orig("groups").cpu()
    fused = FusedRepVGGBlock.from_module(copy.deepcopy(ref))
    x = _x(8, device="cpu")
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with torch.no_grad(), effops.use_backend("reference"):
        y = torch.compile(fused, fullgraph=True, backend=backend)(x)
    assert seen == ["effops.reparam_merge.default", "<built-in function getitem>", "<built-in function getitem>",
                    "effops.conv_bn_act.default"], seen
    assert_matches(y, copy.deepcopy(ref).double()(x.double()))


# -- eval through the Triton kernel ------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("variant,dtype,n,hw,channels_last", [
    ("identity", torch.float32, 3, 7, True),
    ("identity", torch.float32, 1, 13, False),
    ("identity", torch.float16, 3, 1, True),
    ("stride2", torch.bfloat16, 1, 13, False),
    ("stride2", torch.float32, 3, 7, True),
    ("groups", torch.float16, 1, 7, True),
    ("se", torch.float32, 3, 7, True),
    ("dilated", torch.bfloat16, 3, 7, True),
    ("deployed", torch.float32, 1, 7, False),
], ids=lambda v: str(v).replace("torch.", ""))
def test_eval_triton_matches_original(variant, dtype, n, hw, channels_last):
    ref = _orig(variant)
    fused = FusedRepVGGBlock.from_module(copy.deepcopy(ref)).to(dtype)
    x = _x(fused.in_chs, n, hw, hw, dtype, channels_last)
    with torch.no_grad():
        ref64 = copy.deepcopy(ref).double()(x.double())
        same = copy.deepcopy(ref).to(dtype)(x) if dtype != torch.float32 else None
        with effops.use_backend("triton"), pytest.MonkeyPatch.context() as mp:
            calls = count_dispatch(mp)
            y = fused(x)
    # The branches merged in one kernel pass, then one conv (the deployed form has nothing to merge).
    assert calls == (["conv_bn_act"] if variant == "deployed" else ["reparam_merge", "conv_bn_act"])
    assert y.shape == ref64.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_matches(y, ref64, same)


@needs_triton
def test_channel_view_input():
    ref = _orig("groups")
    fused = FusedRepVGGBlock.from_module(copy.deepcopy(ref))
    x = _x(11, 2, 6, 5)[:, 2:10]  # a channel range of a larger NHWC buffer
    with torch.no_grad(), effops.use_backend("triton"):
        y = fused(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y, copy.deepcopy(ref).double()(x.double()))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp64_structure_on_the_reference_backend(variant):
    ref = _orig(variant).cpu().double()
    fused = FusedRepVGGBlock.from_module(copy.deepcopy(ref))
    x = _x(fused.in_chs, 3, 7, 6, torch.float64, False, "cpu")
    with torch.no_grad(), effops.use_backend("reference"):
        y, want = fused(x), ref(x)
    assert y.shape == want.shape and rel_err(y, want) < 1e-13, rel_err(y, want)


# -- training and autograd ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["identity", "stride2", "se", "drop_path"])
def test_train_is_exactly_the_original(variant):
    if variant == "drop_path":
        ref = randomize_bn(RepVggBlock(6, 6, drop_path_rate=0.5)).train()
    else:
        ref = _orig(variant).cpu().train()
    fused = FusedRepVGGBlock.from_module(copy.deepcopy(ref)).train()
    for step in range(2):
        x1 = _x(fused.in_chs, device="cpu").requires_grad_()
        x2 = x1.detach().clone().requires_grad_()
        torch.manual_seed(step)
        y_ref = ref(x1)
        torch.manual_seed(step)  # drop_path draws the same masks
        y = fused(x2)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        g = torch.randn_like(y)
        y_ref.backward(g)
        y.backward(g)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    assert_same_state_and_grads(ref, fused)


def test_eval_with_autograd_gives_the_original_gradients():
    ref = _orig("identity").cpu()
    fused = FusedRepVGGBlock.from_module(copy.deepcopy(ref))
    x1 = _x(6, device="cpu").requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y_ref, y = ref(x1), fused(x2)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    y_ref.sum().backward()
    y.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    torch.testing.assert_close(fused.identity.weight.grad, ref.identity.weight.grad, rtol=0, atol=0)


# -- structure, state_dict, constructor ------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_keys_and_parameters_are_the_originals(variant):
    ref = _orig(variant)
    fused = FusedRepVGGBlock.from_module(ref)
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in fused.named_children()] == [n for n, _ in ref.named_children()]
    for (_, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        assert a is b  # shared, not copied
    assert not fused.training


@pytest.mark.parametrize("in_chs,out_chs,stride,groups", [(6, 6, 1, 1), (5, 7, 2, 1), (8, 8, 1, 4)])
def test_constructor_has_timm_keys(in_chs, out_chs, stride, groups):
    fused = FusedRepVGGBlock(in_chs, out_chs, stride=stride, groups=groups)
    timm_block = randomize_bn(RepVggBlock(in_chs, out_chs, stride=stride, group_size=in_chs // groups)).eval()
    assert list(fused.state_dict()) == list(timm_block.state_dict())
    fused.load_state_dict(timm_block.state_dict(), strict=True)
    fused.eval()
    x = _x(in_chs, device="cpu")
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fused(x), copy.deepcopy(timm_block).double()(x.double()))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        FusedRepVGGBlock(4, 4, kernel_size=2)


def test_unmergeable_structures_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="not timm's RepVggBlock"):
        FusedRepVGGBlock.from_module(nn.Conv2d(3, 3, 3))
    m = RepVggBlock(6, 6)
    m.conv_kxk.bn.act = nn.ReLU()  # a non-linear branch can't be merged
    with pytest.raises(ValueError, match="not linear"):
        FusedRepVGGBlock.from_module(m)
    m = RepVggBlock(6, 6)
    m.conv_kxk.conv.padding = (0, 0)  # the 1x1 and identity would not sit at its centre tap
    with pytest.raises(ValueError, match="padded by dilation"):
        FusedRepVGGBlock.from_module(m)


# -- freshness, hooks, autocast, replaced children, bad input ------------------------------------------------
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "reference"])
def test_data_write_is_seen_after_refresh(backend):
    ref = _orig("identity") if backend == "triton" else _orig("identity").cpu()
    fused = FusedRepVGGBlock.from_module(copy.deepcopy(ref))
    x = _x(6, device=DEV if backend == "triton" else "cpu")
    with torch.no_grad(), effops.use_backend(backend):
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        for m in (ref, fused):  # .data writes do not bump the version counters: refresh() says so
            m.identity.running_var.data.mul_(4)
            m.conv_1x1.conv.weight.data.mul_(-2)
            m.conv_kxk.bn.bias.data.add_(0.5)
        effops.refresh()
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))


def test_merge_is_derived_once_per_parameter_state(monkeypatch):
    ref = _orig("identity").cpu()
    fused = FusedRepVGGBlock.from_module(copy.deepcopy(ref))
    x = _x(6, device="cpu")
    calls = []
    real = FusedRepVGGBlock.merged_weight_bias

    def counted(self, *a, **k):
        calls.append(a)
        return real(self, *a, **k)

    monkeypatch.setattr(FusedRepVGGBlock, "merged_weight_bias", counted)
    with torch.no_grad(), effops.use_backend("reference"):
        fused(x)
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        assert len(calls) == 1
        for m in (ref, fused):
            m.conv_kxk.bn.running_mean.add_(1)  # in place: the version counter moves
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        assert len(calls) == 2


def test_statistics_updated_in_train_are_used_in_eval():
    ref = _orig("identity").cpu().train()
    fused = FusedRepVGGBlock.from_module(copy.deepcopy(ref)).train()
    x = _x(6, device="cpu")
    ref(x), fused(x)
    ref.eval(), fused.eval()
    with torch.no_grad(), effops.use_backend("reference"):
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))


def test_hooks_autocast_replaced_children_and_bad_input():
    ref = _orig("identity").cpu()
    fused = FusedRepVGGBlock.from_module(copy.deepcopy(ref))
    x = _x(6, device="cpu")
    with torch.no_grad(), effops.use_backend("reference"):
        seen = []
        h = fused.conv_1x1.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
        torch.testing.assert_close(fused(x), ref(x), rtol=0, atol=0)
        assert seen == [(2, 6, 7, 7)]
        h.remove()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, same = fused(x), ref(x)
        assert y.dtype == same.dtype == torch.bfloat16
        assert_matches(y, copy.deepcopy(ref).double()(x.double()), same)
        for m in (ref, fused):
            m.act = nn.SiLU()
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        for m in (ref, fused):
            m.act = nn.Tanh()  # not fused into the epilogue: applied after the conv
        assert_matches(fused(x), copy.deepcopy(ref).double()(x.double()))
        for m in (ref, fused):
            m.conv_1x1.bn.act = nn.ReLU()  # the branch stops being linear: the original forward runs
        with pytest.warns(UserWarning, match="runs unfused"):
            y = fused(x)
        torch.testing.assert_close(y, ref(x), rtol=0, atol=0)
        fused = FusedRepVGGBlock.from_module(copy.deepcopy(_orig("stride2").cpu()))
        assert fused(torch.randn(0, 5, 6, 6)).shape == (0, 7, 3, 3)
        with pytest.raises(ValueError, match="expected an input with 5 channels"):
            fused(torch.randn(2, 6, 6, 6))
        with pytest.raises(ValueError, match="4-D input"):
            fused(torch.randn(5, 6, 6))
        with pytest.raises(TypeError, match="input is torch.float64 but weight is torch.float32"):
            fused(torch.randn(2, 5, 6, 6, dtype=torch.float64))


# -- the converter ----------------------------------------------------------------------------------------
def test_block_rule_is_registered():
    rule = next(r for r in BLOCK_RULES if r.name == "RepVGG block")
    assert rule.fused_type is FusedRepVGGBlock and rule.matches(RepVggBlock(4, 4))
    fast = effops.optimize(nn.Sequential(RepVggBlock(4, 4), RepVggBlock(4, 6, stride=2)).eval())
    what = [e.what for e in fast.effops_report.swapped]
    assert what == ["RepVGG block 3x3+1x1+identity 4→4 → one conv3x3 + bias + relu (merged in fp64)",
                    "RepVGG block 3x3+1x1 s2 4→6 → one conv3x3 s2 + bias + relu (merged in fp64)"]


@pytest.mark.slow
def test_repvgg_a2_equals_the_original():
    model = randomize_bn(timm.create_model("repvgg_a2", num_classes=10)).eval()
    fast = effops.optimize(model)
    rep = fast.effops_report
    assert len(rep.swapped) == 23 and all(e.what.startswith("RepVGG block") for e in rep.swapped[:-1]), str(rep)
    assert rep.swapped[-1].path == "head" and rep.swapped[-1].what.startswith(
        "classifier head: global average pool → linear 1408->10"), str(rep)
    assert not rep.skipped, str(rep)
    assert list(fast.state_dict()) == list(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), effops.use_backend("reference"):
        ref64 = copy.deepcopy(model).double()(x.double())
        assert_matches(fast(x), ref64)
        y64 = copy.deepcopy(fast).double()(x.double())  # the converted model, in float64
    assert rel_err(y64, ref64) < 1e-12
