"""The native CPU kernels of csrc/ at real model shapes (batch 1, fp32, 2 threads), each next to
the PyTorch way a user would write the same block — time, speedup, achieved GB/s.

    pytest benchmarks/test_native_kernels.py
    pytest benchmarks/test_native_kernels.py -k depthwise

* **depthwise** (``depthwise_nhwc``): a depthwise conv + BN + activation block of MobileNetV2
  (ReLU6), MobileNetV3 (ReLU / hardswish), EfficientNet-B0 (SiLU, kernel 5) and ShuffleNetV2
  (no activation, C = 58: a channel tail) at 224² input. ``eager``: ``nn.Conv2d(groups=C)`` +
  ``nn.BatchNorm2d`` + activation modules in eval mode on a channels_last input; ``onednn``:
  ``torch.ops.mkldnn._convolution_pointwise`` with the BN folded and the activation fused where
  oneDNN has it (the primitive csrc/conv.cpp would otherwise use); ``effops``: the native kernel
  with BN folded into taps and bias, output allocated per call like the others.
* **winograd** (``winograd_nhwc`` through ``conv_scale_bias_act`` with ``set_winograd_policy(1)``):
  3x3 stride-1 conv + BN + ReLU blocks of VoVNet-39, ResNet-50 and RepVGG-A2 (dense) and RegNetY-016
  (grouped, group width 24) at 224² input.
  ``eager``: ``nn.Conv2d`` + ``nn.BatchNorm2d`` + ``nn.ReLU`` in eval mode, channels_last;
  ``onednn``: ``torch.ops.mkldnn._convolution_pointwise`` with the BN folded, the weight
  prepacked and ReLU fused (the primitive Inductor's freezing path emits); ``effops``: Winograd
  F(4x4, 3x3). The weights stay in the cache between calls here; in a model they do not, which
  costs Winograd's 4x larger transformed weight more (the measured per-problem choice in
  csrc/conv.cpp evicts the caches for that reason). GFLOP/s count a direct conv's 2*9*C*K*H*W.
* **pointwise** (``conv_scale_bias_act`` with ``set_pointwise_policy(1)``): 1x1 conv + BN +
  activation blocks with at least 64 outputs, which run effops' register-blocked GEMM (the expand
  convs of MobileNetV2 and EfficientNet-B0, VoVNet's stage convs, a ResNet-50 reduction), and one
  projection with 24 outputs, which runs MKL's; ``eager`` and ``onednn`` as for winograd.
* **aggregate** (``conv_scale_bias_act_segments`` with ``set_pointwise_policy(1)``): the concat ->
  1x1 conv + BN + ReLU of an OSA block (``ese_vovnet19b_dw``'s four stages, VoVNet-39's first) as
  one GEMM over the block input and the stage outputs where they lie. ``eager``: ``torch.cat`` +
  the modules, channels_last; ``onednn_concat``: ``torch.cat`` + oneDNN's prepacked 1x1 conv (what
  the native backend runs when it measures that faster); ``onednn_preconcat``: oneDNN's conv alone
  on an input concatenated beforehand, the floor for any concat-based way.
* **pair** (``pointwise_depthwise_bn_act``): the expand 1x1 conv + BN + act → depthwise conv + BN +
  act of MobileNetV2 / V3 and EfficientNet-B0 inverted residual blocks. ``eager``: the six modules
  in eval mode, channels_last; ``effops_separate``: the two native convs one after the other
  (``set_pair_policy(0)``); ``effops``: banded (``set_pair_policy(1)``). Timed back to back, the
  expanded tensor of the separate convs partly stays in the cache; in a model it is more often
  evicted between blocks.
* **se** (``se_gate`` + ``se_apply``): timm's EfficientNet/MobileNetV3 ``SqueezeExcite``
  (``x * gate(conv_expand(act(conv_reduce(x.mean((2, 3))))))``) on channels_last inputs.
* **shuffle** (``channel_shuffle``): ShuffleNetV2's ``view → transpose → reshape`` (g=2) and
  ``torch.channel_shuffle``, plus a ShuffleNetV1-style g=3 case.
* **linear** (``linear``, effops.Linear's kernel): the classifier heads of VoVNet-39 (1024 -> 1000),
  MobileNetV3 / EfficientNet-B0 (1280 -> 1000) and ResNet-50 (2048 -> 1000) at batch 1, and one at
  batch 8; ``eager`` is ``F.linear`` (MKL's sgemv / sgemm). Timed from cold caches (64 MB written
  before every call, untimed), as in a model, where the convs evict the 4-8 MB weight between two
  forwards: a matrix-vector product is then the time to stream its weight in.
* **pool_linear** (``pool_linear``, FusedClassifierHead's kernel): timm's classifier head on the
  last feature map (channels_last) of ``ese_vovnet19b_dw`` (1024x7x7 -> 1000) and RegNetY-016
  (888x7x7 -> 1000) at batch 1; ``eager`` is timm's ``ClassifierHead`` (``adaptive_avg_pool2d``,
  flatten, dropout, ``F.linear``). Timed from cold caches, as **linear**.
* **interleave** (``interleave_channels``): a stride-1 ShuffleNetV2 unit's output from the identity
  half (a channel view of the unit's input) and the branch output: ``eager`` is the two strided
  copies into ``out[:, 0::2]`` / ``out[:, 1::2]`` (the unit's channel-view writes), ``effops`` the
  one interleave pass.

GB/s counts the bytes of reading every input tensor and writing the output once (the floor
for these memory-bound blocks). Times are CPU wall-clock medians, the providers of a case
timed round-robin so that machine noise hits them alike. Each case first checks effops
against a float64 computation (``_numerics.py``'s rule).
"""
import copy
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effops.benchmark import randomize_bn, result_rows

from _numerics import check_numerics

DEV = torch.device("cpu")
ROUNDS = 15


def _module():
    try:
        from effops import native
    except ImportError:
        return None, "effops.native is missing"
    mod = native.module()
    return mod, ("" if mod is not None else native.status(load=False)[1])


@pytest.fixture(scope="module")
def m():
    mod, reason = _module()
    if mod is None:
        pytest.skip(f"native CPU extension unavailable: {reason}")
    return mod


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _time(providers, budget_s=0.25):
    """Round-robin medians (ms) in the shape effops.benchmark.result_rows takes."""
    times, errors, per_round = {}, {}, {}
    live = {}
    for prov, fn in providers.items():
        try:
            fn()
            t0 = time.perf_counter()
            fn()
            once = time.perf_counter() - t0
            live[prov] = (fn, max(1, min(200, int(budget_s / ROUNDS / max(once, 1e-7)))))
            per_round[prov] = []
        except Exception as e:  # noqa: BLE001 - a baseline that can't run is reported, not fatal
            if prov == "effops":
                raise
            errors[prov] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            times[prov] = None
    for _ in range(ROUNDS):
        for prov, (fn, reps) in live.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            per_round[prov].append((time.perf_counter() - t0) * 1e3 / reps)
    for prov in live:
        times[prov] = statistics.median(per_round[prov])
    none = {p: None for p in times}
    return times, none, none, errors


def _record(results, timed, min_bytes, flops, **fields):
    results.extend(result_rows(timed, flops=flops, min_bytes=min_bytes, peaks=None, host_graph=False, cuda=False,
                               dtype="torch.float32", **fields))
    results.flush()


# ---- depthwise conv + BN + act -----------------------------------------------------------------

DEPTHWISE = [
    # name, C, H=W (input), kernel, stride, activation
    ("mnv2_s1_112_c96_s2", 96, 112, 3, 2, "relu6"),
    ("mnv2_56_c144", 144, 56, 3, 1, "relu6"),
    ("mnv2_56_c144_s2", 144, 56, 3, 2, "relu6"),
    ("mnv2_28_c192", 192, 28, 3, 1, "relu6"),
    ("mnv2_14_c576", 576, 14, 3, 1, "relu6"),
    ("mnv2_7_c960", 960, 7, 3, 1, "relu6"),
    ("mnv3_112_c16", 16, 112, 3, 1, "relu"),
    ("mnv3_14_c480_hswish", 480, 14, 3, 1, "hardswish"),
    ("effb0_56_c144_k5_s2", 144, 56, 5, 2, "silu"),
    ("effb0_14_c480_k5", 480, 14, 5, 1, "silu"),
    ("effb0_14_c672_k5_s2", 672, 14, 5, 2, "silu"),
    ("shv2_28_c58", 58, 28, 3, 1, "identity"),
]
_ACT_MODULE = {"relu6": nn.ReLU6, "relu": nn.ReLU, "hardswish": nn.Hardswish, "silu": nn.SiLU, "identity": nn.Identity}
# oneDNN's fused attribute for each activation (relu6 is hardtanh(0, 6)).
_ONEDNN_ATTR = {"relu6": ("hardtanh", [0.0, 6.0]), "relu": ("relu", []), "hardswish": ("hardswish", []),
                "silu": ("swish", []), "identity": ("none", [])}


def _depthwise64(x, w, b, stride, pad):
    """float64 depthwise conv + bias as a sum of strided slices (PyTorch's float64 grouped conv
    runs one group at a time: minutes at these shapes)."""
    n, c, h, wd = x.shape
    k = w.shape[-1]
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    xp = F.pad(x.double(), (pad, pad, pad, pad))
    y = b.double().view(1, c, 1, 1).expand(n, c, oh, ow).clone()
    for i in range(k):
        for j in range(k):
            y += xp[:, :, i: i + (oh - 1) * stride + 1: stride, j: j + (ow - 1) * stride + 1: stride] * \
                w.double()[:, 0, i, j].view(1, c, 1, 1)
    return y


@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: c[0])
def test_depthwise(case, m, results):
    name, c, hw, k, s, act = case
    pad = k // 2
    block = nn.Sequential(nn.Conv2d(c, c, k, s, pad, groups=c, bias=False), nn.BatchNorm2d(c), _ACT_MODULE[act]())
    randomize_bn(block).eval()
    x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
    conv, bn = block[0], block[1]
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = (bn.bias - bn.running_mean * scale).contiguous()
        w = (conv.weight * scale.view(-1, 1, 1, 1)).contiguous()
        taps = w.reshape(c, k * k).t().contiguous()
    oh = (hw + 2 * pad - k) // s + 1
    attr, scalars = _ONEDNN_ATTR[act]

    def effops_fn():
        out = torch.empty(1, c, oh, oh).contiguous(memory_format=torch.channels_last)
        m.depthwise_nhwc(x, taps, bias, None, False, out, k, k, [s, s], [pad, pad], [1, 1], act, 0.0)
        return out

    def onednn_fn():
        return torch.ops.mkldnn._convolution_pointwise(x, w, bias, [pad, pad], [s, s], [1, 1], c, attr, scalars, "")

    with torch.inference_mode():
        ref64 = _depthwise64(x, w, bias, s, pad)
        ref64 = {"relu6": F.relu6, "relu": F.relu, "hardswish": F.hardswish, "silu": F.silu,
                 "identity": lambda t: t}[act](ref64)
        eager = block(x)
        errs = check_numerics(effops_fn(), ref64, eager)
        timed = _time({"eager": lambda: block(x), "onednn": onednn_fn, "effops": effops_fn})
    px_in, px_out = hw * hw, oh * oh
    _record(results, timed, min_bytes=4 * (c * (px_in + px_out) + c * (k * k + 1)), flops=2 * px_out * c * k * k,
            case=f"dw_{name}", shape=f"1x{c}x{hw}x{hw} k{k} s{s} {act}", **errs)


# ---- dense 3x3 conv + BN + ReLU: Winograd F(4x4, 3x3) --------------------------------------------

DENSE3X3 = [
    # name, C_in, C_out, H=W, groups
    ("vovnet39_56_c128", 128, 128, 56, 1),
    ("vovnet39_28_c160", 160, 160, 28, 1),
    ("vovnet39_14_c192", 192, 192, 14, 1),
    ("vovnet39_7_c224", 224, 224, 7, 1),
    ("resnet50_56_c64", 64, 64, 56, 1),
    ("resnet50_14_c256", 256, 256, 14, 1),
    ("resnet50_7_c512", 512, 512, 7, 1),
    ("repvgg_a2_14_c384", 384, 384, 14, 1),
    # RegNetY-016's grouped convs (group width 24)
    ("regnety016_56_c48_g2", 48, 48, 56, 2),
    ("regnety016_28_c120_g5", 120, 120, 28, 5),
    ("regnety016_14_c336_g14", 336, 336, 14, 14),
    ("regnety016_7_c888_g37", 888, 888, 7, 37),
]


def _conv_case(m, block, x, pad, groups, act, policy, impl, stride=1):
    """Times a conv + BN + act block (eager modules, oneDNN's prepacked pointwise primitive, effops'
    ``conv_scale_bias_act`` with the native policy ``policy = (name, value)`` set) after checking that
    effops ran ``impl`` and matches float64. Returns (timed, numerics fields)."""
    bn = block[1]
    with torch.no_grad():
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).contiguous()
        bias = (bn.bias - bn.running_mean * scale).contiguous()
        w = (block[0].weight * scale.view(-1, 1, 1, 1)).contiguous()
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [pad, pad], [stride, stride], [1, 1],
                                                           groups, list(x.shape))
    conv_w = block[0].weight.detach()
    attr, scalars = _ONEDNN_ATTR[act]

    def effops_fn():
        return m.conv_scale_bias_act(x, conv_w, scale, bias, None, None, [stride, stride], [pad, pad], [1, 1], groups,
                                     act, 0.0, True)

    def onednn_fn():
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, [pad, pad], [stride, stride], [1, 1], groups,
                                                       attr, scalars, "")

    name, value = policy
    before = getattr(m, f"{name}_policy")()
    getattr(m, f"set_{name}_policy")(value)
    try:
        with torch.inference_mode():
            m.conv_impl_counts(True)
            out = effops_fn()
            assert m.conv_impl_counts(True)[impl] == 1, f"the {impl} path did not run"
            errs = check_numerics(out, copy.deepcopy(block).double()(x.double()), block(x))
            timed = _time({"eager": lambda: block(x), "onednn": onednn_fn, "effops": effops_fn})
    finally:
        getattr(m, f"set_{name}_policy")(before)
    return timed, errs


@pytest.mark.parametrize("case", DENSE3X3, ids=lambda c: c[0])
def test_winograd(case, m, results):
    name, c, k, hw, g = case
    block = randomize_bn(nn.Sequential(nn.Conv2d(c, k, 3, 1, 1, groups=g, bias=False), nn.BatchNorm2d(k),
                                       nn.ReLU())).eval()
    x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
    timed, errs = _conv_case(m, block, x, 1, g, "relu", ("winograd", 1), "winograd")
    _record(results, timed, min_bytes=4 * (hw * hw * (c + k) + 9 * c * k // g + k), flops=2 * 9 * c * k * hw * hw // g,
            case=f"winograd_{name}", shape=f"1x{c}x{hw}x{hw} -> {k}" + (f" g{g}" if g > 1 else ""), **errs)


# ---- stem conv + BN + ReLU (3 input channels, stride 2): effops' direct kernel -----------------

STEMS = [
    # name, C_out, kernel
    ("vovnet_repvgg_3x3_c64", 64, 3),
    ("mnv2_effnet_regnety_3x3_c32", 32, 3),
    ("ghostnet_mnv3_3x3_c16", 16, 3),
    ("shufflenet_3x3_c24", 24, 3),
    ("resnet_7x7_c64", 64, 7),
]


@pytest.mark.parametrize("case", STEMS, ids=lambda c: c[0])
def test_direct_stem(case, m, results):
    name, k, ks = case
    block = randomize_bn(nn.Sequential(nn.Conv2d(3, k, ks, 2, ks // 2, bias=False), nn.BatchNorm2d(k),
                                       nn.ReLU())).eval()
    x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    timed, errs = _conv_case(m, block, x, ks // 2, 1, "relu", ("direct", 1), "direct", stride=2)
    _record(results, timed, min_bytes=4 * (224 * 224 * 3 + 112 * 112 * k + ks * ks * 3 * k + k),
            flops=2 * ks * ks * 3 * k * 112 * 112, case=f"direct_{name}", shape=f"1x3x224x224 -> {k} k{ks} s2", **errs)


# ---- 1x1 conv + BN + act: effops' register-blocked GEMM ------------------------------------------

POINTWISE = [
    # name, C_in, C_out, H=W, activation (MobileNetV2 / EfficientNet-B0 expand convs; one projection;
    # VoVNet's and ResNet-50's square and contracting convs; ShuffleNetV2 x1.0's branch convs, whose
    # 58 / 116 / 232 outputs end in a partial vector)
    ("mnv2_112_c16_c96", 16, 96, 112, "relu6"),
    ("mnv2_56_c24_c144", 24, 144, 56, "relu6"),
    ("mnv2_28_c32_c192", 32, 192, 28, "relu6"),
    ("mnv2_14_c64_c384", 64, 384, 14, "relu6"),
    ("mnv2_14_c96_c576", 96, 576, 14, "relu6"),
    ("effb0_28_c40_c240", 40, 240, 28, "silu"),
    ("mnv2_56_c144_c24_proj", 144, 24, 56, "identity"),
    ("vovnet_56_c128_c128", 128, 128, 56, "relu"),
    ("vovnet_28_c160_c160", 160, 160, 28, "relu"),
    ("resnet50_14_c1024_c256", 1024, 256, 14, "relu"),
    ("shv2_28_c58_c58", 58, 58, 28, "relu"),
    ("shv2_14_c116_c116", 116, 116, 14, "relu"),
    ("shv2_7_c232_c232", 232, 232, 7, "relu"),
]


@pytest.mark.parametrize("case", POINTWISE, ids=lambda c: c[0])
def test_pointwise(case, m, results):
    name, c, k, hw, act = case
    block = randomize_bn(nn.Sequential(nn.Conv2d(c, k, 1, bias=False), nn.BatchNorm2d(k), _ACT_MODULE[act]())).eval()
    x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
    timed, errs = _conv_case(m, block, x, 0, 1, act, ("pointwise", 1), "gemm")
    _record(results, timed, min_bytes=4 * (hw * hw * (c + k) + c * k + k), flops=2 * c * k * hw * hw,
            case=f"pointwise_{name}", shape=f"1x{c}x{hw}x{hw} -> {k} {act}", **errs)


# ---- OSA aggregation: concat -> 1x1 conv + BN + ReLU without the concat ---------------------------

AGGREGATE = [
    # name, block input channels, stage channels, layers, C_out, H=W
    ("ese19dw_56_s128", 64, 128, 3, 256, 56),
    ("ese19dw_28_s160", 256, 160, 3, 512, 28),
    ("ese19dw_14_s192", 512, 192, 3, 768, 14),
    ("ese19dw_7_s224", 768, 224, 3, 1024, 7),
    ("vovnet39_56_s128", 128, 128, 5, 256, 56),
]


@pytest.mark.parametrize("case", AGGREGATE, ids=lambda c: c[0])
def test_aggregate(case, m, results):
    name, cin, sc, layers, k, hw = case
    kin = cin + layers * sc
    block = randomize_bn(nn.Sequential(nn.Conv2d(kin, k, 1, bias=False), nn.BatchNorm2d(k), nn.ReLU())).eval()
    segs = [torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last) for c in [cin] + [sc] * layers]
    cat = torch.cat(segs, 1)
    bn = block[1]
    with torch.no_grad():
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).contiguous()
        bias = (bn.bias - bn.running_mean * scale).contiguous()
        w = (block[0].weight * scale.view(-1, 1, 1, 1)).contiguous()
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [0, 0], [1, 1], [1, 1], 1, list(cat.shape))
    conv_w = block[0].weight.detach()

    def effops_fn():
        return m.conv_scale_bias_act_segments(segs, conv_w, scale, bias, None, None, "relu", 0.0, True)

    def onednn(x):
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, [0, 0], [1, 1], [1, 1], 1, "relu", [], "")

    before = m.pointwise_policy()
    m.set_pointwise_policy(1)
    try:
        with torch.inference_mode():
            m.conv_impl_counts(True)
            out = effops_fn()
            assert m.conv_impl_counts(True)["gemm"] == 1, "the concat-free GEMM did not run"
            errs = check_numerics(out, copy.deepcopy(block).double()(cat.double()), block(cat))
            timed = _time({"eager": lambda: block(torch.cat(segs, 1)),
                           "onednn_concat": lambda: onednn(torch.cat(segs, 1)),
                           "onednn_preconcat": lambda: onednn(cat), "effops": effops_fn})
    finally:
        m.set_pointwise_policy(before)
    _record(results, timed, min_bytes=4 * (hw * hw * (kin + k) + kin * k + k), flops=2 * kin * k * hw * hw,
            case=f"aggregate_{name}", shape=f"1x({cin}+{layers}x{sc})x{hw}x{hw} -> {k} relu", **errs)


# ---- expand 1x1 -> depthwise pairs, banded --------------------------------------------------------

def _under(set_policy, policy, fn):
    """``fn`` as a timed callable that first sets the backend's pair policy to ``policy``."""
    def run():
        set_policy(policy)
        return fn()
    return run


PAIRS = [
    # name, C_in, C_exp, H=W (input), depthwise kernel, stride, activation
    ("mnv2_112_c16_c96_s2", 16, 96, 112, 3, 2, "relu6"),
    ("mnv2_56_c24_c144", 24, 144, 56, 3, 1, "relu6"),
    ("mnv2_56_c24_c144_s2", 24, 144, 56, 3, 2, "relu6"),
    ("mnv2_28_c32_c192", 32, 192, 28, 3, 1, "relu6"),
    ("mnv2_14_c64_c384", 64, 384, 14, 3, 1, "relu6"),
    ("mnv2_14_c96_c576", 96, 576, 14, 3, 1, "relu6"),
    ("mnv2_7_c160_c960", 160, 960, 7, 3, 1, "relu6"),
    ("mnv3_112_c16_c64_s2", 16, 64, 112, 3, 2, "relu"),
    ("effb0_56_c24_c144_k5_s2", 24, 144, 56, 5, 2, "silu"),
]


@pytest.mark.parametrize("case", PAIRS, ids=lambda c: c[0])
def test_pair(case, m, results):
    name, c, ce, hw, k, s, act = case
    blocks = randomize_bn(nn.Sequential(
        nn.Conv2d(c, ce, 1, bias=False), nn.BatchNorm2d(ce), _ACT_MODULE[act](),
        nn.Conv2d(ce, ce, k, s, k // 2, groups=ce, bias=False), nn.BatchNorm2d(ce), _ACT_MODULE[act]())).eval()
    x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
    (c1, b1), (c2, b2) = (blocks[0], blocks[1]), (blocks[3], blocks[4])
    bn = lambda cv, b: (cv.bias, b.weight, b.bias, b.running_mean, b.running_var, b.eps, b.num_batches_tracked)

    def pair():
        return m.pointwise_depthwise_bn_act(x, c1.weight, *bn(c1, b1), act, 0.0, c2.weight, *bn(c2, b2), [s, s],
                                            [k // 2, k // 2], [1, 1], act, 0.0)

    before = m.pair_policy()
    try:
        with torch.inference_mode():
            m.set_pair_policy(1)
            m.conv_impl_counts(True)
            out = pair()
            assert m.conv_impl_counts(True) == {"depthwise": 1, "gemm": 1, "onednn": 0, "winograd": 0}, \
                "the banded pair did not run"
            ref64 = copy.deepcopy(blocks).double()(x.double())
            errs = check_numerics(out, ref64, blocks(x))
            timed = _time({"eager": lambda: blocks(x), "effops_separate": _under(m.set_pair_policy, 0, pair),
                            "effops": _under(m.set_pair_policy, 1, pair)})
    finally:
        m.set_pair_policy(before)
    oh = (hw + 2 * (k // 2) - k) // s + 1
    _record(results, timed, min_bytes=4 * (hw * hw * c + oh * oh * ce + c * ce + ce * k * k + 2 * ce),
            flops=2 * hw * hw * c * ce + 2 * oh * oh * ce * k * k,
            case=f"pair_{name}", shape=f"1x{c}x{hw}x{hw} -> {ce} dw{k} s{s} {act}", **errs)


DW_PAIRS = [
    # name, C, C_out, H=W (input), stride, depthwise BN + activation: ese_vovnet19b_dw's stem (bare
    # depthwise convs) and OSA stages, MobileNetV2's first block
    ("vovdw_stem_112_c64", 64, 64, 112, 1, False),
    ("vovdw_stem_112_c64_s2", 64, 64, 112, 2, False),
    ("vovdw_56_c128", 128, 128, 56, 1, False),
    ("vovdw_28_c160", 160, 160, 28, 1, False),
    ("vovdw_14_c192", 192, 192, 14, 1, False),
    ("vovdw_7_c224", 224, 224, 7, 1, False),
    ("mnv2_112_c32_c16", 32, 16, 112, 1, True),
]


@pytest.mark.parametrize("case", DW_PAIRS, ids=lambda c: c[0])
def test_dw_pair(case, m, results):
    """A depthwise conv and a 1x1 conv + BN + ReLU: banded (the depthwise output never written out)
    against the two convs one after the other, hot caches."""
    name, c, co, hw, s, dw_bn = case
    dw = [nn.Conv2d(c, c, 3, s, 1, groups=c, bias=False)] + ([nn.BatchNorm2d(c), nn.ReLU6()] if dw_bn else [])
    blocks = randomize_bn(nn.Sequential(*dw, nn.Conv2d(c, co, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU())).eval()
    x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
    bn = lambda cv, b: (cv.bias, b.weight, b.bias, b.running_mean, b.running_var, b.eps, b.num_batches_tracked)
    d, pw, pbn = blocks[0], blocks[-3], blocks[-2]
    dargs = bn(d, blocks[1]) + ("relu6",) if dw_bn else (None, None, None, None, None, 0.0, None, "identity")

    def pair():
        return m.depthwise_pointwise_bn_act(x, d.weight, *dargs[:7], [s, s], [1, 1], [1, 1], dargs[7], 0.0, pw.weight,
                                            *bn(pw, pbn), "relu", 0.0)

    before = m.dw_pair_policy()
    try:
        with torch.inference_mode():
            m.set_dw_pair_policy(1)
            with torch.profiler.profile() as prof:
                out = pair()
            assert any(e.name == "effops::depthwise_pointwise" for e in prof.events()), "the banded pair did not run"
            ref64 = copy.deepcopy(blocks).double()(x.double())
            errs = check_numerics(out, ref64, blocks(x))
            timed = _time({"eager": lambda: blocks(x), "effops_separate": _under(m.set_dw_pair_policy, 0, pair),
                            "effops": _under(m.set_dw_pair_policy, 1, pair)})
    finally:
        m.set_dw_pair_policy(before)
    oh = (hw - 1) // s + 1
    _record(results, timed, min_bytes=4 * (hw * hw * c + oh * oh * co + c * co + c * 9 + 2 * co),
            flops=2 * oh * oh * c * 9 + 2 * oh * oh * c * co,
            case=f"dw_pair_{name}", shape=f"1x{c}x{hw}x{hw} dw3 s{s} -> {co}", **errs)


# ---- squeeze-excitation ------------------------------------------------------------------------

SE = [
    # name, C, H=W, reduced channels, act, gate (EfficientNet-B0 / MobileNetV3-Large SE blocks)
    ("effb0_112_c32", 32, 112, 8, "silu", "sigmoid"),
    ("effb0_56_c144", 144, 56, 6, "silu", "sigmoid"),
    ("effb0_14_c480", 480, 14, 20, "silu", "sigmoid"),
    ("effb0_7_c1152", 1152, 7, 48, "silu", "sigmoid"),
    ("mnv3_28_c72", 72, 28, 24, "relu", "hardsigmoid"),
    ("mnv3_7_c960", 960, 7, 240, "relu", "hardsigmoid"),
]


@pytest.mark.parametrize("case", SE, ids=lambda c: c[0])
def test_se(case, m, results):
    timm_blocks = pytest.importorskip("timm.models._efficientnet_blocks", reason="the eager baseline is timm's")
    name, c, hw, rd, act, gate = case
    act_layer = {"silu": nn.SiLU, "relu": nn.ReLU}[act]
    gate_layer = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}[gate]
    se = timm_blocks.SqueezeExcite(c, rd_channels=rd, act_layer=act_layer, gate_layer=gate_layer).eval()
    with torch.no_grad():  # a trained SE's magnitude: gates spread over (0, 1)
        for p in se.parameters():
            p.copy_(torch.randn_like(p) * (1.0 / p.shape[1] ** 0.5 if p.dim() > 1 else 0.5))
    x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
    w1, b1 = se.conv_reduce.weight, se.conv_reduce.bias
    w2, b2 = se.conv_expand.weight, se.conv_expand.bias

    def effops_fn():
        g = m.se_gate(x, w1, b1, w2, b2, act, 0.0, gate, 0.0)
        return m.se_apply(x, g, None, None, "identity", 0.0)

    with torch.inference_mode():
        ref64 = copy.deepcopy(se).double()(x.double())
        errs = check_numerics(effops_fn(), ref64, se(x))
        timed = _time({"eager": lambda: se(x), "effops": effops_fn})
    weights = sum(p.numel() for p in se.parameters())
    _record(results, timed, min_bytes=4 * (2 * c * hw * hw + weights), flops=4 * c * rd + 2 * c * hw * hw,
            case=f"se_{name}", shape=f"1x{c}x{hw}x{hw} rd {rd}", **errs)


# ---- channel shuffle ---------------------------------------------------------------------------

SHUFFLE = [
    # name, C, H=W, groups: ShuffleNetV2 x1.0 stage outputs at 224², and a ShuffleNetV1 g=3 stage
    ("shv2_28_c116", 116, 28, 2),
    ("shv2_14_c232", 232, 14, 2),
    ("shv2_7_c464", 464, 7, 2),
    ("shv1_28_c240_g3", 240, 28, 3),
]


@pytest.mark.parametrize("case", SHUFFLE, ids=lambda c: c[0])
def test_shuffle(case, m, results):
    name, c, hw, g = case
    x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)

    def eager_fn():
        n, cc, h, w = x.shape
        return x.view(n, g, cc // g, h, w).transpose(1, 2).reshape(n, cc, h, w)

    want = eager_fn()
    got = m.channel_shuffle(x, g, None)
    assert torch.equal(got, want), "effops channel_shuffle differs from the view/transpose/reshape shuffle"
    with torch.inference_mode():
        timed = _time({"eager": eager_fn, "torch_channel_shuffle": lambda: torch.channel_shuffle(x, g),
                       "effops": lambda: m.channel_shuffle(x, g, None)})
    _record(results, timed, min_bytes=4 * 2 * c * hw * hw, flops=0, case=f"shuffle_{name}",
            shape=f"1x{c}x{hw}x{hw} g{g}", effops_rel_err_vs_fp64=0.0, eager_rel_err_vs_fp64=0.0)


POOL_LINEAR = [("ese_vovnet19b_dw_head_b1", 1024, 7, 1000), ("regnety_016_head_b1", 888, 7, 1000)]


@pytest.mark.parametrize("case", POOL_LINEAR, ids=lambda c: c[0])
def test_pool_linear(case, m, results):
    timm = pytest.importorskip("timm")
    name, c, hw, cout = case
    torch.manual_seed(0)
    head = timm.layers.ClassifierHead(c, cout).eval()
    x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
    w, b = head.fc.weight.detach(), head.fc.bias.detach()
    with torch.inference_mode():
        rel = check_numerics(m.pool_linear(x, w, b), F.linear(x.double().mean((2, 3)), w.double(), b.double()),
                             head(x))
        timed = _time_cold({"eager": lambda: head(x), "effops": lambda: m.pool_linear(x, w, b)})
    _record(results, timed, min_bytes=4 * (w.numel() + b.numel() + x.numel() + cout), flops=2 * c * cout + c * hw * hw,
            case=f"pool_linear_{name}", shape=f"1x{c}x{hw}x{hw} -> {cout}", **rel)


@pytest.mark.parametrize("case", [c for c in SHUFFLE if c[3] == 2], ids=lambda c: c[0])
def test_interleave(case, m, results):
    name, c, hw, _ = case
    x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
    half = c // 2
    a, b = x[:, :half], torch.randn(1, half, hw, hw).contiguous(memory_format=torch.channels_last)
    out = torch.empty(1, c, hw, hw).contiguous(memory_format=torch.channels_last)

    def eager_fn():
        out[:, 0::2].copy_(a)
        out[:, 1::2].copy_(b)

    m.interleave_channels(a, b, out)
    assert torch.equal(out, torch.stack((a, b), dim=2).flatten(1, 2)), "effops interleave differs"
    with torch.inference_mode():
        timed = _time({"eager": eager_fn, "effops": lambda: m.interleave_channels(a, b, out)})
    _record(results, timed, min_bytes=4 * 2 * c * hw * hw, flops=0, case=f"interleave_{name}",
            shape=f"1x{half}x{hw}x{hw} x2", effops_rel_err_vs_fp64=0.0, eager_rel_err_vs_fp64=0.0)


# (name, C, H, kernel, stride, padding, ceil_mode): VoVNet-39 / ese_vovnet's stage pools,
# ResNet-50's and ShuffleNetV2's stem pools.
POOLS = [("vovnet_s2_256x56", 256, 56, 3, 2, 0, True), ("vovnet_s3_512x28", 512, 28, 3, 2, 0, True),
         ("resnet_stem_64x112", 64, 112, 3, 2, 1, False), ("shufflenet_stem_24x112", 24, 112, 3, 2, 1, False)]


@pytest.mark.parametrize("case", POOLS, ids=lambda c: c[0])
def test_max_pool(case, m, results):
    """effops.MaxPool2d's native kernel against ATen's CPU max pool (which also writes the indices)."""
    name, c, hw, k, s, p, ceil = case
    x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.max_pool2d(x, k, s, p, ceil_mode=ceil)
    y = m.max_pool_nhwc(x, [k, k], [s, s], [p, p], ceil)
    assert torch.equal(y, want), "effops max pool differs"
    with torch.inference_mode():
        timed = _time({"eager": lambda: torch.nn.functional.max_pool2d(x, k, s, p, ceil_mode=ceil),
                       "effops": lambda: m.max_pool_nhwc(x, [k, k], [s, s], [p, p], ceil)})
    _record(results, timed, min_bytes=4 * (x.numel() + y.numel()), flops=0, case=f"max_pool_{name}",
            shape=f"1x{c}x{hw}x{hw} k{k} s{s} p{p}", effops_rel_err_vs_fp64=0.0, eager_rel_err_vs_fp64=0.0)


# (name, rows, in, out): classifier heads at batch 1 (and one at 8).
LINEAR = [("vovnet39_head_b1", 1, 1024, 1000), ("mnv3_head_b1", 1, 1280, 1000), ("resnet50_head_b1", 1, 2048, 1000),
          ("mnv3_head_b8", 8, 1280, 1000)]


def _time_cold(providers, rounds=ROUNDS):
    """Like _time, each call timed alone after 64 MB are written (untimed): weights come from memory."""
    evict = torch.empty(16 << 20)
    per_round = {p: [] for p in providers}
    for fn in providers.values():
        fn()
    for _ in range(rounds):
        for prov, fn in providers.items():
            evict.add_(1.0)
            t0 = time.perf_counter()
            fn()
            per_round[prov].append((time.perf_counter() - t0) * 1e3)
    times = {p: statistics.median(v) for p, v in per_round.items()}
    none = {p: None for p in times}
    return times, none, none, {}


@pytest.mark.parametrize("case", LINEAR, ids=lambda c: c[0])
def test_linear(case, m, results):
    name, rows, cin, cout = case
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, cin), torch.randn(cout, cin) / cin ** 0.5, torch.randn(cout)
    rel = check_numerics(m.linear(x, w, b, "identity", 0.0), F.linear(x.double(), w.double(), b.double()),
                         F.linear(x, w, b))
    with torch.inference_mode():
        timed = _time_cold({"eager": lambda: F.linear(x, w, b), "effops": lambda: m.linear(x, w, b, "identity", 0.0)})
    _record(results, timed, min_bytes=4 * (w.numel() + b.numel() + x.numel() + rows * cout), flops=2 * rows * cin * cout,
            case=f"linear_{name}", shape=f"{rows}x{cin} -> {cout}", **rel)
