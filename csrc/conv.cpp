// Conv + folded BatchNorm + activation (+ residual) on CPU through oneDNN, as ATen exposes it
// (mkldnn::_convolution_pointwise with a prepacked weight and fused post-ops: the kernels
// Inductor's CPU freezing path emits), plus effops' own NHWC depthwise kernel.
//
// The BN-folded, prepacked weight is cached. An entry is valid while every tensor it was built
// from is the same live TensorImpl with the same data pointer and version counter (or, for the
// small BN and bias tensors, while their values are equal), so in-place
// updates, optimizer steps, `param.data = ...` and replaced modules are seen on the next call.
// Writes PyTorch does not count (`param.data.mul_()`, numpy, DLPack) are not: after such a
// write, call effops.refresh() (docs/architecture.md, "Native CPU backend").
// activation.h first: it selects at::vec's AVX-512 implementation before ATen's vec headers load.
#include "activation.h"
#include "native.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <tuple>
#include <type_traits>
#include <optional>
#include <functional>
#include <limits>
#include <mutex>
#include <unordered_map>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <sys/mman.h>

namespace effops_native {
namespace {

// ---- what a cache entry was built from ------------------------------------------------------
struct TensorKey {
  std::optional<c10::weak_intrusive_ptr<c10::TensorImpl>> impl;  // empty for an absent tensor
  const c10::TensorImpl* raw = nullptr;
  const void* data = nullptr;
  int64_t version = 0;
  // The small sources (BN vectors, conv bias, the BN's batch counter; never the weight) also keep
  // their values: a different tensor with equal values matches. Inductor with freezing inlines
  // constants of up to 8 elements into its wrapper, so an 8-channel BN arrives as new tensors on
  // every call, which would otherwise repack the weight on every call.
  std::vector<char> bytes;
  at::ScalarType dtype = at::kFloat;
  int64_t numel = 0;
};

constexpr int64_t kMaxValueKeyBytes = 64 * 1024;

// False when the tensor can't be keyed (an inference tensor has no version counter, and a large
// one is not kept by value): the caller then packs for this call only.
bool make_key(const OptTensor& t, TensorKey& k, bool by_value) {
  if (!t.has_value() || !t->defined()) {
    k.raw = nullptr;
    return true;
  }
  k.raw = t->unsafeGetTensorImpl();
  if (by_value && t->is_contiguous() && t->numel() * static_cast<int64_t>(t->element_size()) <= kMaxValueKeyBytes) {
    const char* p = static_cast<const char*>(t->data_ptr());
    k.bytes.assign(p, p + t->numel() * t->element_size());
    k.dtype = t->scalar_type();
    k.numel = t->numel();
  }
  if (t->is_inference()) return !k.bytes.empty();
  k.impl = c10::weak_intrusive_ptr<c10::TensorImpl>(t->getIntrusivePtr());
  k.data = t->data_ptr();
  k.version = t->_version();
  return true;
}

bool key_matches(const TensorKey& k, const OptTensor& t) {
  if (!t.has_value() || !t->defined()) return k.raw == nullptr;
  if (k.raw == nullptr) return false;
  if (k.raw == t->unsafeGetTensorImpl() && k.impl && !k.impl->expired() && k.data == t->data_ptr() &&
      !t->is_inference() && k.version == t->_version())
    return true;
  return !k.bytes.empty() && t->scalar_type() == k.dtype && t->numel() == k.numel && t->is_contiguous() &&
         std::memcmp(t->data_ptr(), k.bytes.data(), k.bytes.size()) == 0;
}

struct ConvParams {
  IntVec stride, padding, dilation, in_shape;  // in_shape: N, C, H, W the weight was packed for
  int64_t groups;
  at::ScalarType dtype;
  double eps;
  bool operator==(const ConvParams& o) const {
    return stride == o.stride && padding == o.padding && dilation == o.dilation && in_shape == o.in_shape &&
           groups == o.groups && dtype == o.dtype && eps == o.eps;
  }
};

enum class Impl { OneDNN, Depthwise, Gemm, Winograd, Direct };
constexpr int kImpls = 5;
const char* const kImplNames[kImpls] = {"onednn", "depthwise", "gemm", "winograd", "direct"};
std::atomic<int64_t> g_impl_calls[kImpls];  // convs run per implementation (conv_impl_counts)

struct Packed {
  std::vector<TensorKey> keys;
  ConvParams params;
  Impl impl;
  at::Tensor weight;  // oneDNN: an MKLDNN tensor in the blocked format chosen for in_shape;
                      // depthwise: [KH*KW, C] float32 taps; GEMM: [C_in, C_out] float32, or
                      // where gemm_paneled(C_out), [blocks][C_in][kGemmBlock] column panels
                      // (the last one zero-padded);
                      // Winograd: G w G^T, [36][groups][C_out_g / 32][C_in_g][32] float32 panels (winograd.cpp);
                      // direct: [KH*KW*C_in + 1][C_out rounded up to a vector] taps, then the bias (direct.cpp)
  at::Tensor bias;    // float32 [C_out]
};

constexpr size_t kMaxEntries = 2048;  // weights of a few big models; beyond, the oldest go
std::mutex g_mutex;
std::unordered_map<const c10::TensorImpl*, std::vector<std::shared_ptr<Packed>>> g_cache;
std::deque<std::pair<const c10::TensorImpl*, std::weak_ptr<Packed>>> g_order;
size_t g_size = 0;

void evict_oldest_locked() {
  while (g_size > kMaxEntries && !g_order.empty()) {
    auto [raw, weak] = g_order.front();
    g_order.pop_front();
    auto sp = weak.lock();
    if (!sp) continue;
    auto it = g_cache.find(raw);
    if (it == g_cache.end()) continue;
    auto& v = it->second;
    for (size_t i = 0; i < v.size(); ++i)
      if (v[i] == sp) {
        v.erase(v.begin() + i);
        --g_size;
        break;
      }
    if (v.empty()) g_cache.erase(it);
  }
}

std::shared_ptr<Packed> lookup(const std::vector<OptTensor>& srcs, const ConvParams& p) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_cache.find(srcs[0]->unsafeGetTensorImpl());
  if (it == g_cache.end()) return nullptr;
  auto& v = it->second;
  for (size_t i = 0; i < v.size();) {
    auto& e = v[i];
    if (!e->keys[0].impl || e->keys[0].impl->expired()) {  // the weight died: its entries can never match again
      v.erase(v.begin() + i);
      --g_size;
      continue;
    }
    bool ok = e->params == p && e->keys.size() == srcs.size();
    for (size_t j = 0; ok && j < srcs.size(); ++j) ok = key_matches(e->keys[j], srcs[j]);
    if (ok) return e;
    ++i;
  }
  return nullptr;
}

void store(const std::vector<OptTensor>& srcs, std::shared_ptr<Packed> e) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& v = g_cache[srcs[0]->unsafeGetTensorImpl()];
  // Entries of the same weight with the same settings and shapes but older tensor versions
  // are stale: replace them rather than piling up one entry per optimizer step.
  for (size_t i = 0; i < v.size();) {
    if (v[i]->params == e->params) {
      v.erase(v.begin() + i);
      --g_size;
    } else {
      ++i;
    }
  }
  v.push_back(e);
  ++g_size;
  g_order.emplace_back(srcs[0]->unsafeGetTensorImpl(), e);
  if (g_order.size() > 4 * kMaxEntries) {  // drop dead bookkeeping
    std::deque<std::pair<const c10::TensorImpl*, std::weak_ptr<Packed>>> live;
    for (auto& o : g_order)
      if (!o.second.expired()) live.push_back(o);
    g_order.swap(live);
  }
  evict_oldest_locked();
}

// ---- oneDNN through ATen's mkldnn ops -------------------------------------------------------
using ScalarList = c10::List<std::optional<at::Scalar>>;

const c10::OperatorHandle& pointwise_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
  return op;
}
const c10::OperatorHandle& binary_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary");
  return op;
}

struct Attr {
  std::string name;
  std::vector<double> scalars;
  std::string algorithm;
};

// oneDNN's post-op spelling of each effops activation.
Attr onednn_attr(Act act, double param) {
  switch (act) {
    case Act::Identity: return {"none", {}, ""};
    case Act::Relu: return {"relu", {}, ""};
    case Act::Relu6: return {"hardtanh", {0.0, 6.0}, ""};
    case Act::LeakyRelu: return {"leaky_relu", {param}, ""};
    case Act::Hardswish: return {"hardswish", {}, ""};
    case Act::Hardsigmoid: return {"hardsigmoid", {}, ""};
    case Act::Silu: return {"swish", {}, ""};
    case Act::Sigmoid: return {"sigmoid", {}, ""};
    case Act::Gelu: return {"gelu", {}, "none"};
    case Act::GeluTanh: return {"gelu", {}, "tanh"};
  }
  return {"none", {}, ""};
}

c10::IValue scalars_ivalue(const std::vector<double>& s) {
  c10::List<std::optional<at::Scalar>> l;
  for (double v : s) l.push_back(at::Scalar(v));
  return c10::IValue(l);
}

c10::IValue opt_str(const std::string& s) { return s.empty() ? c10::IValue() : c10::IValue(s); }

// act(y) in place with ATen's CPU kernels (the activations oneDNN can't fuse after a binary add).
void act_inplace(at::Tensor& y, Act act, double param) {
  switch (act) {
    case Act::Identity: return;
    case Act::Relu: y.relu_(); return;
    case Act::Relu6: at::hardtanh_(y, 0.0, 6.0); return;
    case Act::LeakyRelu: at::leaky_relu_(y, param); return;
    case Act::Hardswish: at::hardswish_(y); return;
    case Act::Hardsigmoid: at::hardsigmoid_(y); return;
    case Act::Silu: at::silu_(y); return;
    case Act::Sigmoid: y.sigmoid_(); return;
    case Act::Gelu: y.copy_(at::gelu(y, "none")); return;
    case Act::GeluTanh: y.copy_(at::gelu(y, "tanh")); return;
  }
}

// act(conv(x) * s + b [+ residual_pre]) with the BN folded into the packed weight. oneDNN fuses
// any one activation, or a residual add followed by ReLU; other activations after a residual add
// run as one more in-place pass.
at::Tensor run_onednn(const at::Tensor& x, const Packed& e, const OptTensor& residual_pre, Act act,
                      double act_param) {
  const auto& p = e.params;
  torch::jit::Stack stack;
  if (residual_pre.has_value()) {
    const bool fused_act = act == Act::Relu;
    stack = {x, *residual_pre, e.weight, e.bias, p.padding, p.stride, p.dilation, p.groups, std::string("add"),
             c10::IValue(), fused_act ? c10::IValue(std::string("relu")) : c10::IValue(),
             c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
    binary_op().callBoxed(stack);
    at::Tensor y = stack.back().toTensor();
    if (!fused_act) act_inplace(y, act, act_param);
    return y;
  }
  const Attr a = onednn_attr(act, act_param);
  stack = {x, e.weight, e.bias, p.padding, p.stride, p.dilation, p.groups, a.name, scalars_ivalue(a.scalars),
           opt_str(a.algorithm)};
  pointwise_op().callBoxed(stack);
  return stack.back().toTensor();
}

// Which implementation runs a depthwise conv (groups == C_in == C_out): effops' own NHWC kernel
// or oneDNN's. Chosen per problem by measurement (set_depthwise_policy; see the docs).
int g_depthwise_policy = 2;  // 0: oneDNN, 1: own kernel, 2: own kernel where stride <= 2 and k <= 5
// 1x1 stride-1 float32 convs: 0 = oneDNN, 1 = GEMM, 2 = whichever measured faster for the problem.
int g_pointwise_policy = 2;
// 3x3 stride-1 float32 convs on NHWC: 0 = oneDNN, 1 = Winograd, 2 = whichever measured faster.
int g_winograd_policy = 2;
// Convs of at most 4 input channels: 0 = oneDNN, 1 = effops' direct kernel, 2 = whichever is
// measured faster per problem.
int g_direct_policy = 2;
std::mutex g_choice_mutex;
// (implementation, N, C, H, W, C_out, padding, residual, activation, threads) -> it beat oneDNN
std::map<std::tuple<Impl, IntVec, int64_t, IntVec, bool, int64_t, int, bool>, bool> g_alt_faster;
// aggregation problem -> the concat-free GEMMs beat concat + 1x1 conv
std::map<std::tuple<int64_t, std::vector<int64_t>, int64_t, bool, int64_t, int>, bool> g_segments_faster;

bool use_own_depthwise(const at::Tensor& x, const at::Tensor& w, int64_t groups, const IntVec& stride) {
  if (groups == 1 || groups != x.size(1) || w.size(0) != groups || w.size(1) != 1) return false;
  if (g_depthwise_policy == 0) return false;
  if (g_depthwise_policy == 1) return true;
  return stride[0] <= 2 && stride[1] <= 2 && w.size(2) <= 5 && w.size(3) <= 5;
}

bool channels_last_ish(const at::Tensor& t) {
  // NHWC, or a channel view of an NHWC buffer (channel-minor)
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous()) return true;
  return !t.is_contiguous() && t.stride(1) < t.stride(3);
}

bool is_dense(const at::Tensor& x) {
  return x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// x as oneDNN reads it: x itself where it is dense (NCHW or NHWC), else a copy.
at::Tensor dense_input(const at::Tensor& x) {
  if (is_dense(x)) return x;
  return x.contiguous(channels_last_ish(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// out.copy_(channel_shuffle(y, g)) in one strided pass: out channel j*g + i <- y channel i*(C/g) + j.
void copy_shuffled(at::Tensor& dst, const at::Tensor& y, int64_t g) {
  const int64_t c = y.size(1);
  dst.unflatten(1, {c / g, g}).transpose(1, 2).copy_(y.unflatten(1, {g, c / g}));
}

// The row stride of as_rows(t), or -1 where t has no such rows (a check without a tensor).
int64_t rows_stride(const at::Tensor& t) {
  if (t.dim() != 4 || (t.size(1) > 1 && t.stride(1) != 1)) return -1;
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  const int64_t ld = W > 1 ? t.stride(3) : (H > 1 ? t.stride(2) : (N > 1 ? t.stride(0) : C));
  if ((W > 1 && t.stride(3) != ld) || (H > 1 && t.stride(2) != W * ld) || (N > 1 && t.stride(0) != H * W * ld))
    return -1;
  if (N * H * W > 1 && ld < C) return -1;
  return std::max<int64_t>(ld, C);
}

// [N*H*W, C] rows of a channel-minor, pixel-dense 4-D tensor (NHWC, or a channel view of a wider
// NHWC buffer: row stride = the buffer's channel count), as a strided 2-D view; undefined if the
// pixels aren't equally spaced rows. BLAS reads and writes such a matrix in place (lda/ldc > C).
at::Tensor as_rows(const at::Tensor& t) {
  const int64_t ld = rows_stride(t);
  if (ld < 0) return at::Tensor();
  return t.as_strided({t.size(0) * t.size(2) * t.size(3), t.size(1)}, {ld, 1});
}

// y = act(y + bias [+ r]) [+ r] over the rows of y in place, vectorised over channels.
void bias_act_rows(at::Tensor& y, const float* bias, const at::Tensor& r, bool residual_after_act, Act act,
                   double act_param) {
  const int64_t P = y.size(0), C = y.size(1), ldy = y.stride(0);
  float* yp = y.data_ptr<float>();
  const float* rp = r.defined() ? r.data_ptr<float>() : nullptr;
  const int64_t ldr = r.defined() ? r.stride(0) : 0;
  const float param = static_cast<float>(act_param);
  dispatch_act(act, [&](auto a) {
    constexpr Act A = decltype(a)::value;
    at::parallel_for(0, P, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t p0, int64_t p1) {
      const Vec pv(param);
      for (int64_t i = p0; i < p1; ++i) {
        float* row = yp + i * ldy;
        const float* rr = rp ? rp + i * ldr : nullptr;
        for (int64_t c = 0; c < C; c += kVecSize) {
          const int64_t n = std::min<int64_t>(kVecSize, C - c);
          Vec v = load_f(row + c, n) + load_f(bias + c, n);
          if (rr && !residual_after_act) v = v + load_f(rr + c, n);
          v = ActFn<A>::apply(v, pv);
          if (rr && residual_after_act) v = v + load_f(rr + c, n);
          store_f(row + c, v, n);
        }
      }
    });
  });
}

// The rows of `residual` (made NHWC-dense if they aren't rows already).
at::Tensor residual_rows(const OptTensor& residual) {
  if (!residual.has_value() || !residual->defined()) return at::Tensor();
  at::Tensor r = as_rows(*residual);
  if (r.defined() && residual->scalar_type() == at::kFloat) return r;
  return as_rows(residual->to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast));
}

// 1x1 convs as GEMMs on NHWC rows: sum_i seg_i[rows] @ Wt[k_i : k_i + C_i], then bias + activation
// (+ residual) in place, row tile by row tile so the output tile is still in cache for the
// epilogue and for the next segment's accumulation. One segment is a plain 1x1 conv; several are
// the concat -> 1x1 conv of an OSA block or a CSP/ELAN aggregation, without the concat.
void gemm_rows(const std::vector<at::Tensor>& segs, const Packed& e, at::Tensor& y, const at::Tensor& r,
               bool residual_after_act, Act act, double act_param) {
  const int64_t P = y.size(0), Cout = y.size(1);
  const int64_t tile = segs.size() == 1 ? P : std::max<int64_t>(64, (int64_t(1) << 17) / std::max<int64_t>(Cout, 1));
  const float* bias = e.bias.data_ptr<float>();
  for (int64_t t0 = 0; t0 < P; t0 += tile) {
    const int64_t t1 = std::min(P, t0 + tile);
    at::Tensor yt = y.slice(0, t0, t1);
    int64_t k = 0;
    for (size_t i = 0; i < segs.size(); ++i) {
      const int64_t ci = segs[i].size(1);
      at::Tensor wi = e.weight.slice(0, k, k + ci);
      if (i == 0)
        at::mm_out(yt, segs[i].slice(0, t0, t1), wi);
      else
        yt.addmm_(segs[i].slice(0, t0, t1), wi);
      k += ci;
    }
    at::Tensor rt = r.defined() ? r.slice(0, t0, t1) : at::Tensor();
    bias_act_rows(yt, bias, rt, residual_after_act, act, act_param);
  }
}

// C[p, :] = act(A[p, :] @ B + bias [+ R[p, :]]) [+ R[p, :]] for rows [0, P): a register-blocked
// GEMM with the bias, the residual and the activation applied to the accumulators before the one
// store, for the small K of 1x1 convs (their input channels), where a BLAS call's packing and a
// separate epilogue pass over C cost more than the multiplies. B: [K, N] dense. Single-threaded.
struct GemmEpilogue {
  const float* bias;     // [N]
  const float* res;      // residual rows (ldr apart), or null
  int64_t ldr;
  bool res_after_act;
  Vec param;             // the activation's parameter
};

// One input of a GEMM whose A is split by columns into segments (an OSA block's concat ->
// 1x1 conv, without the concat): its rows lie lda apart and hold K values; b points at its
// first row of B in column block 0 (B's rows are ldb apart; small_gemm_block finds column block
// blk at offset blk * kGemmBlock in a dense [K, N] B, blk * K * kGemmBlock in panels).
struct GemmSeg {
  const float* a;
  int64_t lda;
  int64_t K;
  const float* b;
};

// Full: every vector of the tile is whole; BFull: B's vectors are (zero-padded panels), whatever C's.
// PF: B comes from memory (a task's first tile: the weights of a layer whose last call was a whole
// forward ago), so each step also prefetches B a few steps ahead; the other tiles find B in cache.
// (Near the end of B the prefetches point past it: a prefetch never faults.)
constexpr int64_t kGemmPrefetchRows = 24;

// SIDE: bytes the thread's next task will read from memory (its B panel), one cache line into L2
// per step of this tile, so that the next task's first tile finds them there: a tile streaming B
// from memory at its own pace runs at the memory's bandwidth, these run behind the multiplies.
struct SidePrefetch {
  const char* p = nullptr;
  const char* end = nullptr;
};

template <int R, int NV, Act A, bool Full, bool BFull, bool PF = false, bool SIDE = false>
inline __attribute__((always_inline)) void small_gemm_tile(const GemmSeg* segs, int nseg, int64_t p0, int64_t ldb,
                                                           int64_t boff, float* __restrict__ c, int64_t ldc,
                                                           const int64_t* cnt, const GemmEpilogue& ep, int64_t n0,
                                                           SidePrefetch* side = nullptr) {
  const char* sp = SIDE ? side->p : nullptr;
  const char* const send = SIDE ? side->end : nullptr;
  // only a partial tile's last vector is partial: the others load and store whole vectors
  auto ld = [&](const float* p, int j) { return Full || j < NV - 1 ? Vec::loadu(p) : load_f(p, cnt[j]); };
  Vec acc[R][NV];
  for (int j = 0; j < NV; ++j) {
    const Vec bj = ld(ep.bias + n0 + j * kVecSize, j);
    for (int r = 0; r < R; ++r) acc[r][j] = bj;
  }
  // Every segment accumulates into the same registers: C is stored once, whatever the segments.
  for (int s = 0; s < nseg; ++s) {
    const float* __restrict__ a = segs[s].a + p0 * segs[s].lda;
    const float* __restrict__ b = segs[s].b + boff;
    const int64_t lda = segs[s].lda, K = segs[s].K;
    for (int64_t k = 0; k < K; ++k) {
      if constexpr (PF)
        for (int j = 0; j < NV; ++j) __builtin_prefetch(b + (k + kGemmPrefetchRows) * ldb + j * kVecSize, 0, 3);
      if constexpr (SIDE)
        if (sp < send) {
          __builtin_prefetch(sp, 0, 2);
          sp += 64;
        }
      Vec bv[NV];
      for (int j = 0; j < NV; ++j) bv[j] = BFull ? Vec::loadu(b + k * ldb + j * kVecSize) : ld(b + k * ldb + j * kVecSize, j);
      for (int r = 0; r < R; ++r) {
        const Vec av(a[r * lda + k]);
        for (int j = 0; j < NV; ++j) acc[r][j] = at::vec::fmadd(av, bv[j], acc[r][j]);
      }
    }
  }
  if constexpr (SIDE) side->p = sp;
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) {
      Vec v = acc[r][j];
      if (ep.res) {
        const Vec rv = ld(ep.res + (p0 + r) * ep.ldr + n0 + j * kVecSize, j);
        v = ep.res_after_act ? ActFn<A>::apply(v, ep.param) + rv : ActFn<A>::apply(v + rv, ep.param);
      } else {
        v = ActFn<A>::apply(v, ep.param);
      }
      if (Full || j < NV - 1)
        v.store(c + r * ldc + j * kVecSize);
      else
        store_f(c + r * ldc + j * kVecSize, v, cnt[j]);
    }
}

// Vectors per tile and rows per tile: R * NV accumulators plus NV B vectors and one broadcast in
// the 32 (AVX-512) or 16 (AVX2) vector registers. Narrow tiles (a block of tail columns) take more
// rows, so that each B load still feeds as many multiply-adds.
constexpr int kGemmVecs = kVecSize >= 16 ? 4 : 2;
constexpr int kGemmAcc = kVecSize >= 16 ? 24 : 8;             // accumulators per tile
constexpr int kGemmRows = kGemmAcc / kGemmVecs;               // rows of a full-width tile
constexpr int64_t kGemmUnit = kVecSize >= 16 ? 24 : 8;        // row chunks are multiples of every tile height
constexpr int64_t kGemmBlock = int64_t(kGemmVecs) * kVecSize;  // columns per block

// Rows [p0, p1) and the columns [n0, n0 + NV vectors) of C (cnt: each vector's valid lanes).
template <int NV, Act A, bool Full, bool BFull>
void small_gemm_cols(const GemmSeg* segs, int nseg, int64_t p0, int64_t p1, int64_t ldb, int64_t boff, float* c,
                     int64_t ldc, const int64_t* cnt, const GemmEpilogue& ep, int64_t n0, SidePrefetch* side) {
  constexpr int R = kGemmAcc / NV;
  int64_t p = p0;
  if (p + R <= p1) {
    small_gemm_tile<R, NV, A, Full, BFull, true>(segs, nseg, p, ldb, boff, c + p * ldc + n0, ldc, cnt, ep, n0);
    p += R;
  }
  if (side != nullptr && side->p < side->end)
    for (; p + R <= p1; p += R)
      small_gemm_tile<R, NV, A, Full, BFull, false, true>(segs, nseg, p, ldb, boff, c + p * ldc + n0, ldc, cnt, ep,
                                                          n0, side);
  for (; p + R <= p1; p += R)
    small_gemm_tile<R, NV, A, Full, BFull>(segs, nseg, p, ldb, boff, c + p * ldc + n0, ldc, cnt, ep, n0);
  if constexpr (R > kGemmRows) {
    for (; p + kGemmRows <= p1; p += kGemmRows)
      small_gemm_tile<kGemmRows, NV, A, Full, BFull>(segs, nseg, p, ldb, boff, c + p * ldc + n0, ldc, cnt, ep, n0);
  }
  for (; p < p1; ++p)
    small_gemm_tile<1, NV, A, Full, BFull>(segs, nseg, p, ldb, boff, c + p * ldc + n0, ldc, cnt, ep, n0);
}

// Where a 1x1 conv's weight is packed as column panels (see Packed::weight) and
// small_gemm_rows runs it: at least one whole vector of outputs (16 with AVX-512). With B in
// zero-padded panels every B load is a whole vector (Zen 4 runs masked loads slowly); at
// ShuffleNetV2's 58 / 116 / 232-channel convs it takes 0.57-0.61x oneDNN's time, at OSA, ResNet
// and MobileNet shapes and OSA aggregations it is level with or ahead of oneDNN
// (benchmarks/test_native_kernels.py -k "pointwise or aggregate"). Below, MKL's sgemm + an
// epilogue pass (gemm_rows) on a dense [K, N] B. The per-problem measurement against oneDNN still
// decides each conv.
bool gemm_paneled(int64_t N) { return N >= kVecSize; }

// Rows [p0, p1) of C (N columns), column block `blk` (kGemmBlock columns; the last one as many
// vectors as the remaining columns need, the last of them partial).
template <Act A>
void small_gemm_block(const GemmSeg* segs, int nseg, int64_t p0, int64_t p1, int64_t N, int64_t K, float* c,
                      int64_t ldc, const GemmEpilogue& ep, int64_t blk, SidePrefetch* side = nullptr) {
  const int64_t n0 = blk * kGemmBlock, rem = N - n0;
  const bool panels = gemm_paneled(N);
  const int64_t ldb = panels ? kGemmBlock : N, boff = panels ? blk * K * kGemmBlock : n0;
  int64_t cnt[kGemmVecs];
  for (int j = 0; j < kGemmVecs; ++j) cnt[j] = std::max<int64_t>(0, std::min<int64_t>(kVecSize, rem - j * kVecSize));
  if (rem >= kGemmBlock) {
    small_gemm_cols<kGemmVecs, A, true, true>(segs, nseg, p0, p1, ldb, boff, c, ldc, cnt, ep, n0, side);
    return;
  }
  const int64_t nv = (rem + kVecSize - 1) / kVecSize;
  const bool whole = rem % kVecSize == 0;  // no partial vector: plain loads and stores
  auto cols = [&](auto nv_tag) {
    constexpr int NV = decltype(nv_tag)::value;
    if (whole)
      small_gemm_cols<NV, A, true, true>(segs, nseg, p0, p1, ldb, boff, c, ldc, cnt, ep, n0, side);
    else if (panels)  // only C's last vector is partial
      small_gemm_cols<NV, A, false, true>(segs, nseg, p0, p1, ldb, boff, c, ldc, cnt, ep, n0, side);
    else
      small_gemm_cols<NV, A, false, false>(segs, nseg, p0, p1, ldb, boff, c, ldc, cnt, ep, n0, side);
  };
  if (nv == 1) cols(std::integral_constant<int, 1>{});
  else if (nv == 2 || kGemmVecs == 2) cols(std::integral_constant<int, kGemmVecs >= 2 ? 2 : 1>{});
  else if (nv == 3) cols(std::integral_constant<int, 3>{});
  else cols(std::integral_constant<int, kGemmVecs>{});
}

// C[p0:p1, :] = act(A[p0:p1, :] @ B + bias ...) with one A and a GEMM entry's B (dense [K, N], or
// panels where gemm_paneled(N)), single-threaded.
void small_gemm(const float* a, int64_t lda, int64_t p0, int64_t p1, int64_t K, const float* b, int64_t N, float* c,
                int64_t ldc, const GemmEpilogue& ep, Act act) {
  const GemmSeg seg{a, lda, K, b};
  dispatch_act(act, [&](auto tag) {
    for (int64_t blk = 0; blk * kGemmBlock < N; ++blk)
      small_gemm_block<decltype(tag)::value>(&seg, 1, p0, p1, N, K, c, ldc, ep, blk);
  });
}


// y = act(sum_i x_i @ W[k_i : k_i + C_i] + bias [+ r]) [+ r] over NHWC rows (one x: a 1x1 conv;
// several: the concat -> 1x1 conv of an OSA block, without the concat), threaded over (row chunk,
// column block) tasks: one pass over the output.
// Adds the column sums of C's rows [p0, p1), columns [n0, n0 + nc), into sums[img][column], img =
// row / hw (rows are pixels of images hw pixels each). C's rows were just stored: read from L1.
void add_column_sums(const float* c, int64_t ldc, int64_t p0, int64_t p1, int64_t n0, int64_t nc, int64_t hw,
                     float* sums, int64_t ld_sums) {
  for (int64_t p = p0; p < p1;) {
    const int64_t img = p / hw, end = std::min(p1, (img + 1) * hw);
    float* s = sums + img * ld_sums + n0;
    for (int64_t j = 0; j < nc; j += kVecSize) {
      const int64_t n = std::min<int64_t>(kVecSize, nc - j);
      Vec acc(0.f);
      for (int64_t q = p; q < end; ++q) {
        const float* src = c + q * ldc + n0 + j;
        acc = acc + (n == kVecSize ? Vec::loadu(src) : load_f(src, n));
      }
      store_f(s + j, load_f(s + j, n) + acc, n);
    }
    p = end;
  }
}

void small_gemm_rows(const std::vector<at::Tensor>& x_rows, const Packed& e, at::Tensor& y_rows, const at::Tensor& r,
                     bool residual_after_act, Act act, double act_param, float* means = nullptr, int64_t hw = 0) {
  const int64_t P = y_rows.size(0), N = y_rows.size(1);
  const GemmEpilogue ep{e.bias.data_ptr<float>(), r.defined() ? r.data_ptr<float>() : nullptr,
                        r.defined() ? r.stride(0) : 0, residual_after_act, Vec(static_cast<float>(act_param))};
  std::vector<GemmSeg> segs;
  const float* b = e.weight.data_ptr<float>();
  const bool panels = gemm_paneled(N);
  const int64_t ldb = panels ? kGemmBlock : N;
  int64_t K = 0;
  for (const auto& xr : x_rows) {
    segs.push_back({xr.data_ptr<float>(), xr.stride(0), xr.size(1), b + K * ldb});
    K += xr.size(1);
  }
  float* c = y_rows.data_ptr<float>();
  const int64_t ldc = y_rows.stride(0);
  const int64_t blocks = (N + kGemmBlock - 1) / kGemmBlock;
  // Row chunks of up to 48 rows whose A rows stay in L2 while the thread walks the column blocks,
  // as even as the rows allow, and enough (chunk, block) tasks for the threads to share.
  const int64_t threads = at::get_num_threads();
  const int64_t cap = std::min<int64_t>(48, std::max<int64_t>(1, (int64_t(192) << 10) / (K * 4)));  // rows
  const int64_t tiles = (P + kGemmRows - 1) / kGemmRows;
  int64_t nchunk = (P + cap - 1) / cap;
  while (nchunk * blocks < 2 * threads && nchunk < tiles) ++nchunk;
  // even chunks, in whole full-width tiles (multiples of every tile height where that costs nothing:
  // as many chunks, and the last one still at least half as tall as the others, so the threads'
  // shares stay even; 49 rows stay 30 + 19, not 48 + 1)
  int64_t chunk = ((tiles + nchunk - 1) / nchunk) * kGemmRows;
  const int64_t up = (chunk / kGemmUnit + 1) * kGemmUnit;
  if (chunk % kGemmUnit != 0 && up <= cap && (P + up - 1) / up == nchunk && P - (nchunk - 1) * up >= up / 2)
    chunk = up;
  const int64_t chunks = (P + chunk - 1) / chunk;
  // Tasks walk groups of column blocks whose part of B stays in L2 (about 384 KB), and within a
  // group, row chunk by row chunk, the group's blocks: B is read from memory once per group and
  // each A chunk once per group. A thread's tasks are contiguous: with few rows (7x7 maps, wide
  // weights), each thread streams its own groups of B.
  const int64_t fit = std::max<int64_t>(1, (int64_t(384) << 10) / (K * kGemmBlock * 4));
  const int64_t groups = (blocks + fit - 1) / fit, group = (blocks + groups - 1) / groups;  // groups of even size
  const int nseg = static_cast<int>(segs.size());
  // means: each image's column means of C (an eSE's squeeze), summed per thread as the tiles are
  // stored, then reduced.
  const int64_t images = means ? P / hw : 0;
  std::vector<float> part(means ? static_cast<size_t>(threads * images * N) : 0, 0.f);
  // Called inside another parallel region, parallel_for runs its range on this one thread, whose
  // number is the outer region's: one slot then.
  const bool nested = at::in_parallel_region();
  dispatch_act(act, [&](auto tag) {
    at::parallel_for(0, groups * chunks * group, 1, [&](int64_t t0, int64_t t1) {
      const int64_t slot = nested ? 0 : at::get_thread_num();
      TORCH_INTERNAL_ASSERT(slot < threads, "effops aggregate: thread ", slot, " of ", threads);
      float* sums = means ? part.data() + slot * images * N : nullptr;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t blk = (t / (chunks * group)) * group + t % group, ci = (t / group) % chunks;
        if (blk >= blocks) continue;  // the last group's missing blocks
        const int64_t p0 = ci * chunk, p1 = std::min(P, p0 + chunk);
        // The thread's next task starts a group (the first row chunk meets its B panel cold): this
        // task's tiles after its first prefetch that panel into L2 as they go.
        SidePrefetch side;
        if (panels && t + 1 < t1) {
          const int64_t nb = ((t + 1) / (chunks * group)) * group + (t + 1) % group;
          if (((t + 1) / group) % chunks == 0 && nb < blocks && nb != blk) {
            side.p = reinterpret_cast<const char*>(b + nb * K * kGemmBlock);
            side.end = side.p + K * kGemmBlock * sizeof(float);
          }
        }
        small_gemm_block<decltype(tag)::value>(segs.data(), nseg, p0, p1, N, K, c, ldc, ep, blk,
                                               side.p ? &side : nullptr);
        if (sums)
          add_column_sums(c, ldc, p0, p1, blk * kGemmBlock, std::min(kGemmBlock, N - blk * kGemmBlock), hw, sums, N);
      }
    });
  });
  if (means) {
    const float inv = 1.f / static_cast<float>(hw);
    for (int64_t i = 0; i < images * N; ++i) {
      float s = 0.f;
      for (int64_t t = 0; t < threads; ++t) s += part[t * images * N + i];
      means[i] = s * inv;
    }
  }
}

using FoldFn = std::function<std::pair<at::Tensor, at::Tensor>()>;  // (scale or undefined, bias or undefined), fp32

std::shared_ptr<Packed> build(const at::Tensor& x, const at::Tensor& weight, const FoldFn& fold, const ConvParams& p,
                              Impl impl) {
  at::NoGradGuard no_grad;
  auto sb = fold();
  at::Tensor w32 = weight.to(at::kFloat);
  if (sb.first.defined()) w32 = w32 * sb.first.to(at::kFloat).view({-1, 1, 1, 1});
  auto e = std::make_shared<Packed>();
  e->params = p;
  e->impl = impl;
  e->bias = sb.second.defined() ? sb.second.to(at::kFloat).contiguous() : at::zeros({weight.size(0)}, x.options().dtype(at::kFloat));
  if (impl == Impl::Depthwise) {
    e->weight = w32.reshape({weight.size(0), -1}).t().contiguous();
  } else if (impl == Impl::Gemm) {
    const int64_t N = weight.size(0), K = weight.size(1);
    at::Tensor wt = w32.reshape({N, -1}).t();  // [K, N]
    if (gemm_paneled(N)) {
      // column panels of kGemmBlock: a tile's B rows are contiguous, one stream for the prefetcher
      const int64_t blocks = (N + kGemmBlock - 1) / kGemmBlock;
      at::Tensor padded = at::zeros({K, blocks * kGemmBlock}, wt.options());
      padded.narrow(1, 0, N).copy_(wt);
      e->weight = padded.view({K, blocks, kGemmBlock}).permute({1, 0, 2}).contiguous();
    } else {
      e->weight = wt.contiguous();
    }
  } else if (impl == Impl::Winograd) {
    e->weight = winograd_weight(w32, p.groups);
  } else if (impl == Impl::Direct) {
    e->weight = direct_weight(w32, e->bias);
  } else {
    at::Tensor wd = w32.to(p.dtype).contiguous();
    e->weight = at::mkldnn_reorder_conv2d_weight(wd.to_mkldnn(), p.padding, p.stride, p.dilation, p.groups,
                                                 at::IntArrayRef(p.in_shape));
  }
  return e;
}

// The cached entry for these source tensors and settings, or a new one (stored unless a source
// can't be keyed: an inference tensor has no version counter).
// `built`: an entry already packed for exactly this (a per-problem measurement packs both sides).
std::shared_ptr<Packed> packed_for(const at::Tensor& x, const at::Tensor& weight, const std::vector<OptTensor>& srcs,
                                   const FoldFn& fold, const ConvParams& p, Impl impl,
                                   std::shared_ptr<Packed> built = nullptr) {
  std::shared_ptr<Packed> e = lookup(srcs, p);
  if (e && e->impl == impl) return e;
  e = built && built->impl == impl && built->params == p ? built : build(x, weight, fold, p, impl);
  bool keyable = true;
  e->keys.resize(srcs.size());
  for (size_t i = 0; i < srcs.size(); ++i) keyable = keyable && make_key(srcs[i], e->keys[i], /*by_value=*/i > 0);
  if (keyable) store(srcs, e);
  return e;
}

// Output height / width of a conv of x.
std::pair<int64_t, int64_t> out_hw(const at::Tensor& x, const at::Tensor& weight, const IntVec& stride,
                                   const IntVec& padding, const IntVec& dilation) {
  return {(x.size(2) + 2 * padding[0] - dilation[0] * (weight.size(2) - 1) - 1) / stride[0] + 1,
          (x.size(3) + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1) / stride[1] + 1};
}

// Makes a measurement see what a conv sees inside a model: its weights come from memory, since
// the other layers' weights and activations pass through the cache between two calls of it.
// Writes 64 MB (twice this machine's 32 MB L3; sysconf reports a whole multi-die L3 here,
// 320 MB, which would take a second per measurement) and flushes `cold`'s cache lines
// explicitly, so they are out of the cache whatever its size. The buffer lives only as long as
// the measurement that needs it.
struct CacheEvictor {
  static constexpr size_t kBytes = size_t(64) << 20;
  // 2 MB aligned and advised as huge pages: first touching 16k small pages is slow on a VM.
  std::unique_ptr<char, decltype(&std::free)> buf{static_cast<char*>(std::aligned_alloc(size_t(2) << 20, kBytes)),
                                                  &std::free};
  CacheEvictor(const CacheEvictor&) = delete;
  at::Tensor cold;
  char value = 0;
  explicit CacheEvictor(at::Tensor cold_) : cold(std::move(cold_)) {
    TORCH_CHECK(buf, "effops: out of memory for the cache-eviction buffer");
#if defined(MADV_HUGEPAGE)
    madvise(buf.get(), kBytes, MADV_HUGEPAGE);
#endif
  }
  void operator()() {
    std::memset(buf.get(), ++value, kBytes);
#if defined(__x86_64__) || defined(_M_X64)
    const char* p = static_cast<const char*>(cold.data_ptr());
    for (size_t i = 0; i < cold.nbytes(); i += 64) _mm_clflush(p + i);
    _mm_mfence();
#endif
  }
};

// Whether a runs at most as long as b: the best of n timed calls each, alternated a b b a ...
// after one untimed call of each (first touch of the output, oneDNN's primitive creation), so a
// burst of load on a shared machine hits both sides rather than deciding the choice by itself.
// `before_each` runs before every timed call, untimed (the Winograd choice evicts the caches
// there: timed back to back, a conv's weights stay in the cache and the path that reads more
// weight bytes wins here and loses in the model).
// `slack` > 1 keeps a unless b is that much faster; < 1 takes a only when it is that much faster.
bool first_is_faster(const std::function<void()>& a, const std::function<void()>& b, int n = 5,
                     const std::function<void()>& before_each = nullptr, double slack = 1.0) {
  a();
  b();
  double ta = 1e30, tb = 1e30;
  auto time = [&before_each](const std::function<void()>& fn, double& best) {
    if (before_each) before_each();
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  };
  for (int i = 0; i < n; ++i) {
    if (i % 2 == 0) {
      time(a, ta);
      time(b, tb);
    } else {
      time(b, tb);
      time(a, ta);
    }
  }
  return ta <= tb * slack;
}

// choices[key], measured once by measure() for a problem not seen before (outside the lock: a
// measurement runs the kernels, which may take the lock for their own choices).
template <typename Map, typename Key>
bool measured_once(Map& choices, const Key& key, const std::function<bool()>& measure) {
  {
    std::lock_guard<std::mutex> lock(g_choice_mutex);
    auto it = choices.find(key);
    if (it != choices.end()) return it->second;
  }
  const bool v = measure();
  std::lock_guard<std::mutex> lock(g_choice_mutex);
  choices[key] = v;
  return v;
}


// Runs the conv with entry e's implementation. The GEMM, depthwise and Winograd paths write into
// `direct` when it is defined and channel-minor (a channel view of a block buffer, say) and return
// it; otherwise, and always for oneDNN, the result is a new tensor (NHWC for channel-minor x).
at::Tensor run_packed(const at::Tensor& x, const Packed& e, const at::Tensor& weight, const OptTensor& residual,
                      bool residual_after_act, Act act, double act_param, const at::Tensor& direct) {
  const auto& p = e.params;
  const bool has_res = residual.has_value() && residual->defined();
  const auto [oh, ow] = out_hw(x, weight, p.stride, p.padding, p.dilation);
  auto fresh = [&, oh = oh, ow = ow] {
    return at::empty({x.size(0), weight.size(0), oh, ow}, x.options(), at::MemoryFormat::ChannelsLast);
  };
  switch (e.impl) {
    case Impl::Gemm: {
      EFFOPS_PROFILE_RANGE("effops::gemm_1x1");
      at::Tensor dst = direct.defined() && rows_stride(direct) >= 0 ? direct : fresh();
      at::Tensor y_rows = as_rows(dst);
      if (gemm_paneled(weight.size(0)))
        small_gemm_rows({as_rows(x)}, e, y_rows, residual_rows(residual), residual_after_act, act, act_param);
      else
        gemm_rows({as_rows(x)}, e, y_rows, residual_rows(residual), residual_after_act, act, act_param);
      return dst;
    }
    case Impl::Depthwise:
    case Impl::Winograd: {
      const bool writable = direct.defined() && direct.stride(1) == 1 &&
                            (e.impl == Impl::Depthwise || direct.scalar_type() == at::kFloat);
      at::Tensor dst = writable ? direct : fresh();
      OptTensor res = residual;
      // depthwise reads float32 or bfloat16 residuals; Winograd float32 ones
      const bool convert = has_res && e.impl == Impl::Winograd && residual->scalar_type() != at::kFloat;
      if (has_res && (residual->stride(1) != 1 || convert))
        res = (convert ? residual->to(at::kFloat) : *residual).contiguous(at::MemoryFormat::ChannelsLast);
      EFFOPS_PROFILE_RANGE(e.impl == Impl::Depthwise ? "effops::depthwise" : "effops::winograd");
      if (e.impl == Impl::Depthwise)
        depthwise_nhwc(x, e.weight, e.bias, res, residual_after_act, dst, weight.size(2), weight.size(3), p.stride,
                       p.padding, p.dilation, act, act_param);
      else
        winograd_nhwc(x, e.weight, e.bias, res, residual_after_act, dst, p.padding, act, act_param);
      return dst;
    }
    case Impl::Direct: {
      // no residual (conv_common runs Direct only without one)
      at::Tensor dst = direct.defined() && direct.stride(1) == 1 ? direct : fresh();
      EFFOPS_PROFILE_RANGE("effops::direct");
      direct_nhwc(x, e.weight, weight.size(0), weight.size(2), weight.size(3), p.stride, p.padding, p.dilation, dst,
                  act, act_param);
      return dst;
    }
    case Impl::OneDNN: break;
  }
  const bool pre = has_res && (!residual_after_act || act == Act::Identity);
  OptTensor res_pre;
  if (pre)
    res_pre = residual->contiguous(channels_last_ish(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  at::Tensor y = run_onednn(x, e, res_pre, act, act_param);
  if (has_res && !pre) y.add_(*residual);
  return y;
}

// Winograd's time as a fraction of oneDNN's below which it runs (see alt_measured_faster).
constexpr double kWinogradMargin = 0.85;

// Whether `alt` (GEMM for a 1x1 conv, Winograd for a 3x3 one, the direct kernel for a stem conv)
// runs this conv faster than oneDNN, measured once per problem (shapes, residual, activation,
// threads) on the call's own tensors.
// GEMM has no fixed per-call cost to speak of and wins small 1x1 problems, oneDNN's blocked
// kernels many large ones; Winograd does 4x fewer multiplies but reads a 4x larger weight, and
// loses where the weight outweighs the pixels (7x7 maps with 512 channels). Winograd must win by
// 15%: its time moves more with the load of other tenants on a shared machine than oneDNN's
// (benchmarks/tools/winograd_cold.py, docs/architecture.md), its float32 rounding error is about
// 10x a direct conv's, and a choice is stored for later processes, so a close call goes to
// oneDNN. Dense 3x3 convs win by 1.3-1.9x cold where Winograd applies at all.
// `winner`: set to the winning side's packed entry when this call measured (null on a known problem).
bool alt_measured_faster(Impl alt, const at::Tensor& x, const at::Tensor& weight, const FoldFn& fold,
                         const ConvParams& p_alt, const OptTensor& residual, bool residual_after_act, Act act,
                         double act_param, std::shared_ptr<Packed>& winner) {
  const bool has_res = residual.has_value() && residual->defined();
  // A channel view (the ShuffleNetV2 unit's split) is read in place by GEMM, copied first for oneDNN.
  const bool dense = is_dense(x);
  const auto key = std::make_tuple(alt, x.sizes().vec(), weight.size(0), p_alt.padding, has_res,
                                   static_cast<int64_t>(act), at::get_num_threads(), dense);
  return measured_once(g_alt_faster, key, [&] {
    at::NoGradGuard no_grad;
    const at::Tensor xd = dense_input(x);
    ConvParams po = p_alt;
    po.in_shape = xd.sizes().vec();
    auto ea = build(x, weight, fold, p_alt, alt);
    auto eo = build(xd, weight, fold, po, Impl::OneDNN);
    std::optional<CacheEvictor> evict;
    // Winograd: the transformed weight, 4x the conv's. Direct (a stem conv): timed back to back,
    // oneDNN is a few microseconds ahead on ShuffleNetV2's 3 -> 24 stem, yet the whole model runs
    // faster with the direct kernel (benchmarks/tools/native_choices.py): oneDNN loses more from
    // the caches the previous forward's layers filled.
    if (alt == Impl::Winograd || alt == Impl::Direct) evict.emplace(ea->weight);
    const bool faster = first_is_faster(
        [&] { run_packed(x, *ea, weight, residual, residual_after_act, act, act_param, at::Tensor()); },
        [&] {
          // oneDNN's time includes the copy that makes a channel view dense, as in the model
          run_packed(dense ? xd : dense_input(x), *eo, weight, residual, residual_after_act, act, act_param,
                     at::Tensor());
        },
        // cold: best of 3 each (each eviction writes 64 MB; Winograd's wins are mostly wide), 5 for
        // a model's one stem conv, where the two are closer
        alt == Impl::Winograd ? 3 : 5, evict ? std::function<void()>([&] { (*evict)(); }) : std::function<void()>(),
        alt == Impl::Winograd ? kWinogradMargin : 1.0);
    winner = faster ? ea : eo;
    return faster;
  });
}

at::Tensor conv_common(const at::Tensor& x_in, const at::Tensor& weight, const std::vector<OptTensor>& srcs,
                       const FoldFn& fold, double eps, const OptTensor& residual, const OptTensor& out, IntVec stride,
                       IntVec padding, IntVec dilation, int64_t groups, const std::string& act_name, double act_param,
                       bool residual_after_act, const OptTensor& gate, int64_t shuffle) {
  TORCH_CHECK_VALUE(x_in.device().is_cpu() && weight.device().is_cpu(), "effops native conv: expected CPU tensors");
  TORCH_CHECK_VALUE(x_in.dim() == 4 && weight.dim() == 4, "effops native conv: expected 4-D x and weight, got ",
                    x_in.dim(), "-D and ", weight.dim(), "-D");
  TORCH_CHECK_VALUE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
                    "effops native conv: expected float32 or bfloat16 input, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.size(1) == weight.size(1) * groups, "effops native conv: x has ", x_in.size(1),
                    " channels, the weight expects ", weight.size(1) * groups);
  const Act act = parse_act(act_name);
  if (x_in.size(0) == 0 || weight.size(0) == 0) {  // an empty batch: nothing to compute (oneDNN refuses it)
    const auto [oh, ow] = out_hw(x_in, weight, stride, padding, dilation);
    if (out.has_value()) return *out;
    return at::empty({x_in.size(0), weight.size(0), oh, ow}, x_in.options(),
                     channels_last_ish(x_in) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  }
  at::Tensor x = x_in;
  if (gate.has_value() && gate->defined())
    x = x * gate->to(x.scalar_type()).unsqueeze(-1).unsqueeze(-1);
  // effops' depthwise kernel reads any channel-minor strides (channel views included); oneDNN
  // wants a dense NCHW or NHWC tensor.
  const bool own_dw = use_own_depthwise(x, weight, groups, stride) && channels_last_ish(x) && x.stride(1) == 1;
  // A float32 1x1 stride-1 conv on NHWC rows is one GEMM (MKL through at::mm), which reads and
  // writes channel views in place; a float32 3x3 stride-1 conv on NHWC can run Winograd
  // (winograd.cpp). Either runs where it is measured faster than oneDNN for the problem.
  const bool pointwise = weight.size(2) == 1 && weight.size(3) == 1 && stride[0] == 1 && stride[1] == 1 &&
                         padding[0] == 0 && padding[1] == 0 && groups == 1 && x.scalar_type() == at::kFloat &&
                         g_pointwise_policy != 0 && rows_stride(x) >= 0;
  const bool winograd = !pointwise && g_winograd_policy != 0 && winograd_applies(x, weight, stride, dilation, groups);
  // A float32 conv of at most 4 input channels without a residual (the stem; groups 1, so never
  // depthwise) can run effops' direct kernel (direct.cpp).
  const bool small_cin = !pointwise && !winograd && g_direct_policy != 0 &&
                         !(residual.has_value() && residual->defined()) && direct_applies(x, weight, groups);
  Impl impl = Impl::OneDNN;
  int policy = 0;  // the alternative's policy: 2 = measured against oneDNN
  if (own_dw) {
    impl = Impl::Depthwise;
  } else if (pointwise) {
    impl = Impl::Gemm;
    policy = g_pointwise_policy;
  } else if (winograd) {
    impl = Impl::Winograd;
    policy = g_winograd_policy;
  } else if (small_cin) {
    impl = Impl::Direct;
    policy = g_direct_policy;
  }
  ConvParams p{stride, padding, dilation, {}, groups, x.scalar_type(), eps};  // in_shape: oneDNN's only
  std::shared_ptr<Packed> measured;
  if (policy == 2 &&
      !alt_measured_faster(impl, x, weight, fold, p, residual, residual_after_act, act, act_param, measured))
    impl = Impl::OneDNN;
  if (impl == Impl::OneDNN) {
    x = dense_input(x);
    p.in_shape = x.sizes().vec();
  }
  std::shared_ptr<Packed> e = packed_for(x, weight, srcs, fold, p, impl, measured);

  const at::Tensor direct = out.has_value() && shuffle == 1 ? *out : at::Tensor();
  at::Tensor y = run_packed(x, *e, weight, residual, residual_after_act, act, act_param, direct);
  g_impl_calls[static_cast<int>(impl)].fetch_add(1, std::memory_order_relaxed);
  if (direct.defined() && y.is_same(direct)) return *out;
  const auto fmt = channels_last_ish(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (!out.has_value()) {
    if (shuffle == 1) return y;
    return at::channel_shuffle(y, shuffle).contiguous(fmt);
  }
  at::Tensor dst = *out;
  if (shuffle == 1)
    dst.copy_(y);
  else
    copy_shuffled(dst, y, shuffle);
  return dst;
}

at::Tensor segments_common(const std::vector<at::Tensor>& segs, const at::Tensor& weight,
                           const std::vector<OptTensor>& srcs, const FoldFn& fold, double eps, const OptTensor& residual,
                           const OptTensor& out, const std::string& act_name, double act_param,
                           bool residual_after_act, const OptTensor& pool) {
  TORCH_CHECK_VALUE(!segs.empty(), "effops native aggregate: expected at least one segment");
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1,
                    "effops native aggregate: expected a 1x1 conv weight [C_out, sum(C_i), 1, 1], got ",
                    weight.sizes());
  const Act act = parse_act(act_name);
  const auto& s0 = segs[0];
  int64_t k = 0;
  std::vector<at::Tensor> rows;
  for (const auto& sg : segs) {
    TORCH_CHECK_VALUE(sg.dim() == 4 && sg.size(0) == s0.size(0) && sg.size(2) == s0.size(2) && sg.size(3) == s0.size(3),
                      "effops native aggregate: every segment must be [N, C_i, H, W] with the first one's N, H, W");
    TORCH_CHECK_VALUE(sg.scalar_type() == at::kFloat && sg.device().is_cpu(),
                      "effops native aggregate: expected float32 CPU segments, got ", sg.scalar_type());
    at::Tensor r = as_rows(sg);
    rows.push_back(r.defined() ? r : as_rows(sg.contiguous(at::MemoryFormat::ChannelsLast)));
    k += sg.size(1);
  }
  TORCH_CHECK_VALUE(k == weight.size(1), "effops native aggregate: the segments have ", k,
                    " channels in all, the weight expects ", weight.size(1));
  const int64_t N = s0.size(0), H = s0.size(2), W = s0.size(3), Cout = weight.size(0);
  const bool pooled = pool.has_value() && pool->defined();
  if (pooled)
    TORCH_CHECK_VALUE(pool->scalar_type() == at::kFloat && pool->is_contiguous() &&
                          pool->sizes() == at::IntArrayRef({N, Cout}),
                      "effops native aggregate: pool must be a contiguous float32 [", N, ", ", Cout, "] tensor, got ",
                      pool->scalar_type(), " ", pool->sizes());
  at::Tensor out_rows = out.has_value() ? as_rows(*out) : at::Tensor();
  at::Tensor dst = out_rows.defined() ? *out : at::empty({N, Cout, H, W}, s0.options(), at::MemoryFormat::ChannelsLast);
  if (N * H * W == 0 || Cout == 0) {
    if (pooled) pool->fill_(H * W == 0 ? std::numeric_limits<float>::quiet_NaN() : 0.f);  // as torch's mean
    if (out.has_value() && !out_rows.defined()) return *out;
    return dst;
  }
  ConvParams p{{1, 1}, {0, 0}, {1, 1}, {}, 1, at::kFloat, eps};
  std::shared_ptr<Packed> e = packed_for(s0, weight, srcs, fold, p, Impl::Gemm);
  at::Tensor y_rows = out_rows.defined() ? out_rows : as_rows(dst);
  const at::Tensor r_rows = residual_rows(residual);
  // The pooled means ride the register-blocked GEMM's stores; otherwise one more pass over y.
  auto pool_after = [&](const at::Tensor& y) {
    if (pooled) pool->copy_(y.to(at::kFloat).mean({2, 3}));
  };
  auto run_segments = [&] {
    EFFOPS_PROFILE_RANGE("effops::aggregate_gemm");
    if (gemm_paneled(Cout)) {
      small_gemm_rows(rows, *e, y_rows, r_rows, residual_after_act, act, act_param,
                      pooled ? pool->data_ptr<float>() : nullptr, H * W);
    } else {
      gemm_rows(rows, *e, y_rows, r_rows, residual_after_act, act, act_param);
      pool_after(dst);
    }
  };
  // The concat-free GEMMs, or one NHWC concat + the 1x1 conv (oneDNN or GEMM, as measured for
  // it): the concat path only where it measures at least 10% faster for this problem, from
  // evicted caches, best of 3. The concat costs a copy of the inputs, which oneDNN's 1x1 kernels
  // can win back on large problems; but measured back to back it is a warm copy into a reused
  // buffer, while in a model it copies stage outputs the other convs pushed out of the cache into
  // a newly allocated tensor (ese_vovnet19b_dw's first aggregation: about 0.3 ms of copying in
  // the model, where the warm measurement had taken the concat path on a loaded machine).
  std::vector<int64_t> widths;
  for (const auto& sg : segs) widths.push_back(sg.size(1));
  const auto key = std::make_tuple(N * H * W, widths, Cout, residual.has_value() && residual->defined(),
                                   static_cast<int64_t>(act), at::get_num_threads());
  auto run_concat = [&]() -> at::Tensor {
    // (one segment: the conv itself, no copy)
    at::Tensor y = conv_common(segs.size() == 1 ? segs[0] : at::cat(segs, 1), weight, srcs, fold, eps, residual, out,
                               {1, 1}, {0, 0}, {1, 1}, 1,
                               act_name, act_param, residual_after_act, std::nullopt, 1);
    pool_after(y);
    return y;
  };
  bool concat_free = g_pointwise_policy == 1;
  if (g_pointwise_policy == 2)
    concat_free = measured_once(g_segments_faster, key, [&] {
      CacheEvictor evict(weight);
      return first_is_faster(run_segments, [&] { run_concat(); }, 3, [&] { evict(); }, 1.10);
    });
  if (!concat_free) return run_concat();
  run_segments();
  g_impl_calls[static_cast<int>(Impl::Gemm)].fetch_add(1, std::memory_order_relaxed);
  if (out.has_value() && !out_rows.defined()) {
    out->copy_(dst);
    return *out;
  }
  return dst;
}

FoldFn bn_fold(const OptTensor& conv_bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
               const OptTensor& running_mean, const OptTensor& running_var, double eps) {
  const bool has_bn = running_var.has_value() && running_var->defined();
  return [=]() -> std::pair<at::Tensor, at::Tensor> {
    // reference.bn_scale_bias in float32: s = w / sqrt(var + eps); b = (conv_b - mean) * s + bn_b
    if (!has_bn)
      return {at::Tensor(), conv_bias.has_value() && conv_bias->defined() ? conv_bias->to(at::kFloat) : at::Tensor()};
    at::Tensor s = at::rsqrt(running_var->to(at::kFloat) + eps);
    if (bn_weight.has_value() && bn_weight->defined()) s = s * bn_weight->to(at::kFloat);
    at::Tensor mean = running_mean->to(at::kFloat);
    at::Tensor b = -mean * s;
    if (bn_bias.has_value() && bn_bias->defined()) b = b + bn_bias->to(at::kFloat);
    if (conv_bias.has_value() && conv_bias->defined()) b = b + conv_bias->to(at::kFloat) * s;
    return {s, b};
  };
}

// ---- expand 1x1 conv -> depthwise conv, a band of rows at a time --------------------------

// Target size of a thread's band of expanded rows: with the input rows it reads and the depthwise
// output rows it feeds, it stays in the core's L2 (1 MB per core on the machines measured).
constexpr int64_t kBandBytes = 256 * 1024;

// Expand 1x1 -> depthwise pairs: 0 = the two convs one after the other, 1 = banded, 2 = banded
// where the expand conv has at most 128 input channels (pair_common).
int g_pair_policy = 2;

// dw(act1(pw(x))) as bands of output rows, one band at a time per thread: the band's expanded
// input rows are computed by small_gemm (bias and activation in its epilogue) into a per-thread
// buffer, which the depthwise kernel then reads from the core's cache. Rows shared with the
// thread's previous band (the kernel's overlap) are moved, not recomputed.
void run_pair(const at::Tensor& x, const Packed& pw, Act act1, double param1, const Packed& dw, int64_t kh,
              int64_t kw, at::Tensor& out, Act act2, double param2) {
  EFFOPS_PROFILE_RANGE("effops::pointwise_depthwise");
  const auto& q = dw.params;
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), Ce = pw.bias.size(0);
  const int64_t OH = out.size(2);
  const int64_t sh = q.stride[0], ph = q.padding[0], reach = (kh - 1) * q.dilation[0] + 1;
  const int64_t row_bytes = W * Ce * static_cast<int64_t>(sizeof(float));
  const int64_t fit_rows = std::max<int64_t>(reach, kBandBytes / std::max<int64_t>(row_bytes, 1));
  int64_t band = std::max<int64_t>(1, (fit_rows - reach) / sh + 1);
  // at least two bands per thread where the image allows, so the threads finish together
  band = std::min(band, std::max<int64_t>(1, (N * OH + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads())));
  const int64_t bands = (OH + band - 1) / band;
  const int64_t max_rows = (band - 1) * sh + reach;
  const at::Tensor x_rows = as_rows(x);
  const int64_t lda = x_rows.stride(0), Cin = x.size(1);
  const GemmEpilogue ep1{pw.bias.data_ptr<float>(), nullptr, 0, true, Vec(static_cast<float>(param1))};
  at::parallel_for(0, N * bands, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> buf;
    if (buf.size() < static_cast<size_t>(max_rows * W * Ce)) buf.resize(max_rows * W * Ce);
    int64_t have_n = -1, have_lo = 0, have_hi = 0;  // image and input rows the buffer holds
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / bands, o0 = (t % bands) * band, o1 = std::min(OH, o0 + band);
      const int64_t lo = std::max<int64_t>(0, o0 * sh - ph);
      const int64_t hi = std::max(lo, std::min(H, (o1 - 1) * sh - ph + reach));
      int64_t from = lo;
      if (have_n == n && lo >= have_lo && lo < have_hi && hi >= have_hi) {
        std::memmove(buf.data(), buf.data() + (lo - have_lo) * W * Ce, (have_hi - lo) * row_bytes);
        from = have_hi;
      }
      if (hi > from) {
        const float* a = x_rows.data_ptr<float>() + (n * H + from) * W * lda;
        small_gemm(a, lda, 0, (hi - from) * W, Cin, pw.weight.data_ptr<float>(), Ce,
                   buf.data() + (from - lo) * W * Ce, Ce, ep1, act1);
      }
      have_n = n, have_lo = lo, have_hi = hi;
      depthwise_rows_f32(buf.data(), lo, H, W, Ce, W * Ce, dw.weight.data_ptr<float>(), dw.bias.data_ptr<float>(),
                         out, n, o0, o1, kh, kw, q.stride, q.padding, q.dilation, act2, param2);
    }
  });
}

at::Tensor pair_common(const at::Tensor& x, const at::Tensor& w1, const std::vector<OptTensor>& srcs1,
                       const FoldFn& fold1, double eps1, const std::string& act1_name, double param1,
                       const at::Tensor& w2, const std::vector<OptTensor>& srcs2, const FoldFn& fold2, double eps2,
                       IntVec stride, IntVec padding, IntVec dilation, const std::string& act2_name, double param2) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && w1.device().is_cpu() && w2.device().is_cpu(),
                    "effops native pointwise-depthwise: expected CPU tensors");
  TORCH_CHECK_VALUE(x.dim() == 4 && x.scalar_type() == at::kFloat,
                    "effops native pointwise-depthwise: expected a 4-D float32 x, got ", x.dim(), "-D ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(w1.dim() == 4 && w1.size(2) == 1 && w1.size(3) == 1 && w1.size(1) == x.size(1) &&
                        w1.scalar_type() == at::kFloat,
                    "effops native pointwise-depthwise: expected a float32 1x1 weight [C_exp, ", x.size(1),
                    ", 1, 1], got ", w1.scalar_type(), " ", w1.sizes());
  const int64_t Ce = w1.size(0);
  TORCH_CHECK_VALUE(w2.dim() == 4 && w2.size(0) == Ce && w2.size(1) == 1 && w2.scalar_type() == at::kFloat,
                    "effops native pointwise-depthwise: expected a float32 depthwise weight [", Ce,
                    ", 1, kh, kw], got ", w2.scalar_type(), " ", w2.sizes());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "effops native pointwise-depthwise: stride, padding and dilation need 2 values each");
  const Act act1 = parse_act(act1_name), act2 = parse_act(act2_name);
  const auto [oh, ow] = out_hw(x, w2, stride, padding, dilation);
  TORCH_CHECK_VALUE(oh >= 1 && ow >= 1, "effops native pointwise-depthwise: input ", x.sizes(),
                    " is smaller than the dilated kernel");
  const at::Tensor xr = rows_stride(x) >= 0 ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({x.size(0), Ce, oh, ow}, x.options(), at::MemoryFormat::ChannelsLast);
  if (x.size(0) == 0 || Ce == 0) return out;
  auto separate = [&]() -> at::Tensor {
    at::Tensor y = conv_common(xr, w1, srcs1, fold1, eps1, std::nullopt, std::nullopt, {1, 1}, {0, 0}, {1, 1}, 1,
                               act1_name, param1, true, std::nullopt, 1);
    return conv_common(y, w2, srcs2, fold2, eps2, std::nullopt, std::nullopt, stride, padding, dilation, Ce,
                       act2_name, param2, true, std::nullopt, 1);
  };
  // The pair runs banded where effops' depthwise kernel would run the depthwise conv anyway.
  if (!use_own_depthwise(out, w2, Ce, stride) || g_pair_policy == 0) return separate();
  std::shared_ptr<Packed> e1 = packed_for(xr, w1, srcs1, fold1, {{1, 1}, {0, 0}, {1, 1}, {}, 1, at::kFloat, eps1},
                                          Impl::Gemm);
  std::shared_ptr<Packed> e2 = packed_for(xr, w2, srcs2, fold2, {stride, padding, dilation, {}, Ce, at::kFloat, eps2},
                                          Impl::Depthwise);
  // Not measured per problem: timed alone, back to back, the two convs' expanded tensor stays in
  // the L3 cache and the two ways come out within about 10% of each other either way
  // (benchmarks/test_native_kernels.py -k pair), while in whole models the banded pairs win
  // (native_choices.py: MobileNetV2, EfficientNet-B0). With more than 128 input channels the
  // banded pair measured slower than the two convs one after the other.
  const bool use_bands = g_pair_policy == 1 || (g_pair_policy == 2 && x.size(1) <= 128);
  if (!use_bands) return separate();
  run_pair(xr, *e1, act1, param1, *e2, w2.size(2), w2.size(3), out, act2, param2);
  g_impl_calls[static_cast<int>(Impl::Gemm)].fetch_add(1, std::memory_order_relaxed);
  g_impl_calls[static_cast<int>(Impl::Depthwise)].fetch_add(1, std::memory_order_relaxed);
  return out;
}


// ---- depthwise conv -> 1x1 conv, a band of rows at a time -----------------------------------

// Target size of a thread's band of depthwise output rows: the GEMM streams it once per 64-column
// block of the 1x1 conv's output, from the core's L2.
constexpr int64_t kDwBandBytes = 128 * 1024;

// Depthwise -> 1x1 pairs: 0 = the two convs one after the other, 1 = banded, 2 = whichever is
// measured faster per problem (the default).
int g_dw_pair_policy = 2;
// problem -> banded beat the two convs one after the other
std::map<std::tuple<IntVec, int64_t, IntVec, IntVec, int64_t, bool, int64_t, int64_t, int>, bool> g_dw_pair_faster;

// pw(act1(dw(x))) [+ r] as bands of output rows, one band at a time per thread: the depthwise
// kernel writes the band's rows into a per-thread buffer and the register-blocked GEMM reads them
// from the core's cache, with the 1x1 conv's bias, residual and activation in its epilogue. The
// depthwise output is never written out.
void run_dw_pair(const at::Tensor& x, const Packed& dw, int64_t kh, int64_t kw, Act act1, double param1,
                 const Packed& pw, at::Tensor& out, const at::Tensor& r_rows, Act act2, double param2) {
  EFFOPS_PROFILE_RANGE("effops::depthwise_pointwise");
  const auto& q = dw.params;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = out.size(1), OH = out.size(2), OW = out.size(3);
  const int64_t lda = rows_stride(x);
  const int64_t row_bytes = OW * C * static_cast<int64_t>(sizeof(float));
  int64_t band = std::max<int64_t>(1, kDwBandBytes / std::max<int64_t>(row_bytes, 1));
  // at least two bands per thread where the image allows, so the threads finish together
  band = std::min(band, std::max<int64_t>(1, (N * OH + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads())));
  const int64_t bands = (OH + band - 1) / band;
  const float* xp = x.data_ptr<float>();
  const int64_t x_sn = x.size(0) > 1 ? x.stride(0) : H * W * lda;
  at::Tensor y_rows = as_rows(out);
  float* yp = y_rows.data_ptr<float>();
  const int64_t ldc = y_rows.stride(0);
  const float* rp = r_rows.defined() ? r_rows.data_ptr<float>() : nullptr;
  const int64_t ldr = r_rows.defined() ? r_rows.stride(0) : 0;
  at::parallel_for(0, N * bands, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> buf;
    if (buf.size() < static_cast<size_t>(band * OW * C)) buf.resize(band * OW * C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / bands, o0 = (t % bands) * band, o1 = std::min(OH, o0 + band);
      depthwise_rows_into_f32(xp + n * x_sn, H, W, C, W * lda, lda, dw.weight.data_ptr<float>(),
                              dw.bias.data_ptr<float>(), buf.data(), OH, OW, o0, o1, kh, kw, q.stride, q.padding,
                              q.dilation, act1, param1);
      const int64_t p0 = (n * OH + o0) * OW;
      const GemmEpilogue ep{pw.bias.data_ptr<float>(), rp ? rp + p0 * ldr : nullptr, ldr, true,
                            Vec(static_cast<float>(param2))};
      small_gemm(buf.data(), C, 0, (o1 - o0) * OW, C, pw.weight.data_ptr<float>(), Cout, yp + p0 * ldc, ldc, ep,
                 act2);
    }
  });
}

at::Tensor dw_pair_common(const at::Tensor& x, const at::Tensor& w1, const std::vector<OptTensor>& srcs1,
                          const FoldFn& fold1, double eps1, IntVec stride, IntVec padding, IntVec dilation,
                          const std::string& act1_name, double param1, const at::Tensor& w2,
                          const std::vector<OptTensor>& srcs2, const FoldFn& fold2, double eps2,
                          const std::string& act2_name, double param2, const OptTensor& residual) {
  const char* what = "effops native depthwise-pointwise: ";
  TORCH_CHECK_VALUE(x.device().is_cpu() && w1.device().is_cpu() && w2.device().is_cpu(), what, "expected CPU tensors");
  TORCH_CHECK_VALUE(x.dim() == 4 && x.scalar_type() == at::kFloat, what, "expected a 4-D float32 x, got ", x.dim(),
                    "-D ", x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 4 && w1.size(0) == C && w1.size(1) == 1 && w1.scalar_type() == at::kFloat, what,
                    "expected a float32 depthwise weight [", C, ", 1, kh, kw], got ", w1.scalar_type(), " ",
                    w1.sizes());
  TORCH_CHECK_VALUE(w2.dim() == 4 && w2.size(1) == C && w2.size(2) == 1 && w2.size(3) == 1 &&
                        w2.scalar_type() == at::kFloat,
                    what, "expected a float32 1x1 weight [C_out, ", C, ", 1, 1], got ", w2.scalar_type(), " ",
                    w2.sizes());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, what,
                    "stride, padding and dilation need 2 values each");
  const Act act1 = parse_act(act1_name), act2 = parse_act(act2_name);
  const auto [oh, ow] = out_hw(x, w1, stride, padding, dilation);
  TORCH_CHECK_VALUE(oh >= 1 && ow >= 1, what, "input ", x.sizes(), " is smaller than the dilated kernel");
  const int64_t Cout = w2.size(0);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res)
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({x.size(0), Cout, oh, ow}) && residual->device().is_cpu(),
                      what, "expected a CPU residual of the output's shape [", x.size(0), ", ", Cout, ", ", oh, ", ",
                      ow, "], got ", residual->sizes());
  const at::Tensor xr = rows_stride(x) >= 0 ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({x.size(0), Cout, oh, ow}, x.options(), at::MemoryFormat::ChannelsLast);
  if (x.size(0) == 0 || Cout == 0) return out;
  auto separate = [&]() -> at::Tensor {
    at::Tensor y = conv_common(xr, w1, srcs1, fold1, eps1, std::nullopt, std::nullopt, stride, padding, dilation, C,
                               act1_name, param1, true, std::nullopt, 1);
    return conv_common(y, w2, srcs2, fold2, eps2, residual, std::nullopt, {1, 1}, {0, 0}, {1, 1}, 1, act2_name,
                       param2, true, std::nullopt, 1);
  };
  // Banded where effops' depthwise kernel and the register-blocked GEMM would run the two convs.
  if (g_dw_pair_policy == 0 || !use_own_depthwise(xr, w1, C, stride) || !gemm_paneled(Cout) || C == 0)
    return separate();
  std::shared_ptr<Packed> e1 = packed_for(xr, w1, srcs1, fold1, {stride, padding, dilation, {}, C, at::kFloat, eps1},
                                          Impl::Depthwise);
  std::shared_ptr<Packed> e2 = packed_for(xr, w2, srcs2, fold2, {{1, 1}, {0, 0}, {1, 1}, {}, 1, at::kFloat, eps2},
                                          Impl::Gemm);
  const at::Tensor r_rows = residual_rows(residual);
  auto banded = [&] {
    run_dw_pair(xr, *e1, w1.size(2), w1.size(3), act1, param1, *e2, out, r_rows, act2, param2);
  };
  bool use_bands = g_dw_pair_policy == 1;
  if (g_dw_pair_policy == 2) {
    // Measured once per problem against the two convs (each as fast as its own choice makes it).
    const auto key = std::make_tuple(x.sizes().vec(), Cout, stride, padding, w1.size(2), has_res,
                                     static_cast<int64_t>(act1), static_cast<int64_t>(act2), at::get_num_threads());
    use_bands = measured_once(g_dw_pair_faster, key, [&] {
      at::NoGradGuard no_grad;
      // From cold caches, as in a model, where the separate convs' intermediate tensor is written
      // to memory the other layers' data has pushed out of the cache (timed hot, back to back, it
      // stays in the cache and the separate convs look faster than they are there).
      CacheEvictor evict(xr);
      return first_is_faster(banded, [&] { separate(); }, 3, [&] { evict(); });
    });
  }
  if (!use_bands) return separate();
  banded();
  g_impl_calls[static_cast<int>(Impl::Gemm)].fetch_add(1, std::memory_order_relaxed);
  g_impl_calls[static_cast<int>(Impl::Depthwise)].fetch_add(1, std::memory_order_relaxed);
  return out;
}

}  // namespace

std::pair<int64_t, int64_t> conv_out_hw(const at::Tensor& x, const at::Tensor& weight, const IntVec& stride,
                                        const IntVec& padding, const IntVec& dilation) {
  return out_hw(x, weight, stride, padding, dilation);
}

bool prefers_channels_last(const at::Tensor& x) { return channels_last_ish(x); }

at::Tensor conv_bn_act_segments(const std::vector<at::Tensor>& segments, const at::Tensor& weight,
                                const OptTensor& conv_bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
                                const OptTensor& running_mean, const OptTensor& running_var, double eps,
                                const OptTensor& residual, const OptTensor& out, const std::string& act,
                                double act_param, bool residual_after_act, const OptTensor& stats_counter,
                                const OptTensor& pool) {
  return segments_common(segments, weight,
                         {weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, stats_counter},
                         bn_fold(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps), eps, residual, out,
                         act, act_param, residual_after_act, pool);
}

at::Tensor conv_scale_bias_act_segments(const std::vector<at::Tensor>& segments, const at::Tensor& weight,
                                        const OptTensor& scale, const OptTensor& bias, const OptTensor& residual,
                                        const OptTensor& out, const std::string& act, double act_param,
                                        bool residual_after_act, const OptTensor& pool) {
  FoldFn fold = [=]() {
    return std::make_pair(scale.has_value() ? *scale : at::Tensor(), bias.has_value() ? *bias : at::Tensor());
  };
  return segments_common(segments, weight, {weight, scale, bias}, fold, 0.0, residual, out, act, act_param,
                         residual_after_act, pool);
}

void set_pointwise_policy(int64_t policy) {
  TORCH_CHECK_VALUE(policy >= 0 && policy <= 2, "pointwise policy: 0 (oneDNN), 1 (GEMM) or 2 (measured), got ", policy);
  g_pointwise_policy = static_cast<int>(policy);
}
int64_t pointwise_policy() { return g_pointwise_policy; }

void set_winograd_policy(int64_t policy) {
  TORCH_CHECK_VALUE(policy >= 0 && policy <= 2, "winograd policy: 0 (oneDNN), 1 (Winograd) or 2 (measured), got ", policy);
  g_winograd_policy = static_cast<int>(policy);
}
int64_t winograd_policy() { return g_winograd_policy; }

void set_direct_policy(int64_t policy) {
  TORCH_CHECK_VALUE(policy >= 0 && policy <= 2, "direct policy: 0 (oneDNN), 1 (direct) or 2 (measured), got ", policy);
  g_direct_policy = static_cast<int>(policy);
}
int64_t direct_policy() { return g_direct_policy; }

void set_depthwise_policy(int64_t policy) { g_depthwise_policy = static_cast<int>(policy); }

void set_pair_policy(int64_t policy) {
  TORCH_CHECK_VALUE(policy >= 0 && policy <= 2, "pair policy: 0 (separate), 1 (banded) or 2 (banded up to 128 input "
                    "channels), got ", policy);
  g_pair_policy = static_cast<int>(policy);
}
int64_t pair_policy() { return g_pair_policy; }
int64_t depthwise_policy() { return g_depthwise_policy; }

at::Tensor conv_scale_bias_act(const at::Tensor& x, const at::Tensor& weight, const OptTensor& scale,
                               const OptTensor& bias, const OptTensor& residual, const OptTensor& out,
                               IntVec stride, IntVec padding, IntVec dilation, int64_t groups,
                               const std::string& act, double act_param, bool residual_after_act,
                               const OptTensor& gate, int64_t out_shuffle_groups) {
  FoldFn fold = [&]() {
    return std::make_pair(scale.has_value() ? *scale : at::Tensor(), bias.has_value() ? *bias : at::Tensor());
  };
  return conv_common(x, weight, {weight, scale, bias}, fold, 0.0, residual, out, stride, padding, dilation, groups,
                     act, act_param, residual_after_act, gate, out_shuffle_groups);
}

at::Tensor conv_bn_act(const at::Tensor& x, const at::Tensor& weight, const OptTensor& conv_bias,
                       const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                       const OptTensor& running_var, double eps, const OptTensor& residual, const OptTensor& out,
                       IntVec stride, IntVec padding, IntVec dilation, int64_t groups, const std::string& act,
                       double act_param, bool residual_after_act, const OptTensor& gate,
                       int64_t out_shuffle_groups, const OptTensor& stats_counter) {
  FoldFn fold = bn_fold(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps);
  return conv_common(x, weight, {weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, stats_counter},
                     fold, eps,
                     residual, out, stride, padding, dilation, groups, act, act_param, residual_after_act, gate,
                     out_shuffle_groups);
}

at::Tensor pointwise_depthwise_bn_act(
    const at::Tensor& x, const at::Tensor& pw_weight, const OptTensor& pw_conv_bias, const OptTensor& pw_bn_weight,
    const OptTensor& pw_bn_bias, const OptTensor& pw_running_mean, const OptTensor& pw_running_var, double pw_eps,
    const OptTensor& pw_stats_counter, const std::string& pw_act, double pw_act_param, const at::Tensor& dw_weight,
    const OptTensor& dw_conv_bias, const OptTensor& dw_bn_weight, const OptTensor& dw_bn_bias,
    const OptTensor& dw_running_mean, const OptTensor& dw_running_var, double dw_eps,
    const OptTensor& dw_stats_counter, IntVec stride, IntVec padding, IntVec dilation, const std::string& dw_act,
    double dw_act_param) {
  return pair_common(
      x, pw_weight,
      {pw_weight, pw_conv_bias, pw_bn_weight, pw_bn_bias, pw_running_mean, pw_running_var, pw_stats_counter},
      bn_fold(pw_conv_bias, pw_bn_weight, pw_bn_bias, pw_running_mean, pw_running_var, pw_eps), pw_eps, pw_act,
      pw_act_param, dw_weight,
      {dw_weight, dw_conv_bias, dw_bn_weight, dw_bn_bias, dw_running_mean, dw_running_var, dw_stats_counter},
      bn_fold(dw_conv_bias, dw_bn_weight, dw_bn_bias, dw_running_mean, dw_running_var, dw_eps), dw_eps, stride,
      padding, dilation, dw_act, dw_act_param);
}

at::Tensor depthwise_pointwise_bn_act(
    const at::Tensor& x, const at::Tensor& dw_weight, const OptTensor& dw_conv_bias, const OptTensor& dw_bn_weight,
    const OptTensor& dw_bn_bias, const OptTensor& dw_running_mean, const OptTensor& dw_running_var, double dw_eps,
    const OptTensor& dw_stats_counter, IntVec stride, IntVec padding, IntVec dilation, const std::string& dw_act,
    double dw_act_param, const at::Tensor& pw_weight, const OptTensor& pw_conv_bias, const OptTensor& pw_bn_weight,
    const OptTensor& pw_bn_bias, const OptTensor& pw_running_mean, const OptTensor& pw_running_var, double pw_eps,
    const OptTensor& pw_stats_counter, const std::string& pw_act, double pw_act_param, const OptTensor& residual) {
  return dw_pair_common(
      x, dw_weight,
      {dw_weight, dw_conv_bias, dw_bn_weight, dw_bn_bias, dw_running_mean, dw_running_var, dw_stats_counter},
      bn_fold(dw_conv_bias, dw_bn_weight, dw_bn_bias, dw_running_mean, dw_running_var, dw_eps), dw_eps, stride,
      padding, dilation, dw_act, dw_act_param, pw_weight,
      {pw_weight, pw_conv_bias, pw_bn_weight, pw_bn_bias, pw_running_mean, pw_running_var, pw_stats_counter},
      bn_fold(pw_conv_bias, pw_bn_weight, pw_bn_bias, pw_running_mean, pw_running_var, pw_eps), pw_eps, pw_act,
      pw_act_param, residual);
}

at::Tensor osa_block_native(const at::Tensor& x, const OptTensor& red_w, const OptTensor& red_s,
                            const OptTensor& red_b, const std::vector<at::Tensor>& dw_ws,
                            const std::vector<at::Tensor>& mid_ws, const std::vector<at::Tensor>& mid_ss,
                            const std::vector<at::Tensor>& mid_bs, const at::Tensor& agg_w, const OptTensor& agg_s,
                            const OptTensor& agg_b, const OptTensor& ese_w, const OptTensor& ese_b, bool identity,
                            const std::string& act, double act_param) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                    "effops osa_block_native: expected a 4-D float32 CPU input, got ", x.dim(), "-D ", x.scalar_type());
  TORCH_CHECK_VALUE(!mid_ws.empty() && mid_bs.size() == mid_ws.size() &&
                        (mid_ss.empty() || mid_ss.size() == mid_ws.size()) &&
                        (dw_ws.empty() || dw_ws.size() == mid_ws.size()),
                    "effops osa_block_native: expected one weight, bias (and scale, depthwise weight) per stage conv");
  auto scale_bias = [](const OptTensor& s, const OptTensor& b) -> FoldFn {
    return [=]() {
      return std::make_pair(s.has_value() ? *s : at::Tensor(), b.has_value() ? *b : at::Tensor());
    };
  };
  const FoldFn none = [] { return std::make_pair(at::Tensor(), at::Tensor()); };
  std::vector<at::Tensor> feats{x};
  at::Tensor y = x;
  if (red_w.has_value() && red_w->defined())
    y = conv_common(y, *red_w, {*red_w, red_s, red_b}, scale_bias(red_s, red_b), 0.0, std::nullopt, std::nullopt,
                    {1, 1}, {0, 0}, {1, 1}, 1, act, act_param, true, std::nullopt, 1);
  for (size_t i = 0; i < mid_ws.size(); ++i) {
    const at::Tensor& w = mid_ws[i];
    const OptTensor s = mid_ss.empty() ? OptTensor() : OptTensor(mid_ss[i]);
    const OptTensor b = mid_bs[i];
    if (!dw_ws.empty()) {
      const at::Tensor& dw = dw_ws[i];
      const IntVec same{dw.size(2) / 2, dw.size(3) / 2};
      if (w.size(2) == 1 && w.size(3) == 1) {  // depthwise -> 1x1: one banded pair where measured faster
        y = dw_pair_common(y, dw, {dw}, none, 0.0, {1, 1}, same, {1, 1}, "identity", 0.0, w, {w, s, b},
                           scale_bias(s, b), 0.0, act, act_param, std::nullopt);
        feats.push_back(y);
        continue;
      }
      y = conv_common(y, dw, {dw}, none, 0.0, std::nullopt, std::nullopt, {1, 1}, same, {1, 1}, y.size(1), "identity",
                      0.0, true, std::nullopt, 1);
    }
    y = conv_common(y, w, {w, s, b}, scale_bias(s, b), 0.0, std::nullopt, std::nullopt, {1, 1},
                    {w.size(2) / 2, w.size(3) / 2}, {1, 1}, 1, act, act_param, true, std::nullopt, 1);
    feats.push_back(y);
  }
  const OptTensor res = identity ? OptTensor(x) : OptTensor();
  const std::vector<OptTensor> agg_srcs{agg_w, agg_s, agg_b};
  if (!(ese_w.has_value() && ese_w->defined()))
    return segments_common(feats, agg_w, agg_srcs, scale_bias(agg_s, agg_b), 0.0, res, std::nullopt, act, act_param,
                           true, std::nullopt);
  // the eSE squeeze rides the aggregation's stores; gate * y (+ identity) in place
  at::Tensor means = at::empty({x.size(0), agg_w.size(0)}, x.options().dtype(at::kFloat));
  y = segments_common(feats, agg_w, agg_srcs, scale_bias(agg_s, agg_b), 0.0, std::nullopt, std::nullopt, act, act_param,
                      true, means);
  at::Tensor gate = se_gate_of_means(means, std::nullopt, std::nullopt, *ese_w, ese_b, Act::Identity, 0.0,
                                     Act::Hardsigmoid, 0.0);
  return se_apply(y, gate, res, y, Act::Identity, 0.0);
}

namespace {

// Validates a block's osa_block_steps arguments (raising on malformed ones); false when a weight no
// longer has the dtype, device or shape in weight_sizes (empty: not checked).
bool osa_block_valid(const OsaBlockArgs& a) {
  const char* what = "effops osa_block_steps: ";
  int64_t convs = 1;  // the aggregation
  for (int64_t s : a.steps) {
    TORCH_CHECK_VALUE(s >= 0 && s <= 2, what, "a step is 0 (reduction), 1 (conv) or 2 (depthwise -> 1x1), got ", s);
    convs += s == 2 ? 2 : 1;
  }
  const auto n = static_cast<size_t>(convs);
  TORCH_CHECK_VALUE(a.t.size() == 7 * n && a.eps.size() == n && a.acts.size() == n && a.act_params.size() == n &&
                        a.geom.size() == 7 * n,
                    what, "expected 7 tensors, an eps, an activation, its parameter and 7 ints per conv (", convs,
                    " convs), got ", a.t.size(), ", ", a.eps.size(), ", ", a.acts.size(), ", ", a.act_params.size(),
                    ", ", a.geom.size());
  for (size_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(a.t[7 * i].has_value() && a.t[7 * i]->defined(), what, "conv ", i, " has no weight");
  if (!a.weight_sizes.empty()) {
    TORCH_CHECK_VALUE(a.weight_sizes.size() == 4 * n, what, "expected 4 weight sizes per conv (", convs,
                      " convs), got ", a.weight_sizes.size());
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& wi = *a.t[7 * i];
      if (wi.scalar_type() != at::kFloat || !wi.device().is_cpu() ||
          wi.sizes() != at::IntArrayRef(a.weight_sizes.data() + 4 * i, 4))
        return false;
    }
  }
  return true;
}

// The block on validated arguments. With `deferred_gate`, a block with an eSE gate and no identity
// returns its output ungated and the gate there (the caller scales a max pool of it instead).
at::Tensor osa_block_run(const at::Tensor& x, const OsaBlockArgs& a, at::Tensor* deferred_gate) {
  const auto& t = a.t;
  const auto& geom = a.geom;
  const auto w = [&](size_t i) -> const at::Tensor& { return *t[7 * i]; };
  const auto T = [&](size_t i, size_t k) -> const OptTensor& { return t[7 * i + k]; };
  const auto G = [&](size_t i, size_t k) { return IntVec{geom[7 * i + k], geom[7 * i + k + 1]}; };
  std::vector<at::Tensor> feats{x};
  at::Tensor y = x;
  size_t c = 0;
  for (int64_t s : a.steps) {
    if (s == 2) {
      y = depthwise_pointwise_bn_act(y, w(c), T(c, 1), T(c, 2), T(c, 3), T(c, 4), T(c, 5), a.eps[c], T(c, 6), G(c, 0),
                                     G(c, 2), G(c, 4), a.acts[c], a.act_params[c], w(c + 1), T(c + 1, 1), T(c + 1, 2),
                                     T(c + 1, 3), T(c + 1, 4), T(c + 1, 5), a.eps[c + 1], T(c + 1, 6), a.acts[c + 1],
                                     a.act_params[c + 1], std::nullopt);
      c += 2;
    } else {
      y = conv_bn_act(y, w(c), T(c, 1), T(c, 2), T(c, 3), T(c, 4), T(c, 5), a.eps[c], std::nullopt, std::nullopt,
                      G(c, 0), G(c, 2), G(c, 4), geom[7 * c + 6], a.acts[c], a.act_params[c], true, std::nullopt, 1,
                      T(c, 6));
      ++c;
    }
    if (s != 0) feats.push_back(y);
  }
  const bool ese = a.ese_w.has_value() && a.ese_w->defined();
  const OptTensor res = a.identity ? OptTensor(x) : OptTensor();
  // the eSE squeeze rides the aggregation's stores (float32 means, as FusedOSA allocates them)
  const OptTensor means = ese ? OptTensor(at::empty({x.size(0), w(c).size(0)}, x.options().dtype(at::kFloat)))
                              : OptTensor();
  y = conv_bn_act_segments(feats, w(c), T(c, 1), T(c, 2), T(c, 3), T(c, 4), T(c, 5), a.eps[c],
                           ese ? OptTensor() : res, std::nullopt, a.acts[c], a.act_params[c], true, T(c, 6), means);
  if (!ese) return y;
  const at::Tensor gate = se_gate_of_means(*means, std::nullopt, std::nullopt, *a.ese_w, a.ese_b, Act::Identity, 0.0,
                                           Act::Hardsigmoid, 0.0);
  if (deferred_gate != nullptr && !a.identity) {
    *deferred_gate = gate;
    return y;
  }
  return se_apply(y, gate, res, y, Act::Identity, 0.0);
}

}  // namespace

std::optional<at::Tensor> osa_block_steps(const at::Tensor& x, const std::vector<int64_t>& steps,
                                          const std::vector<OptTensor>& t, const std::vector<double>& eps,
                                          const std::vector<std::string>& acts, const std::vector<double>& act_params,
                                          const std::vector<int64_t>& geom, const OptTensor& ese_w,
                                          const OptTensor& ese_b, bool identity,
                                          const std::vector<int64_t>& weight_sizes) {
  const OsaBlockArgs a{steps, t, eps, acts, act_params, geom, ese_w, ese_b, identity, weight_sizes};
  if (!osa_block_valid(a)) return std::nullopt;
  return osa_block_run(x, a, nullptr);
}

void OsaChain::add_pool(IntVec kernel, IntVec stride, IntVec padding, bool ceil_mode) {
  TORCH_CHECK_VALUE(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2,
                    "effops OsaChain: a pool takes 2 kernel sizes, strides and paddings");
  Op op;
  op.pool = true;
  op.kernel = std::move(kernel);
  op.stride = std::move(stride);
  op.padding = std::move(padding);
  op.ceil_mode = ceil_mode;
  ops_.push_back(std::move(op));
}

void OsaChain::add_block(OsaBlockArgs block) {
  TORCH_CHECK_VALUE(!block.weight_sizes.empty(), "effops OsaChain: a block needs its weight sizes");
  osa_block_valid(block);  // raises on malformed arguments
  Op op;
  op.block = std::move(block);
  ops_.push_back(std::move(op));
}

std::optional<at::Tensor> OsaChain::run(const at::Tensor& x) const {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                    "effops OsaChain: expected a 4-D float32 CPU input, got ", x.sizes(), " ", x.scalar_type());
  for (const Op& op : ops_)
    if (!op.pool && !osa_block_valid(op.block)) return std::nullopt;
  at::Tensor y = x, gate;
  for (size_t i = 0; i < ops_.size(); ++i) {
    const Op& op = ops_[i];
    if (op.pool) {
      y = max_pool_nhwc(y, op.kernel, op.stride, op.padding, op.ceil_mode);
      if (gate.defined()) {  // the previous block's eSE gate, after its max pool (exact, gate >= 0)
        y.mul_(gate.view({gate.size(0), gate.size(1), 1, 1}));
        gate = at::Tensor();
      }
    } else {
      const bool pool_next = i + 1 < ops_.size() && ops_[i + 1].pool;
      y = osa_block_run(y, op.block, pool_next ? &gate : nullptr);
    }
  }
  return y;
}

void set_dw_pair_policy(int64_t policy) {
  TORCH_CHECK_VALUE(policy >= 0 && policy <= 2, "depthwise-pointwise pair policy: 0 (separate), 1 (banded) or 2 "
                    "(measured per problem), got ", policy);
  g_dw_pair_policy = static_cast<int>(policy);
}
int64_t dw_pair_policy() { return g_dw_pair_policy; }

std::map<std::string, int64_t> conv_impl_counts(bool reset) {
  std::map<std::string, int64_t> counts;
  for (int i = 0; i < kImpls; ++i)
    counts[kImplNames[i]] = reset ? g_impl_calls[i].exchange(0) : g_impl_calls[i].load();
  return counts;
}

int64_t weight_cache_size() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return static_cast<int64_t>(g_size);
}

void clear_weight_cache() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_cache.clear();
  g_order.clear();
  g_size = 0;
}


// ---- measured choices as rows, for the tuning file -------------------------------------------
// A key is flattened to integers (a vector as its length, then its elements), so one Python-side
// format holds every table; reading one back checks it has exactly the shape of its table's key.

namespace {

template <typename T>
void flat_one(std::vector<int64_t>& out, const T& v) {
  out.push_back(static_cast<int64_t>(v));
}
void flat_one(std::vector<int64_t>& out, const std::vector<int64_t>& v) {
  out.push_back(static_cast<int64_t>(v.size()));
  out.insert(out.end(), v.begin(), v.end());
}
template <typename Tuple>
std::vector<int64_t> flatten_key(const Tuple& key) {
  std::vector<int64_t> out;
  std::apply([&out](const auto&... e) { (flat_one(out, e), ...); }, key);
  return out;
}

template <typename T>
bool read_one(const std::vector<int64_t>& in, size_t& i, T& v) {
  if (i >= in.size()) return false;
  const int64_t raw = in[i++];
  if constexpr (std::is_same_v<T, bool>) {
    if (raw != 0 && raw != 1) return false;
  } else if constexpr (std::is_same_v<T, Impl>) {
    if (raw < 0 || raw >= kImpls) return false;
  }
  v = static_cast<T>(raw);
  return true;
}
bool read_one(const std::vector<int64_t>& in, size_t& i, std::vector<int64_t>& v) {
  if (i >= in.size()) return false;
  const int64_t n = in[i++];
  if (n < 0 || n > static_cast<int64_t>(in.size() - i)) return false;
  v.assign(in.begin() + static_cast<std::ptrdiff_t>(i), in.begin() + static_cast<std::ptrdiff_t>(i + n));
  i += static_cast<size_t>(n);
  return true;
}
template <typename Tuple>
bool unflatten_key(const std::vector<int64_t>& in, Tuple& key) {
  size_t i = 0;
  const bool ok = std::apply([&](auto&... e) { return (read_one(in, i, e) && ...); }, key);
  return ok && i == in.size();
}

template <typename Map>
void export_table(const char* name, const Map& table, std::vector<MeasuredChoice>& rows) {
  for (const auto& [key, faster] : table) rows.emplace_back(name, flatten_key(key), faster);
}
template <typename Map>
bool import_row(Map& table, const std::vector<int64_t>& flat, bool faster) {
  typename Map::key_type key;
  if (!unflatten_key(flat, key)) return false;
  table.emplace(key, faster);  // a choice measured in this process stays
  return true;
}

}  // namespace

std::vector<MeasuredChoice> measured_choices() {
  std::lock_guard<std::mutex> lock(g_choice_mutex);
  std::vector<MeasuredChoice> rows;
  export_table("alt", g_alt_faster, rows);
  export_table("segments", g_segments_faster, rows);
  export_table("dw_pair", g_dw_pair_faster, rows);
  return rows;
}

int64_t add_measured_choices(const std::vector<MeasuredChoice>& rows) {
  std::lock_guard<std::mutex> lock(g_choice_mutex);
  int64_t added = 0;
  for (const auto& [table, flat, faster] : rows) {
    bool ok = false;
    if (table == "alt") ok = import_row(g_alt_faster, flat, faster);
    else if (table == "segments") ok = import_row(g_segments_faster, flat, faster);
    else if (table == "dw_pair") ok = import_row(g_dw_pair_faster, flat, faster);
    added += ok;
  }
  return added;
}

void clear_measured_choices() {
  std::lock_guard<std::mutex> lock(g_choice_mutex);
  g_alt_faster.clear();
  g_segments_faster.clear();
  g_dw_pair_faster.clear();
}

}  // namespace effops_native
