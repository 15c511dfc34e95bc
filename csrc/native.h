// Shared declarations of effops' native CPU backend (see docs/architecture.md, "Native CPU
// backend"). Every kernel here implements an effops op's contract exactly as the Python
// reference in effops/ops/reference.py states it; tests/test_native.py checks each against it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace effops_native {

// A torch.profiler range named `name` around the rest of the scope ("effops::gemm_1x1", ...): the
// native kernels run outside ATen's operators, so without it a profile shows their time as gaps.
// Costs one flag check when no profiler is active.
#define EFFOPS_PROFILE_RANGE(name) RECORD_FUNCTION(name, c10::ArrayRef<const c10::IValue>{})

// The activations of effops/activations.py, in the same order (ACTIVATIONS).
enum class Act : int64_t {
  Identity = 0,
  Relu,
  Relu6,
  LeakyRelu,
  Hardswish,
  Hardsigmoid,
  Silu,
  Sigmoid,
  Gelu,
  GeluTanh,
};

// "relu" -> Act::Relu; throws (a ValueError in Python) naming the accepted names otherwise.
inline Act parse_act(const std::string& name) {
  static const char* names[] = {"identity", "relu",  "relu6",   "leaky_relu", "hardswish",
                                "hardsigmoid", "silu", "sigmoid", "gelu",       "gelu_tanh"};
  for (int64_t i = 0; i < 10; ++i)
    if (name == names[i]) return static_cast<Act>(i);
  TORCH_CHECK_VALUE(false, "unknown activation '", name, "'; expected one of identity, relu, relu6, leaky_relu, "
                    "hardswish, hardsigmoid, silu, sigmoid, gelu, gelu_tanh");
}

using OptTensor = c10::optional<at::Tensor>;
using IntVec = std::vector<int64_t>;

// ---- conv.cpp: conv + folded BN + activation (+ residual) through oneDNN -------------------
// y = act(conv(x, weight) * scale + bias [+ residual before act]) [+ residual after act],
// written into `out` when given (any strides), else a new tensor in x's memory format.
at::Tensor conv_scale_bias_act(const at::Tensor& x, const at::Tensor& weight, const OptTensor& scale,
                               const OptTensor& bias, const OptTensor& residual, const OptTensor& out,
                               IntVec stride, IntVec padding, IntVec dilation, int64_t groups,
                               const std::string& act, double act_param, bool residual_after_act,
                               const OptTensor& gate, int64_t out_shuffle_groups);

// The same with the eval-mode BatchNorm given as its tensors (scale and bias computed, folded
// into the packed weight and cached by the tensors' identities and versions). `stats_counter`
// (the BN's num_batches_tracked) joins the key: a train-mode BN forward updates the running
// statistics without moving their version counters, but it does increment the counter.
at::Tensor conv_bn_act(const at::Tensor& x, const at::Tensor& weight, const OptTensor& conv_bias,
                       const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                       const OptTensor& running_var, double eps, const OptTensor& residual, const OptTensor& out,
                       IntVec stride, IntVec padding, IntVec dilation, int64_t groups, const std::string& act,
                       double act_param, bool residual_after_act, const OptTensor& gate,
                       int64_t out_shuffle_groups, const OptTensor& stats_counter);

// The concat of `segments` (NHWC rows, channel views included) -> 1x1 conv -> BN -> act
// [+ residual], as GEMMs over the segments where they lie: no concatenated tensor. `pool`, when
// given (float32 [N, C_out], contiguous), receives each image's channel means of the result (an
// eSE's squeeze), summed as the GEMM stores its tiles.
at::Tensor conv_bn_act_segments(const std::vector<at::Tensor>& segments, const at::Tensor& weight,
                                const OptTensor& conv_bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
                                const OptTensor& running_mean, const OptTensor& running_var, double eps,
                                const OptTensor& residual, const OptTensor& out, const std::string& act,
                                double act_param, bool residual_after_act, const OptTensor& stats_counter,
                                const OptTensor& pool);
at::Tensor conv_scale_bias_act_segments(const std::vector<at::Tensor>& segments, const at::Tensor& weight,
                                        const OptTensor& scale, const OptTensor& bias, const OptTensor& residual,
                                        const OptTensor& out, const std::string& act, double act_param,
                                        bool residual_after_act, const OptTensor& pool);
// An inverted residual block's expand 1x1 conv -> BN -> act and depthwise conv -> BN -> act (each BN
// given as conv_bn_act takes it), the depthwise conv's input computed a band of rows at a time
// per thread into a buffer that stays in the core's cache: the expanded tensor is never written
// out. Float32, x channel-minor (NHWC or a channel view of one); returns a new NHWC tensor. Runs
// the two convs one after the other instead for more than 128 input channels (pair policy 2, the
// default), or always (policy 0).
at::Tensor pointwise_depthwise_bn_act(
    const at::Tensor& x, const at::Tensor& pw_weight, const OptTensor& pw_conv_bias, const OptTensor& pw_bn_weight,
    const OptTensor& pw_bn_bias, const OptTensor& pw_running_mean, const OptTensor& pw_running_var, double pw_eps,
    const OptTensor& pw_stats_counter, const std::string& pw_act, double pw_act_param, const at::Tensor& dw_weight,
    const OptTensor& dw_conv_bias, const OptTensor& dw_bn_weight, const OptTensor& dw_bn_bias,
    const OptTensor& dw_running_mean, const OptTensor& dw_running_var, double dw_eps,
    const OptTensor& dw_stats_counter, IntVec stride, IntVec padding, IntVec dilation, const std::string& dw_act,
    double dw_act_param);
// A depthwise conv -> BN -> act and a 1x1 conv -> BN -> act [+ residual] (a depthwise-separable
// conv: VoVNet-dw's stages and stem, MobileNet's first block), each BN given as conv_bn_act takes
// it; the depthwise output computed a band of rows at a time per thread into a buffer the GEMM
// reads from the core's cache, never written out. Float32; returns a new NHWC tensor. Runs the two
// convs one after the other where that is measured faster for the problem (policy 2, the
// default), always (policy 0), or never where the band applies (policy 1).
at::Tensor depthwise_pointwise_bn_act(
    const at::Tensor& x, const at::Tensor& dw_weight, const OptTensor& dw_conv_bias, const OptTensor& dw_bn_weight,
    const OptTensor& dw_bn_bias, const OptTensor& dw_running_mean, const OptTensor& dw_running_var, double dw_eps,
    const OptTensor& dw_stats_counter, IntVec stride, IntVec padding, IntVec dilation, const std::string& dw_act,
    double dw_act_param, const at::Tensor& pw_weight, const OptTensor& pw_conv_bias, const OptTensor& pw_bn_weight,
    const OptTensor& pw_bn_bias, const OptTensor& pw_running_mean, const OptTensor& pw_running_var, double pw_eps,
    const OptTensor& pw_stats_counter, const std::string& pw_act, double pw_act_param, const OptTensor& residual);
void set_dw_pair_policy(int64_t policy);
// A whole OSA block as effops::osa_block's arguments state it (BNs folded into scales and biases),
// float32: each conv through conv_common (its measured implementation), depthwise stages as
// banded depthwise -> 1x1 pairs, the aggregation over the stage outputs where they lie with the
// eSE squeeze in its epilogue, then gate * y (+ identity) in place.
at::Tensor osa_block_native(const at::Tensor& x, const OptTensor& red_w, const OptTensor& red_s,
                            const OptTensor& red_b, const std::vector<at::Tensor>& dw_ws,
                            const std::vector<at::Tensor>& mid_ws, const std::vector<at::Tensor>& mid_ss,
                            const std::vector<at::Tensor>& mid_bs, const at::Tensor& agg_w, const OptTensor& agg_s,
                            const OptTensor& agg_b, const OptTensor& ese_w, const OptTensor& ese_b, bool identity,
                            const std::string& act, double act_param);
int64_t dw_pair_policy();
// FusedOSA's eager native steady state (effops/nn/osa.py, _run_native) as one call, from the
// modules' own tensors: the same entries its per-op path calls (conv_bn_act, depthwise_pointwise_bn_act,
// conv_bn_act_segments, se_gate_of_means, se_apply), in the same order with the same arguments,
// so the result is bit-identical and the weight cache is shared. `steps`: 0 = a conv whose output
// is not a segment (the reduction), 1 = a conv (a stage), 2 = a depthwise -> 1x1 pair (a stage);
// per conv (a pair is two) 7 tensors in `t` (weight, conv bias, BN weight, BN bias, running mean,
// running var, num_batches_tracked), an eps, an activation and its parameter, and 7 ints in `geom`
// (stride, padding, dilation, groups); the aggregation conv comes last (its geometry unused).
// With ese_w the eSE gate (hardsigmoid) scales the aggregation's output, whose stores pool it.
// `weight_sizes` (4 per conv, or empty): the weight shapes a cached plan was built for; nullopt,
// before any work, when a weight is no longer a float32 CPU tensor of that shape (the caller's
// cached guard reads tensors by identity, and `param.data = t` keeps the identity).
// osa_block_steps' arguments after x, held (OsaChain).
struct OsaBlockArgs {
  std::vector<int64_t> steps;
  std::vector<OptTensor> t;
  std::vector<double> eps;
  std::vector<std::string> acts;
  std::vector<double> act_params;
  std::vector<int64_t> geom;
  OptTensor ese_w, ese_b;
  bool identity = false;
  std::vector<int64_t> weight_sizes;
};
// A chain of VoVNet stages (max pools and OSA blocks, in order) run as one call, holding every
// block's arguments (FusedOSA's gathered ones: the modules' own tensors, so in-place updates are
// seen). run() answers nullopt when a weight no longer has its dtype, device or shape. A block
// with an eSE gate and no identity that feeds a max pool leaves its output ungated; the pool's
// output is scaled by the gate instead (max commutes with a scale >= 0, and rounding is monotonic,
// so the result is bit-identical), saving a pass over the block's output.
class OsaChain {
 public:
  void add_pool(IntVec kernel, IntVec stride, IntVec padding, bool ceil_mode);
  void add_block(OsaBlockArgs block);
  std::optional<at::Tensor> run(const at::Tensor& x) const;
  int64_t size() const { return static_cast<int64_t>(ops_.size()); }

 private:
  struct Op {
    bool pool = false;
    IntVec kernel, stride, padding;
    bool ceil_mode = false;
    OsaBlockArgs block;
  };
  std::vector<Op> ops_;
};
std::optional<at::Tensor> osa_block_steps(const at::Tensor& x, const std::vector<int64_t>& steps,
                                          const std::vector<OptTensor>& t, const std::vector<double>& eps,
                                          const std::vector<std::string>& acts, const std::vector<double>& act_params,
                                          const std::vector<int64_t>& geom, const OptTensor& ese_w,
                                          const OptTensor& ese_b, bool identity,
                                          const std::vector<int64_t>& weight_sizes);
// Expand -> depthwise pairs: 0 = the two convs one after the other, 1 = banded, 2 = banded up to 128
// input channels (the default).
void set_pair_policy(int64_t policy);
int64_t pair_policy();
// 1x1 stride-1 float32 convs: 0 = oneDNN, 1 = GEMM, 2 = whichever is measured faster per problem.
void set_pointwise_policy(int64_t policy);
int64_t pointwise_policy();

// Convs run so far per implementation ("onednn", "depthwise", "gemm", "winograd", "direct"; an aggregation
// counts as one "gemm" run, or as the 1x1 conv that follows its concat); reset: zero them.
std::map<std::string, int64_t> conv_impl_counts(bool reset);

// Per-problem choices measured so far (which implementation beat oneDNN, concat-free aggregation
// vs concat, banded depthwise -> 1x1 pairs) as rows (table, key flattened to integers, faster), for
// the tuning file; adding rows skips those measurements (a choice already measured here stays;
// a row whose key does not have its table's shape is ignored). Returns the rows taken.
using MeasuredChoice = std::tuple<std::string, std::vector<int64_t>, bool>;
std::vector<MeasuredChoice> measured_choices();
int64_t add_measured_choices(const std::vector<MeasuredChoice>& rows);
void clear_measured_choices();

// Packed-weight cache: number of entries, and dropping them all.
int64_t weight_cache_size();
// A conv's output height and width; whether its output is NHWC (x is NHWC or a channel view of it).
std::pair<int64_t, int64_t> conv_out_hw(const at::Tensor& x, const at::Tensor& weight, const IntVec& stride,
                                        const IntVec& padding, const IntVec& dilation);
bool prefers_channels_last(const at::Tensor& x);
void clear_weight_cache();

// ---- winograd.cpp: Winograd F(4x4, 3x3) for 3x3 stride-1 float32 convs, NHWC --------------
// Whether the kernel can run this conv: 3x3, stride 1, dilation 1, float32, channel-minor x, dense
// or grouped with at least 8 input and output channels per group.
bool winograd_applies(const at::Tensor& x, const at::Tensor& weight, const IntVec& stride, const IntVec& dilation,
                      int64_t groups);
// The transformed weight U = G w G^T of a float32 [K, C / groups, 3, 3] weight, packed per group
// for winograd_nhwc.
at::Tensor winograd_weight(const at::Tensor& w32, int64_t groups);
// out = act(conv3x3(x, w, padding) + bias [+ residual]) [+ residual], with U = winograd_weight(w).
// x, out and residual: channel-minor (NHWC or channel views of one); out is written, never read.
void winograd_nhwc(const at::Tensor& x, const at::Tensor& U, const at::Tensor& bias, const OptTensor& residual,
                   bool residual_after_act, at::Tensor& out, const IntVec& padding, Act act, double act_param);
// 0: 3x3 stride-1 float32 convs run oneDNN; 1: Winograd where it applies; 2: whichever is measured faster.
void set_winograd_policy(int64_t policy);
int64_t winograd_policy();

// ---- direct.cpp: direct conv for float32 convs of at most 4 input channels, NHWC ------------
// Whether the kernel can run this conv: groups 1, float32, 1-4 input channels, channel-minor x.
bool direct_applies(const at::Tensor& x, const at::Tensor& weight, int64_t groups);
// A float32 [K, C, kh, kw] weight and [K] bias packed for direct_nhwc.
at::Tensor direct_weight(const at::Tensor& w32, const at::Tensor& bias);
// out = act(conv(x, w) + bias), packed = direct_weight(w, bias); x and out channel-minor (out may
// be a channel view); out is written, never read.
void direct_nhwc(const at::Tensor& x, const at::Tensor& packed, int64_t K, int64_t kh, int64_t kw, const IntVec& stride,
                 const IntVec& padding, const IntVec& dilation, at::Tensor& out, Act act, double act_param);
// 0: small-channel convs run oneDNN; 1: the direct kernel where it applies; 2: whichever is measured faster.
void set_direct_policy(int64_t policy);
int64_t direct_policy();

// ---- depthwise.cpp: NHWC depthwise conv + bias + activation (+ residual), at::vec ----------
// x: [N, C, H, W] with channel stride 1 (NHWC or a channel view of one), float32 or bfloat16.
// taps: [KH*KW, C] float32, the BN-folded weight tap-major (taps[kh*KW+kw][c]).
// bias: [C] float32 or undefined. residual: output's shape, any strides with channel stride 1.
// out: [N, C, OH, OW], channel stride 1 (may be a channel view); written, never read.
void depthwise_nhwc(const at::Tensor& x, const at::Tensor& taps, const OptTensor& bias,
                    const OptTensor& residual, bool residual_after_act, at::Tensor& out, int64_t kh, int64_t kw,
                    IntVec stride, IntVec padding, IntVec dilation, Act act, double act_param);
// Output rows [oh0, oh1) of image n of the same conv on float32 input, single-threaded, for callers
// that compute the input a band of rows at a time: xb holds the input rows [row0, row0 + k) of an
// H x W image (row stride x_sh, pixel stride C), with every row those output rows read; rows
// outside [0, H) are zero padding. taps: [kh*kw, C] dense; bias: [C].
void depthwise_rows_f32(const float* xb, int64_t row0, int64_t H, int64_t W, int64_t C, int64_t x_sh,
                        const float* taps, const float* bias, at::Tensor& out, int64_t n, int64_t oh0, int64_t oh1,
                        int64_t kh, int64_t kw, const IntVec& stride, const IntVec& padding, const IntVec& dilation,
                        Act act, double act_param);
// Output rows [oh0, oh1) of the same conv of one float32 image xn (all H rows; row stride x_sh,
// pixel stride x_sw, channel stride 1), single-threaded, into a band buffer: output row oh at
// buf + (oh - oh0) * OW * C, pixels C apart (callers that feed the rows to a GEMM straight from
// the core's cache). taps: [kh*kw, C] dense; bias: [C].
void depthwise_rows_into_f32(const float* xn, int64_t H, int64_t W, int64_t C, int64_t x_sh, int64_t x_sw,
                             const float* taps, const float* bias, float* buf, int64_t OH, int64_t OW, int64_t oh0,
                             int64_t oh1, int64_t kh, int64_t kw, const IntVec& stride, const IntVec& padding,
                             const IntVec& dilation, Act act, double act_param);

// ---- se.cpp: squeeze-and-excitation -------------------------------------------------------
// The gate [N, C] float32 of reference.se_gate (pool in fp32, excitation, gate activation).
at::Tensor se_gate(const at::Tensor& x, const OptTensor& reduce_weight, const OptTensor& reduce_bias,
                   const at::Tensor& expand_weight, const OptTensor& expand_bias, Act act, double act_param,
                   Act gate, double gate_param);
// act(x @ weight.T + bias) for a float32 [N, I] input and [O, I] weight: a weight-streaming
// matrix-vector product, for the classifier heads of batch-1 inference.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, Act act, double act_param);
// linear(x.mean((2, 3)), weight, bias): a global average pool and a classifier in one call.
at::Tensor pool_linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias);
// The same gate from the pooled means [N, C] (float32) computed elsewhere (an aggregation's epilogue).
at::Tensor se_gate_of_means(const at::Tensor& means, const OptTensor& reduce_weight, const OptTensor& reduce_bias,
                            const at::Tensor& expand_weight, const OptTensor& expand_bias, Act act, double act_param,
                            Act gate, double gate_param);
// act(x * gate[:, :, None, None] (+ residual)) of reference.se_apply, into out (or a new tensor
// in x's memory format).
at::Tensor se_apply(const at::Tensor& x, const at::Tensor& gate, const OptTensor& residual,
                    const OptTensor& out, Act act, double act_param);

// ---- pool.cpp --------------------------------------------------------------------------------
// F.max_pool2d(x, kernel, stride, padding, dilation=1, ceil_mode) of a channel-minor float32 or
// bfloat16 x (NHWC, or a channel view of one), without the indices, into a new NHWC tensor.
at::Tensor max_pool_nhwc(const at::Tensor& x, IntVec kernel, IntVec stride, IntVec padding, bool ceil_mode);

// ---- shuffle.cpp ---------------------------------------------------------------------------
// reference.channel_shuffle(x, groups) in one pass, into out (any strides) or a new tensor in
// x's memory format.
at::Tensor channel_shuffle(const at::Tensor& x, int64_t groups, const OptTensor& out);

// out[:, 0::2] = a, out[:, 1::2] = b in one pass (shuffle.cpp).
void interleave_channels(const at::Tensor& a, const at::Tensor& b, at::Tensor& out);

}  // namespace effops_native

namespace effops_native {
// 0: depthwise convs run oneDNN; 1: effops' own NHWC kernel; 2: own kernel for k <= 5, stride <= 2.
void set_depthwise_policy(int64_t policy);
int64_t depthwise_policy();
}  // namespace effops_native
