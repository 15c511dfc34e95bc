// Python bindings of effops' native CPU backend (effops/native.py loads this module, built
// ahead of time by setup.py or just in time by torch.utils.cpp_extension).
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "native.h"

namespace en = effops_native;

namespace {

std::string build_info() {
  std::string s = "C++" + std::to_string(__cplusplus / 100 % 100);  // C++17, C++20, ...
#if defined(__AVX512F__)
  s += " avx512f";
#elif defined(__AVX2__)
  s += " avx2";
#endif
#if defined(__AVX512BF16__)
  s += " avx512_bf16";
#endif
#if defined(_OPENMP)
  s += " openmp";
#endif
  return s;
}

// effops::conv_bn_act_native's CPU kernel (the op is defined in effops/ops/conv.py): compiled
// graphs call it through the dispatcher straight into C++, with no Python in between.
at::Tensor conv_bn_act_native_cpu(const at::Tensor& x, const at::Tensor& weight, const en::OptTensor& conv_bias,
                                  const en::OptTensor& bn_weight, const en::OptTensor& bn_bias,
                                  const en::OptTensor& running_mean, const en::OptTensor& running_var, double eps,
                                  const en::OptTensor& residual, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                  c10::IntArrayRef dilation, int64_t groups, c10::string_view act, double act_param,
                                  bool residual_after_act, const en::OptTensor& gate, int64_t out_shuffle_groups,
                                  const en::OptTensor& stats_counter) {
  // Always NHWC with exactly the strides of the op's fake implementation (effops/ops/conv.py,
  // _native_nhwc_output), whatever x's layout: the compiled graph asserts them. Every kernel path
  // already returns such a tensor in practice; anything else is copied.
  at::Tensor y = en::conv_bn_act(x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, residual,
                                 std::nullopt, stride.vec(), padding.vec(), dilation.vec(), groups, std::string(act),
                                 act_param, residual_after_act, gate, out_shuffle_groups, stats_counter);
  if (y.strides() == c10::IntArrayRef(c10::get_channels_last_strides_2d(y.sizes()))) return y;
  return at::empty(y.sizes(), y.options().memory_format(at::MemoryFormat::ChannelsLast)).copy_(y);
}

// effops::ghost_native's CPU kernel (defined in effops/ops/conv.py, whose Python version it
// mirrors): the primary conv into channels [0, C1) of one buffer, the cheap conv reading them in
// place into [C1, C1 + C2).
at::Tensor ghost_native_cpu(const at::Tensor& x, const en::OptTensor& gate, const at::Tensor& w1,
                            const en::OptTensor& cb1, const en::OptTensor& bw1, const en::OptTensor& bb1,
                            const en::OptTensor& rm1, const en::OptTensor& rv1, double eps1,
                            const en::OptTensor& counter1, c10::IntArrayRef stride1, c10::IntArrayRef padding1,
                            c10::IntArrayRef dilation1, int64_t groups1, c10::string_view act1, double act_param1,
                            const at::Tensor& w2, const en::OptTensor& cb2, const en::OptTensor& bw2,
                            const en::OptTensor& bb2, const en::OptTensor& rm2, const en::OptTensor& rv2, double eps2,
                            const en::OptTensor& counter2, c10::IntArrayRef padding2, c10::IntArrayRef dilation2,
                            int64_t groups2, c10::string_view act2, double act_param2) {
  TORCH_CHECK_VALUE(x.dim() == 4 && w1.dim() == 4 && w2.dim() == 4, "effops ghost_native: expected 4-D x and weights");
  const auto [oh, ow] = en::conv_out_hw(x, w1, stride1.vec(), padding1.vec(), dilation1.vec());
  const int64_t init = w1.size(0);
  // NHWC whatever x's layout, as the op's fake implementation promises (effops/ops/conv.py).
  at::Tensor buf = at::empty({x.size(0), init + w2.size(0), oh, ow}, x.options(), at::MemoryFormat::ChannelsLast);
  at::Tensor x1 = buf.narrow(1, 0, init);
  en::conv_bn_act(x, w1, cb1, bw1, bb1, rm1, rv1, eps1, std::nullopt, x1, stride1.vec(), padding1.vec(),
                  dilation1.vec(), groups1, std::string(act1), act_param1, true, gate, 1, counter1);
  en::conv_bn_act(x1, w2, cb2, bw2, bb2, rm2, rv2, eps2, std::nullopt, buf.narrow(1, init, w2.size(0)), {1, 1},
                  padding2.vec(), dilation2.vec(), groups2, std::string(act2), act_param2, true, std::nullopt, 1,
                  counter2);
  return buf;
}

// effops::pointwise_depthwise_native's CPU kernel (effops/ops/conv.py): an expand 1x1 conv and a
// depthwise conv as one banded pair (pointwise_depthwise_bn_act), with the fake's NHWC strides.
at::Tensor pointwise_depthwise_native_cpu(
    const at::Tensor& x, const at::Tensor& w1, const en::OptTensor& cb1, const en::OptTensor& bw1,
    const en::OptTensor& bb1, const en::OptTensor& rm1, const en::OptTensor& rv1, double eps1,
    const en::OptTensor& counter1, c10::string_view act1, double act_param1, const at::Tensor& w2,
    const en::OptTensor& cb2, const en::OptTensor& bw2, const en::OptTensor& bb2, const en::OptTensor& rm2,
    const en::OptTensor& rv2, double eps2, const en::OptTensor& counter2, c10::IntArrayRef stride2,
    c10::IntArrayRef padding2, c10::IntArrayRef dilation2, c10::string_view act2, double act_param2) {
  at::Tensor y = en::pointwise_depthwise_bn_act(x, w1, cb1, bw1, bb1, rm1, rv1, eps1, counter1, std::string(act1),
                                                act_param1, w2, cb2, bw2, bb2, rm2, rv2, eps2, counter2, stride2.vec(),
                                                padding2.vec(), dilation2.vec(), std::string(act2), act_param2);
  if (y.strides() == c10::IntArrayRef(c10::get_channels_last_strides_2d(y.sizes()))) return y;  // as conv_bn_act_native
  return at::empty(y.sizes(), y.options().memory_format(at::MemoryFormat::ChannelsLast)).copy_(y);
}

// effops::depthwise_pointwise_native's CPU kernel (effops/ops/conv.py): a depthwise conv and a 1x1
// conv as one banded pair (depthwise_pointwise_bn_act), with the fake's NHWC strides.
at::Tensor depthwise_pointwise_native_cpu(
    const at::Tensor& x, const at::Tensor& w1, const en::OptTensor& cb1, const en::OptTensor& bw1,
    const en::OptTensor& bb1, const en::OptTensor& rm1, const en::OptTensor& rv1, double eps1,
    const en::OptTensor& counter1, c10::IntArrayRef stride1, c10::IntArrayRef padding1, c10::IntArrayRef dilation1,
    c10::string_view act1, double act_param1, const at::Tensor& w2, const en::OptTensor& cb2,
    const en::OptTensor& bw2, const en::OptTensor& bb2, const en::OptTensor& rm2, const en::OptTensor& rv2,
    double eps2, const en::OptTensor& counter2, c10::string_view act2, double act_param2,
    const en::OptTensor& residual) {
  at::Tensor y = en::depthwise_pointwise_bn_act(x, w1, cb1, bw1, bb1, rm1, rv1, eps1, counter1, stride1.vec(),
                                                padding1.vec(), dilation1.vec(), std::string(act1), act_param1, w2,
                                                cb2, bw2, bb2, rm2, rv2, eps2, counter2, std::string(act2),
                                                act_param2, residual);
  if (y.strides() == c10::IntArrayRef(c10::get_channels_last_strides_2d(y.sizes()))) return y;  // as conv_bn_act_native
  return at::empty(y.sizes(), y.options().memory_format(at::MemoryFormat::ChannelsLast)).copy_(y);
}

// effops::osa_block_native (effops/ops/osa.py): a whole OSA block under torch.compile on CPU, NHWC
// out as the op's fake implementation promises.
at::Tensor osa_block_native_cpu(const at::Tensor& x, const en::OptTensor& red_w, const en::OptTensor& red_s,
                                const en::OptTensor& red_b, at::TensorList dw_ws, at::TensorList mid_ws,
                                at::TensorList mid_ss, at::TensorList mid_bs, const at::Tensor& agg_w,
                                const en::OptTensor& agg_s, const en::OptTensor& agg_b, const en::OptTensor& ese_w,
                                const en::OptTensor& ese_b, bool identity, c10::string_view act, double act_param) {
  at::Tensor y = en::osa_block_native(x, red_w, red_s, red_b, dw_ws.vec(), mid_ws.vec(), mid_ss.vec(), mid_bs.vec(),
                                      agg_w, agg_s, agg_b, ese_w, ese_b, identity, std::string(act), act_param);
  if (y.strides() == c10::IntArrayRef(c10::get_channels_last_strides_2d(y.sizes()))) return y;
  return at::empty(y.sizes(), y.options().memory_format(at::MemoryFormat::ChannelsLast)).copy_(y);
}

// effops::se_gate_native / se_apply_native (effops/ops/se.py): the SE ops of compiled CPU inference.
at::Tensor se_gate_native_cpu(const at::Tensor& x, const en::OptTensor& rw, const en::OptTensor& rb,
                              const at::Tensor& ew, const en::OptTensor& eb, c10::string_view act, double act_param,
                              c10::string_view gate, double gate_param) {
  return en::se_gate(x, rw, rb, ew, eb, en::parse_act(std::string(act)), act_param,
                     en::parse_act(std::string(gate)), gate_param);
}

at::Tensor se_apply_native_cpu(const at::Tensor& x, const at::Tensor& gate, const en::OptTensor& residual,
                               c10::string_view act, double act_param) {
  // The layout of effops.ops.conv.output_format(x), which the op's fake implementation promises.
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(en::prefers_channels_last(x)
                                                                      ? at::MemoryFormat::ChannelsLast
                                                                      : at::MemoryFormat::Contiguous));
  return en::se_apply(x, gate, residual, out, en::parse_act(std::string(act)), act_param);
}

// effops::interleave_native (effops/ops/shuffle.py): the ShuffleNetV2 unit's interleave, NHWC.
at::Tensor interleave_native_cpu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.dim() == 4, "effops interleave_native: expected 4-D halves, got ", a.dim(), "-D");
  at::Tensor out = at::empty({a.size(0), 2 * a.size(1), a.size(2), a.size(3)},
                             a.options().memory_format(at::MemoryFormat::ChannelsLast));
  en::interleave_channels(a, b, out);
  return out;
}

// effops::linear_native (effops/ops/linear.py): effops.Linear under torch.compile on CPU.
at::Tensor linear_native_cpu(const at::Tensor& x, const at::Tensor& w, const en::OptTensor& b, c10::string_view act,
                             double act_param) {
  return en::linear(x, w, b, en::parse_act(std::string(act)), act_param);
}

}  // namespace

TORCH_LIBRARY_IMPL(effops, CPU, m) {
  m.impl("linear_native", &linear_native_cpu);
  m.impl("interleave_native", &interleave_native_cpu);
  m.impl("se_gate_native", &se_gate_native_cpu);
  m.impl("se_apply_native", &se_apply_native_cpu);
  m.impl("conv_bn_act_native", &conv_bn_act_native_cpu);
  m.impl("ghost_native", &ghost_native_cpu);
  m.impl("pointwise_depthwise_native", &pointwise_depthwise_native_cpu);
  m.impl("depthwise_pointwise_native", &depthwise_pointwise_native_cpu);
  m.impl("osa_block_native", &osa_block_native_cpu);
}

// These ops are inference-only. This C++ autograd kernel replaces the Python one that
// torch.library.custom_op registers (about 10 us per call: a pytree walk over every argument
// looking for requires_grad); like it, it makes a backward through the op an error.
TORCH_LIBRARY_IMPL(effops, Autograd, m) {
  m.impl("linear_native", torch::autograd::autogradNotImplementedFallback());
  m.impl("conv_bn_act_native", torch::autograd::autogradNotImplementedFallback());
  m.impl("ghost_native", torch::autograd::autogradNotImplementedFallback());
  m.impl("pointwise_depthwise_native", torch::autograd::autogradNotImplementedFallback());
  m.impl("depthwise_pointwise_native", torch::autograd::autogradNotImplementedFallback());
  m.impl("osa_block_native", torch::autograd::autogradNotImplementedFallback());
  m.impl("se_gate_native", torch::autograd::autogradNotImplementedFallback());
  m.impl("se_apply_native", torch::autograd::autogradNotImplementedFallback());
  m.impl("interleave_native", torch::autograd::autogradNotImplementedFallback());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "effops native CPU kernels";
  m.def("build_info", &build_info, "compiler target features this module was built with");
  // The torch release the headers came from: the loader refuses a prebuilt module from another.
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);

  m.def("conv_scale_bias_act", &en::conv_scale_bias_act, py::arg("x"), py::arg("weight"), py::arg("scale"),
        py::arg("bias"), py::arg("residual"), py::arg("out"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"), py::arg("act"), py::arg("act_param"), py::arg("residual_after_act"),
        py::arg("gate") = py::none(), py::arg("out_shuffle_groups") = 1);
  m.def("conv_bn_act", &en::conv_bn_act, py::arg("x"), py::arg("weight"), py::arg("conv_bias"),
        py::arg("bn_weight"), py::arg("bn_bias"), py::arg("running_mean"), py::arg("running_var"), py::arg("eps"),
        py::arg("residual"), py::arg("out"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), py::arg("act"), py::arg("act_param"), py::arg("residual_after_act"),
        py::arg("gate") = py::none(), py::arg("out_shuffle_groups") = 1, py::arg("stats_counter") = py::none());
  m.def("conv_bn_act_segments", &en::conv_bn_act_segments, py::arg("segments"), py::arg("weight"),
        py::arg("conv_bias"), py::arg("bn_weight"), py::arg("bn_bias"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("eps"), py::arg("residual"), py::arg("out"), py::arg("act"),
        py::arg("act_param"), py::arg("residual_after_act"), py::arg("stats_counter") = py::none(),
        py::arg("pool") = py::none());
  m.def("conv_scale_bias_act_segments", &en::conv_scale_bias_act_segments, py::arg("segments"), py::arg("weight"),
        py::arg("scale"), py::arg("bias"), py::arg("residual"), py::arg("out"), py::arg("act"), py::arg("act_param"),
        py::arg("residual_after_act"), py::arg("pool") = py::none());
  m.def("pointwise_depthwise_bn_act", &en::pointwise_depthwise_bn_act, py::arg("x"), py::arg("pw_weight"),
        py::arg("pw_conv_bias"), py::arg("pw_bn_weight"), py::arg("pw_bn_bias"), py::arg("pw_running_mean"),
        py::arg("pw_running_var"), py::arg("pw_eps"), py::arg("pw_stats_counter"), py::arg("pw_act"),
        py::arg("pw_act_param"), py::arg("dw_weight"), py::arg("dw_conv_bias"), py::arg("dw_bn_weight"),
        py::arg("dw_bn_bias"), py::arg("dw_running_mean"), py::arg("dw_running_var"), py::arg("dw_eps"),
        py::arg("dw_stats_counter"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("dw_act"),
        py::arg("dw_act_param"),
        "act2(bn2(dwconv(act1(bn1(conv1x1(x)))))) with the expanded tensor computed a band of rows at a time");
  m.def("depthwise_pointwise_bn_act", &en::depthwise_pointwise_bn_act, py::arg("x"), py::arg("dw_weight"),
        py::arg("dw_conv_bias"), py::arg("dw_bn_weight"), py::arg("dw_bn_bias"), py::arg("dw_running_mean"),
        py::arg("dw_running_var"), py::arg("dw_eps"), py::arg("dw_stats_counter"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("dw_act"), py::arg("dw_act_param"), py::arg("pw_weight"),
        py::arg("pw_conv_bias"), py::arg("pw_bn_weight"), py::arg("pw_bn_bias"), py::arg("pw_running_mean"),
        py::arg("pw_running_var"), py::arg("pw_eps"), py::arg("pw_stats_counter"), py::arg("pw_act"),
        py::arg("pw_act_param"), py::arg("residual") = py::none(),
        "act2(bn2(conv1x1(act1(bn1(dwconv(x)))))) [+ residual] with the depthwise output computed a band of rows "
        "at a time");
  m.def("osa_block_native", &en::osa_block_native, py::arg("x"), py::arg("red_w"), py::arg("red_s"),
        py::arg("red_b"), py::arg("dw_ws"), py::arg("mid_ws"), py::arg("mid_ss"), py::arg("mid_bs"), py::arg("agg_w"),
        py::arg("agg_s"), py::arg("agg_b"), py::arg("ese_w"), py::arg("ese_b"), py::arg("identity"), py::arg("act"),
        py::arg("act_param"), "a whole OSA block (effops::osa_block's arguments), float32");
  m.def("osa_block_steps", &en::osa_block_steps, py::arg("x"), py::arg("steps"), py::arg("t"), py::arg("eps"),
        py::arg("acts"), py::arg("act_params"), py::arg("geom"), py::arg("ese_w"), py::arg("ese_b"),
        py::arg("identity"), py::arg("weight_sizes") = std::vector<int64_t>{},
        "FusedOSA's eager native steady state as one call, from the modules' own tensors (None: a weight "
        "no longer has the dtype, device or shape of weight_sizes)");
  // module_local: a second copy of the extension loaded in one process (tests build one) binds its own type
  py::class_<en::OsaChain>(m, "OsaChain", py::module_local(),
                           "VoVNet stages (max pools and OSA blocks) as one call")
      .def(py::init<>())
      .def("add_pool", &en::OsaChain::add_pool, py::arg("kernel"), py::arg("stride"), py::arg("padding"),
           py::arg("ceil_mode"))
      .def(
          "add_block",
          [](en::OsaChain& self, std::vector<int64_t> steps, std::vector<en::OptTensor> t, std::vector<double> eps,
             std::vector<std::string> acts, std::vector<double> act_params, std::vector<int64_t> geom,
             en::OptTensor ese_w, en::OptTensor ese_b, bool identity, std::vector<int64_t> weight_sizes) {
            self.add_block(en::OsaBlockArgs{std::move(steps), std::move(t), std::move(eps), std::move(acts),
                                            std::move(act_params), std::move(geom), std::move(ese_w),
                                            std::move(ese_b), identity, std::move(weight_sizes)});
          },
          py::arg("steps"), py::arg("t"), py::arg("eps"), py::arg("acts"), py::arg("act_params"), py::arg("geom"),
          py::arg("ese_w"), py::arg("ese_b"), py::arg("identity"), py::arg("weight_sizes"),
          "a block, with osa_block_steps' arguments after x")
      .def("run", &en::OsaChain::run, py::arg("x"),
           "the chain on x; None when a weight no longer has the dtype, device or shape it was added with")
      .def("__len__", &en::OsaChain::size);
  m.def("set_dw_pair_policy", &en::set_dw_pair_policy, py::arg("policy"),
        "depthwise -> 1x1 pairs: 0 = separate, 1 = banded, 2 = measured per problem");
  m.def("dw_pair_policy", &en::dw_pair_policy);
  m.def("set_pair_policy", &en::set_pair_policy, py::arg("policy"),
        "expand 1x1 -> depthwise pairs: 0 the two convs, 1 banded, 2 banded up to 128 input channels (default)");
  m.def("pair_policy", &en::pair_policy);
  m.def("set_pointwise_policy", &en::set_pointwise_policy, py::arg("policy"),
        "1x1 stride-1 float32 convs: 0 oneDNN, 1 GEMM, 2 whichever is measured faster per problem (default)");
  m.def("pointwise_policy", &en::pointwise_policy);
  m.def("set_winograd_policy", &en::set_winograd_policy, py::arg("policy"),
        "3x3 stride-1 float32 NHWC convs: 0 oneDNN, 1 Winograd F(4x4, 3x3), 2 whichever is measured faster per "
        "problem (default)");
  m.def("winograd_policy", &en::winograd_policy);
  m.def("set_direct_policy", &en::set_direct_policy, py::arg("policy"),
        "float32 convs of at most 4 input channels (stems): 0 oneDNN, 1 effops' direct kernel, 2 measured per problem");
  m.def("direct_policy", &en::direct_policy);
  m.def("conv_impl_counts", &en::conv_impl_counts, py::arg("reset") = false,
        "convs run so far per implementation: onednn, depthwise, gemm, winograd");
  m.def("measured_choices", &en::measured_choices,
        "per-problem choices measured so far: (table, flattened key, faster) rows for the tuning file");
  m.def("add_measured_choices", &en::add_measured_choices, py::arg("rows"),
        "choices read back from the tuning file (those measured here stay); returns the rows taken");
  m.def("clear_measured_choices", &en::clear_measured_choices);
  m.def("weight_cache_size", &en::weight_cache_size);
  m.def("clear_weight_cache", &en::clear_weight_cache);
  m.def("set_depthwise_policy", &en::set_depthwise_policy);
  m.def("depthwise_policy", &en::depthwise_policy);

  m.def(
      "depthwise_nhwc",
      [](const at::Tensor& x, const at::Tensor& taps, const en::OptTensor& bias, const en::OptTensor& residual,
         bool residual_after_act, at::Tensor out, int64_t kh, int64_t kw, en::IntVec stride, en::IntVec padding,
         en::IntVec dilation, const std::string& act, double act_param) {
        en::depthwise_nhwc(x, taps, bias, residual, residual_after_act, out, kh, kw, stride, padding, dilation,
                           en::parse_act(act), act_param);
      },
      py::arg("x"), py::arg("taps"), py::arg("bias"), py::arg("residual"), py::arg("residual_after_act"),
      py::arg("out"), py::arg("kh"), py::arg("kw"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("act"), py::arg("act_param"));
  m.def(
      "se_gate",
      [](const at::Tensor& x, const en::OptTensor& rw, const en::OptTensor& rb, const at::Tensor& ew,
         const en::OptTensor& eb, const std::string& act, double act_param, const std::string& gate,
         double gate_param) {
        return en::se_gate(x, rw, rb, ew, eb, en::parse_act(act), act_param, en::parse_act(gate), gate_param);
      },
      py::arg("x"), py::arg("reduce_weight"), py::arg("reduce_bias"), py::arg("expand_weight"),
      py::arg("expand_bias"), py::arg("act"), py::arg("act_param"), py::arg("gate"), py::arg("gate_param"));
  m.def(
      "se_gate_of_means",
      [](const at::Tensor& means, const en::OptTensor& rw, const en::OptTensor& rb, const at::Tensor& ew,
         const en::OptTensor& eb, const std::string& act, double act_param, const std::string& gate,
         double gate_param) {
        return en::se_gate_of_means(means, rw, rb, ew, eb, en::parse_act(act), act_param, en::parse_act(gate),
                                    gate_param);
      },
      py::arg("means"), py::arg("reduce_weight"), py::arg("reduce_bias"), py::arg("expand_weight"),
      py::arg("expand_bias"), py::arg("act"), py::arg("act_param"), py::arg("gate"), py::arg("gate_param"),
      "se_gate's excitation of pooled means [N, C] computed elsewhere");
  m.def(
      "linear",
      [](const at::Tensor& x, const at::Tensor& w, const en::OptTensor& b, const std::string& act, double act_param) {
        return en::linear(x, w, b, en::parse_act(act), act_param);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("act"), py::arg("act_param"),
      "act(F.linear(x, weight, bias)) for float32 [N, I] x");
  m.def("pool_linear", &en::pool_linear, py::arg("x"), py::arg("weight"), py::arg("bias"),
        "F.linear(x.mean((2, 3)), weight, bias) for a float32 [N, C, H, W] x (any layout)");
  m.def(
      "se_apply",
      [](const at::Tensor& x, const at::Tensor& gate, const en::OptTensor& residual, const en::OptTensor& out,
         const std::string& act, double act_param) {
        return en::se_apply(x, gate, residual, out, en::parse_act(act), act_param);
      },
      py::arg("x"), py::arg("gate"), py::arg("residual"), py::arg("out"), py::arg("act"), py::arg("act_param"));
  m.def("max_pool_nhwc", &en::max_pool_nhwc, py::arg("x"), py::arg("kernel"), py::arg("stride"),
        py::arg("padding"), py::arg("ceil_mode"), "F.max_pool2d without the indices, NHWC");
  m.def("channel_shuffle", &en::channel_shuffle, py::arg("x"), py::arg("groups"), py::arg("out"));
  m.def(
      "interleave_channels", [](const at::Tensor& a, const at::Tensor& b, at::Tensor out) {
        en::interleave_channels(a, b, out);
      },
      py::arg("a"), py::arg("b"), py::arg("out"), "out[:, 0::2] = a; out[:, 1::2] = b");
}
