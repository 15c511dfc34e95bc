"""torch.compile over modules on the native CPU backend: what the trace holds (functional native ops,
no graph breaks) and the numerics of the compiled result."""
import pytest
import torch
import torch._inductor.config as inductor_config

import effops
from effops import native as _native
from effops.nn.ghost import FusedGhostModule
from effops.ops.conv import DW_PAIR_NATIVE_OP, GHOST_NATIVE_OP, NATIVE_BN_OP, PAIR_NATIVE_OP
from effops.ops.shuffle import INTERLEAVE_NATIVE_OP

from helpers import assert_matches, randomize_bn

pytestmark = pytest.mark.skipif(
    not _native.available() or effops.dispatch.CPU_PREFERENCE != "native",
    reason="these compiled paths serve the native CPU backend when it is the preferred one (not in the "
           "EFFOPS_CPU_BACKEND=triton pass, where CPU tensors take the Triton interpreter)")


def _recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("out_chs,gated", [(16, False), (16, True), (15, False)])
def test_compiled_ghost_module_is_functional_native_ops(out_chs, gated):
    """Under compile a ghost module traces to one functional ghost op when every cheap channel is
    kept, else to the native conv op twice and a cat (BN tensors as inputs, no scale/bias math):
    never a preallocated buffer written through views."""
    timm = pytest.importorskip("timm")
    from timm.models.ghostnet import GhostModule

    torch._dynamo.reset()
    ref = randomize_bn(GhostModule(8, out_chs)).eval()
    fused = FusedGhostModule.from_module(ref).eval()
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    g = torch.rand(2, 8) if gated else None
    graphs = []
    with torch.no_grad():
        y = torch.compile(fused, fullgraph=True, backend=_recording_backend(graphs))(x, gate=g)
    assert len(graphs) == 1
    targets = _targets(graphs[0])
    if out_chs == 16:
        assert targets.count(GHOST_NATIVE_OP) == 1 and NATIVE_BN_OP not in targets, targets
    else:
        assert targets.count(NATIVE_BN_OP) == 2 and targets.count(torch.cat) == 1, targets
    assert torch.empty not in targets and torch.ops.effops.conv_bn_act.default not in targets, targets
    xg = x.double() if g is None else x.double() * g.double()[:, :, None, None]
    assert y.shape == (2, out_chs, 9, 7)
    assert_matches(y, ref.double()(xg))


@pytest.mark.slow
def test_ghostnet_inductor_freezing_one_graph_and_numerics():
    """A whole optimized GhostNet under inductor with freezing: one graph, fp32 within 1e-5 of fp64."""
    timm = pytest.importorskip("timm")
    torch._dynamo.reset()
    model = randomize_bn(timm.create_model("ghostnet_050", num_classes=10)).eval()
    fast = effops.optimize(model, check_speed=False)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        y = torch.compile(fast, fullgraph=True)(x)
    assert_matches(y, model.double()(x.double()))


@pytest.mark.parametrize("name", ["tv:mobilenet_v2", "efficientnet_b0"])
def test_compiled_inverted_residuals_keep_their_pairs(name):
    """A model whose expand → depthwise pairs run as one banded native call in eager compiles to one
    graph where each pair is one functional pair op and every other conv one native conv op, within
    1e-5 of float64."""
    if name.startswith("tv:"):
        import torchvision

        model = getattr(torchvision.models, name[3:])(num_classes=10)
    else:
        model = pytest.importorskip("timm").create_model(name, num_classes=10)
    torch._dynamo.reset()
    model = randomize_bn(model).eval()
    fast = effops.optimize(model, check_speed=False)
    x = torch.randn(1, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    graphs = []
    with torch.no_grad():
        y = torch.compile(fast, fullgraph=True, backend=_recording_backend(graphs))(x)
    assert len(graphs) == 1
    targets = _targets(graphs[0])
    # every conv but the squeeze-excite modules' (their gate math is separate ops)
    convs = sum(1 for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and ".se." not in n)
    pairs, dw_pairs = targets.count(PAIR_NATIVE_OP), targets.count(DW_PAIR_NATIVE_OP)
    # MobileNetV2's first block is a depthwise -> 1x1 pair; EfficientNet's has an SE between the two
    assert pairs >= 15 and dw_pairs == (name == "tv:mobilenet_v2") and targets.count(NATIVE_BN_OP) + 2 * (pairs + dw_pairs) == convs, \
        (pairs, dw_pairs, convs)
    assert_matches(y, model.double()(x.double()))


def test_compiled_separable_convs_keep_their_pairs():
    """A bare depthwise conv before a fused 1x1 unit (a Sequential) and a traced dw -> BN -> act -> 1x1
    -> BN + shortcut compile to one graph with one depthwise -> 1x1 pair op each, within 1e-5 of
    float64."""
    import torch.nn as nn

    class DS(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv_dw, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c)
            self.conv_pw, self.bn2 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return self.bn2(self.conv_pw(torch.relu(self.bn1(self.conv_dw(x))))) + x

    torch._dynamo.reset()
    model = randomize_bn(nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=False),
                                       nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(), DS(24))).eval()
    fast = effops.optimize(model, check_speed=False)
    x = torch.randn(2, 16, 20, 20).contiguous(memory_format=torch.channels_last)
    graphs = []
    with torch.no_grad():
        y = torch.compile(fast, fullgraph=True, backend=_recording_backend(graphs))(x)
    assert len(graphs) == 1
    targets = _targets(graphs[0])
    assert targets.count(DW_PAIR_NATIVE_OP) == 2 and NATIVE_BN_OP not in targets, targets
    assert_matches(y, model.double()(x.double()))
    # a deep copy's pairs take their settings from the copy (a trace constant each)
    import copy

    twin = copy.deepcopy(fast)
    twin[0].stride = (1, 1)
    torch._dynamo.reset()
    graphs.clear()
    with torch.no_grad():
        y2 = torch.compile(twin, fullgraph=True, backend=_recording_backend(graphs))(x)
    assert len(graphs) == 1 and _targets(graphs[0]).count(DW_PAIR_NATIVE_OP) == 2
    ref = copy.deepcopy(model)
    ref[0].stride = (1, 1)
    assert_matches(y2, ref.double()(x.double()))


def test_compile_before_the_extension_is_loaded_has_no_graph_break():
    """Loading the extension (a lock, hashing the sources) can't be traced: a model compiled before
    any eager native call still traces as one graph."""
    model = randomize_bn(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                             torch.nn.BatchNorm2d(8), torch.nn.ReLU())).eval()
    fast = effops.optimize(model, check_speed=False)
    x = torch.randn(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    _native._reset_for_tests()
    graphs = []
    with torch.no_grad():
        y = torch.compile(fast, fullgraph=True, backend=_recording_backend(graphs))(x)
    assert len(graphs) == 1 and NATIVE_BN_OP in _targets(graphs[0])
    assert_matches(y, model.double()(x.double()))


class _Residual(torch.nn.Module):
    """A hand-written forward: optimize installs a traced, fused forward on it."""

    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(c)
        self.act = torch.nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + x)


def test_child_replaced_after_compile_is_seen():
    """A compiled, optimized model whose child is replaced afterwards runs the new child: the
    structure check traced into the graph is two integers, and the replacement moves one of them,
    so dynamo's guard fails and the model is traced again."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(randomize_bn(_Residual(8)), randomize_bn(_Residual(8))).eval()
    fast = effops.optimize(model, check_speed=False)
    assert effops.nn.traced.traced_forward_of(fast[0]) is not None
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(fast, backend="eager")
    with torch.no_grad():
        assert_matches(compiled(x), model.double()(x.double()))
        new = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        fast[0].conv = new
        model[0].conv = new
        with pytest.warns(UserWarning, match="replaced after optimize"):
            y = compiled(x)
    assert_matches(y, model.double()(x.double()))


def test_native_ops_have_no_backward():
    """The native ops are inference-only: a backward through them is an error, never a silent zero."""
    _native.module()  # registers the C++ kernels
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 4, 1, 1, requires_grad=True)
    y = NATIVE_BN_OP(x, w, None, None, None, None, None, 1e-5, None, [1, 1], [0, 0], [1, 1], 1, "relu", 0.0, True,
                     None, 1, None)
    assert_matches(y, torch.relu(torch.nn.functional.conv2d(x.double(), w.double())))
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()
    a = torch.randn(1, 4, 3, 3, requires_grad=True).contiguous(memory_format=torch.channels_last)
    y = INTERLEAVE_NATIVE_OP(a, x[:, :, :3, :3])
    assert torch.equal(y, torch.stack((a, x[:, :, :3, :3]), 2).flatten(1, 2))
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()


def test_opcheck_native_ops():
    """The compile-only native ops: schema, fake kernels (shapes, strides, dtypes) against the C++ kernels."""
    from effops.ops.se import APPLY_NATIVE_OP, GATE_NATIVE_OP

    _native.module()
    x = torch.randn(2, 6, 5, 4).contiguous(memory_format=torch.channels_last)
    w, bw, bb, rm, rv = torch.randn(6, 6, 1, 1), torch.rand(6), torch.rand(6), torch.rand(6), torch.rand(6) + 0.5
    torch.library.opcheck(NATIVE_BN_OP, (x, w, None, bw, bb, rm, rv, 1e-5, None, [1, 1], [0, 0], [1, 1], 1, "relu",
                                         0.0, True, None, 1, None))
    dw = torch.randn(6, 1, 3, 3)
    torch.library.opcheck(GHOST_NATIVE_OP, (x, None, w, None, bw, bb, rm, rv, 1e-5, None, [1, 1], [0, 0], [1, 1], 1,
                                            "relu", 0.0, dw, None, bw, bb, rm, rv, 1e-5, None, [1, 1], [1, 1], 6,
                                            "relu", 0.0))
    for stride in (1, 2):
        torch.library.opcheck(PAIR_NATIVE_OP, (x, w, None, bw, bb, rm, rv, 1e-5, None, "relu6", 0.0, dw, None, bw, bb,
                                               rm, rv, 1e-5, None, [stride, stride], [1, 1], [1, 1], "relu6", 0.0))
    for stride, res in ((1, torch.randn_like(x)), (2, None)):
        torch.library.opcheck(DW_PAIR_NATIVE_OP, (x, dw, None, bw, bb, rm, rv, 1e-5, None, [stride, stride], [1, 1],
                                                  [1, 1], "relu6", 0.0, w, None, bw, bb, rm, rv, 1e-5, None,
                                                  "identity", 0.0, res))
    rw, rb, ew, eb = torch.randn(2, 6), torch.randn(2), torch.randn(6, 2), torch.randn(6)
    torch.library.opcheck(GATE_NATIVE_OP, (x, rw, rb, ew, eb, "relu", 0.0, "sigmoid", 0.0))
    torch.library.opcheck(APPLY_NATIVE_OP, (x, torch.rand(2, 6), torch.randn_like(x), "relu", 0.0))
    torch.library.opcheck(APPLY_NATIVE_OP, (x.contiguous(), torch.rand(2, 6), None, "identity", 0.0))
    buf = torch.randn(2, 12, 5, 4).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(INTERLEAVE_NATIVE_OP, (buf[:, :6], x))  # a channel view and a dense half
    from effops.ops.osa import OSA_NATIVE_OP

    s5, b5 = torch.rand(5) + 0.5, torch.randn(5)
    mids = [torch.randn(5, 5, 1, 1), torch.randn(5, 5, 1, 1)]
    for identity, ese in ((False, True), (True, False)):  # depthwise stages with a reduction; NCHW in
        c = 6 if not identity else 5
        xi = torch.randn(2, c, 5, 4)
        red = (torch.randn(5, c, 1, 1), s5, b5) if c != 5 else (None, None, None)
        agg = torch.randn(c, c + 10, 1, 1)
        torch.library.opcheck(OSA_NATIVE_OP, (xi, *red, [dw[:5], dw[:5]], mids, [s5, s5], [b5, b5], agg,
                                              torch.rand(c) + 0.5, torch.randn(c),
                                              torch.randn(c, c, 1, 1) if ese else None,
                                              torch.randn(c) if ese else None, identity, "relu", 0.0))


@pytest.mark.parametrize("layout", ["nchw", "nchw_channel_view", "one_pixel", "empty_batch"])
@pytest.mark.parametrize("kernel", ["pointwise", "depthwise", "dense3x3"])
def test_native_ops_output_nhwc_whatever_the_input_layout(layout, kernel):
    """The native ops' outputs are NHWC for any input layout, with exactly the strides their fake
    kernels promise: oneDNN with a prepacked weight writes NHWC even for an NCHW input, and a compiled
    graph asserts every output's strides (an NCHW model compiled after optimize failed there)."""
    _native.module()
    x = {"nchw": lambda: torch.randn(2, 8, 5, 5), "nchw_channel_view": lambda: torch.randn(1, 16, 5, 5)[:, 8:],
         "one_pixel": lambda: torch.randn(1, 8, 1, 1), "empty_batch": lambda: torch.randn(0, 8, 5, 5)}[layout]()
    k, g = {"pointwise": (1, 1), "depthwise": (3, 8), "dense3x3": (3, 1)}[kernel]
    w = torch.randn(8, 8 // g, k, k)
    bn = (torch.rand(8), torch.rand(8), torch.rand(8), torch.rand(8) + 0.5)
    for shuffle in (1, 2):
        args = (x, w, None, *bn, 1e-5, None, [1, 1], [k // 2] * 2, [1, 1], g, "relu", 0.0, True, None, shuffle,
                torch.tensor(0))
        torch.library.opcheck(NATIVE_BN_OP, args)
        y = NATIVE_BN_OP(*args)
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(GHOST_NATIVE_OP, (x, None, torch.randn(8, 8, 1, 1), None, *bn, 1e-5, None, [1, 1], [0, 0],
                                            [1, 1], 1, "relu", 0.0, torch.randn(8, 1, 3, 3), None, *bn, 1e-5, None,
                                            [1, 1], [1, 1], 8, "relu", 0.0))


def test_compiled_nchw_model_after_optimize():
    """An NCHW model and input through optimize and inductor with freezing: the native ops' NHWC
    outputs are what the compiled graph expects, and the numerics hold."""
    torch._dynamo.reset()
    model = randomize_bn(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 1, bias=False), torch.nn.BatchNorm2d(16))).eval()
    fast = effops.optimize(model, check_speed=False)
    x = torch.randn(2, 3, 10, 10)
    with torch.inference_mode(), inductor_config.patch(freezing=True):
        y = torch.compile(fast)(x)
    assert_matches(y, model.double()(x.double()))


@pytest.mark.parametrize("stride", [1, 2])
def test_compiled_shufflenet_unit_is_functional_native_ops(stride):
    """Under compile a ShuffleNetV2 unit traces to the native conv op per conv and one native
    interleave op: no writes into channel views of a buffer, no stack for inductor to gather."""
    from torchvision.models.shufflenetv2 import InvertedResidual

    from effops.nn.shufflenet import FusedShuffleV2Block

    torch._dynamo.reset()
    cin = 16 if stride == 1 else 8
    ref = randomize_bn(InvertedResidual(cin, 16, stride)).eval()
    fused = FusedShuffleV2Block.from_module(ref).eval()
    x = torch.randn(2, cin, 8, 6).contiguous(memory_format=torch.channels_last)
    graphs = []
    with torch.no_grad():
        y = torch.compile(fused, fullgraph=True, backend=_recording_backend(graphs))(x)
    targets = _targets(graphs[0])
    assert targets.count(NATIVE_BN_OP) == (3 if stride == 1 else 5), targets
    assert targets.count(INTERLEAVE_NATIVE_OP) == 1 and torch.stack not in targets, targets
    assert torch.ops.effops.conv_bn_act.default not in targets and torch.empty not in targets, targets
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches(y, ref.double()(x.double()))


def test_equal_valued_new_bn_tensors_reuse_the_packed_weight():
    """Inductor with freezing inlines constants of up to 8 elements, so an 8-channel BN reaches the
    native op as new tensors on every call: equal values must reuse the folded, packed weight (a
    repack per call would cost a oneDNN reorder), and changed values must not."""
    from torch.profiler import profile

    _native.module()
    x = torch.randn(1, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3)
    bn = [torch.rand(8), torch.rand(8), torch.rand(8), torch.rand(8) + 0.5]

    def call(bn_tensors):
        return NATIVE_BN_OP(x, w, None, *bn_tensors, 1e-5, None, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, True, None,
                            1, torch.tensor(0))

    def reorders(fn):
        with profile() as p:
            fn()
        return sum(e.name == "aten::mkldnn_reorder_conv2d_weight" for e in p.events())

    with torch.no_grad():
        call(bn)
        assert reorders(lambda: call([t.clone() for t in bn])) == 0
        changed = [bn[0] * 2] + [t.clone() for t in bn[1:]]
        y = call(changed)
    g, b, m, v = (t.double() for t in changed)
    ref = torch.nn.functional.batch_norm(torch.nn.functional.conv2d(x.double(), w.double(), padding=1), m, v, g, b,
                                         False, 0.0, 1e-5)
    assert_matches(y, torch.relu(ref))


def _guard_lines(fn) -> list:
    """The guard tree Dynamo installs while ``fn()`` compiles, one line per node (as
    ``TORCH_LOGS=guards`` prints it)."""
    import logging

    lines = []

    class _Handler(logging.Handler):
        def emit(self, record):
            lines.extend(record.getMessage().splitlines())

    handler = _Handler()
    loggers = [logging.getLogger(n) for n in ("torch._dynamo.guards", "torch.__guards")]
    torch._logging.set_logs(guards=True)
    for lg in loggers:
        lg.addHandler(handler)
    try:
        fn()
    finally:
        torch._logging.set_logs()
        for lg in loggers:
            lg.removeHandler(handler)
    return lines


def test_compiled_fused_modules_leave_their_internals_unguarded():
    """Every guard node is evaluated on every compiled call (from cold caches, after the previous
    call's kernels): the trace reads neither a traced block's internal graph module's hook dicts
    (its forward is called directly) nor a fused conv's eager plan or default arguments."""
    timm = pytest.importorskip("timm")
    torch._dynamo.reset()
    model = randomize_bn(timm.create_model("efficientnet_b0", num_classes=10)).eval()
    fast = effops.optimize(model, check_speed=False)
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast(x)
        fast(x)  # eager calls build each conv's plan: the trace must not read it
        lines = _guard_lines(lambda: torch.compile(fast, backend="eager")(x))
    guards = [line.split("  # ")[0] for line in lines]  # what is guarded, without the code that read it
    assert any("TENSOR_MATCH" in g for g in guards)  # the log was captured
    assert [g for g in guards if ".graph_module._forward" in g or ".graph_module._backward" in g] == []
    assert [g for g in guards if "_native_plan" in g or "['_compiled_native_args'].__defaults__" in g] == []


def _conv_bn_relu_net():
    c = 8
    return randomize_bn(torch.nn.Sequential(
        torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c), torch.nn.ReLU(),
        torch.nn.Conv2d(c, c, 1, bias=False), torch.nn.BatchNorm2d(c), torch.nn.ReLU())).eval()


@pytest.mark.parametrize("freezing", [False, True])
def test_compiled_fused_convs_take_tensors_as_constants_under_freezing(freezing):
    """Under inductor's freezing (parameters and buffers become constants of the compiled code) a
    compiled fused conv takes its weight and BN tensors as constants of the trace: no guard per
    tensor (each a cache miss per call); the structure epoch, one guard, retraces when a parameter
    or buffer is assigned. Without freezing the trace reads the live tensors (guarded, and updates
    in place show through)."""
    import copy

    torch._dynamo.reset()
    model = _conv_bn_relu_net()
    ref = copy.deepcopy(model).double()
    fast = effops.optimize(model, check_speed=False)
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    conv, bn = fast[0], fast[1]
    with torch.no_grad(), inductor_config.patch(freezing=freezing):
        compiled = torch.compile(fast)
        lines = _guard_lines(lambda: compiled(x))
        assert any("TENSOR_MATCH" in g for g in lines)  # the log was captured
        tensor_guards = [g for g in lines if "_parameters['weight']" in g or "_buffers['running_mean']" in g]
        assert (tensor_guards == []) == freezing
        assert_matches(compiled(x), ref(x.double()))

        w = torch.randn_like(conv.weight)
        conv.weight = torch.nn.Parameter(w)  # a new parameter: retraced
        ref[0].weight = torch.nn.Parameter(w.double())
        assert_matches(compiled(x), ref(x.double()))

        v = torch.rand(8) + 0.25
        bn.running_var = v  # a new buffer: retraced
        ref[1].running_var = v.double()
        assert_matches(compiled(x), ref(x.double()))

        if not freezing:  # read live: in-place updates show through
            conv.weight.mul_(0.5)
            bn.running_mean.add_(1.0)
            ref[0].weight.mul_(0.5)
            ref[1].running_mean.add_(1.0)
            assert_matches(compiled(x), ref(x.double()))


def test_compiled_se_under_freezing_takes_its_fc_weights_as_constants():
    """The squeeze-excite module's fc weights and biases, like a fused conv's tensors: constants of
    a freezing trace (no guard each), retraced when one is assigned."""
    import copy

    from effops import SqueezeExcite

    torch._dynamo.reset()
    se = SqueezeExcite(8, 4).eval()
    with torch.no_grad():
        for p in se.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ref = copy.deepcopy(se).double()
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        compiled = torch.compile(se)
        lines = _guard_lines(lambda: compiled(x))
        assert any("TENSOR_MATCH" in g for g in lines)  # the log was captured
        assert [g for g in lines if "_parameters['weight']" in g or "_parameters['bias']" in g] == []
        assert_matches(compiled(x), ref.forward_unfused(x.double()))
        fc = [m for m in se.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        w = torch.randn_like(fc.weight)
        fc.weight = torch.nn.Parameter(w)
        [m for m in ref.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight = torch.nn.Parameter(w.double())
        assert_matches(compiled(x), ref.forward_unfused(x.double()))
