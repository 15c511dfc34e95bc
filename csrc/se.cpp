// Squeeze-and-excitation: the gate (pool + two small mat-vecs) and its application.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "activation.h"

namespace effops_native {
namespace {

using c10::BFloat16;

// Pixels per pooling block: every (image, block) sums into its own fp32 row, and the rows are
// added in a fixed order, so the result does not depend on the thread count and each partial
// sum stays short.
constexpr int64_t kPoolBlock = 256;

// Sums x[n, :, pixels p0..p1) into out[C] (channel stride 1; pixel (h, w) at h*sh + w*sw).
template <typename T>
void pool_block_nhwc(const T* xn, int64_t C, int64_t W, int64_t sh, int64_t sw, int64_t p0, int64_t p1, float* out) {
  for (int64_t c = 0; c < C; c += 4 * kVecSize) {
    // Up to four channel vectors per pass over the pixels: more independent add chains.
    const int64_t nv = std::min<int64_t>(4, (C - c + kVecSize - 1) / kVecSize);
    Vec acc[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
    int64_t m[4];
    for (int64_t v = 0; v < 4; ++v) m[v] = std::max<int64_t>(0, std::min<int64_t>(kVecSize, C - c - v * kVecSize));
    int64_t h = p0 / W, w = p0 % W;  // walked, not divided per pixel
    for (int64_t p = p0; p < p1; ++p) {
      const T* px = xn + h * sh + w * sw + c;
      if (nv == 4) {
        for (int v = 0; v < 4; ++v) acc[v] = acc[v] + load_f(px + v * kVecSize, m[v]);
      } else if (nv <= 2) {
        // Few channels: odd pixels go to the spare accumulators (two add chains per vector).
        const int alt = (p & 1) ? 2 : 0;
        for (int v = 0; v < nv; ++v) acc[alt + v] = acc[alt + v] + load_f(px + v * kVecSize, m[v]);
      } else {
        for (int v = 0; v < nv; ++v) acc[v] = acc[v] + load_f(px + v * kVecSize, m[v]);
      }
      if (++w == W) w = 0, ++h;
    }
    if (nv <= 2)
      for (int v = 0; v < nv; ++v) acc[v] = acc[v] + acc[2 + v];
    for (int v = 0; v < nv; ++v) store_f(out + c + v * kVecSize, acc[v], m[v]);
  }
}

// Per-channel plane sums for any strides (NCHW and friends): contiguous rows vectorised.
template <typename T>
float pool_plane(const T* xc, int64_t H, int64_t W, int64_t sh, int64_t sw) {
  float total = 0.f;
  for (int64_t h = 0; h < H; ++h) {
    const T* row = xc + h * sh;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, BFloat16>) {
      if (sw == 1) {
        Vec acc(0.f);
        for (int64_t w = 0; w < W; w += kVecSize) acc = acc + load_f(row + w, std::min<int64_t>(kVecSize, W - w));
        total += at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
        continue;
      }
    }
    float s = 0.f;
    for (int64_t w = 0; w < W; ++w) s += static_cast<float>(row[w * sw]);
    total += s;
  }
  return total;
}

// Channel means [N, C] in fp32.
at::Tensor pool_means(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  at::Tensor means = at::zeros({N, C}, x.options().dtype(at::kFloat));
  if (N == 0 || C == 0) return means;
  if (HW == 0) return means.fill_(std::numeric_limits<float>::quiet_NaN());  // mean of nothing, as torch
  float* mp = means.data_ptr<float>();
  const float inv = 1.f / static_cast<float>(HW);
  const auto st = x.scalar_type();
  const bool nhwc = (C <= 1 || x.stride(1) == 1) && (st == at::kFloat || st == at::kBFloat16);
  if (nhwc) {
    const int64_t nblk = (HW + kPoolBlock - 1) / kPoolBlock;
    std::vector<float> part(static_cast<size_t>(N * nblk * C));
    at::parallel_for(0, N * nblk, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t t = b0; t < b1; ++t) {
        const int64_t n = t / nblk, blk = t % nblk;
        const int64_t p0 = blk * kPoolBlock, p1 = std::min(HW, p0 + kPoolBlock);
        float* dst = part.data() + t * C;
        if (st == at::kFloat) {
          pool_block_nhwc(x.data_ptr<float>() + n * x.stride(0), C, W, x.stride(2), x.stride(3), p0, p1, dst);
        } else {
          pool_block_nhwc(x.data_ptr<BFloat16>() + n * x.stride(0), C, W, x.stride(2), x.stride(3), p0, p1, dst);
        }
      }
    });
    for (int64_t n = 0; n < N; ++n) {
      float* row = mp + n * C;
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const float* src = part.data() + (n * nblk + blk) * C;
        for (int64_t c = 0; c < C; ++c) row[c] += src[c];
      }
      for (int64_t c = 0; c < C; ++c) row[c] *= inv;
    }
    return means;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "se_gate_pool", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t t = b0; t < b1; ++t) {
        const int64_t n = t / C, c = t % C;
        mp[t] = pool_plane(xp + n * x.stride(0) + c * x.stride(1), H, W, x.stride(2), x.stride(3)) * inv;
      }
    });
  });
  return means;
}

// out[n, o] = act(sum_i w[o, i] * in[n, i] + b[o]) with w [O, I] fp32 contiguous.
// At batch 1 this is a matrix-vector product whose weight (up to 4 MB for a 1024-channel eSE) was
// evicted by the convs since the last forward: it is bound by how fast the weight streams in.
// Four rows at a time, two vectors each (eight independent FMA chains: one chain waits on the FMA
// latency, not the memory), each row's stream prefetched ahead of the loads; each thread streams
// one contiguous slice of rows, and a row block's weight stays in L1 across the batch.
void linear_act(const float* in, int64_t N, int64_t I, const float* w, const float* b, int64_t O, Act act, float p,
                float* out) {
  const ActArrayFn actf = act_array_fn(act);
  constexpr int kRows = 4;
  constexpr int64_t kAhead = 512;  // floats (2 KB) ahead of each row's loads
  auto dot_rows = [&](const float* xi, const float* w0, int rows, float* dst) {
    Vec acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = Vec(0.f);
    int64_t i = 0;
    for (; i + 2 * kVecSize <= I; i += 2 * kVecSize) {
      const Vec x0 = Vec::loadu(xi + i), x1 = Vec::loadu(xi + i + kVecSize);
      for (int r = 0; r < kRows; ++r) {
        if (r >= rows) break;
        const float* wr = w0 + r * I + i;
        __builtin_prefetch(wr + kAhead, 0, 0);
        acc[r][0] = at::vec::fmadd(Vec::loadu(wr), x0, acc[r][0]);
        acc[r][1] = at::vec::fmadd(Vec::loadu(wr + kVecSize), x1, acc[r][1]);
      }
    }
    for (; i < I; i += kVecSize) {
      const int64_t m = std::min<int64_t>(kVecSize, I - i);
      const Vec x0 = load_f(xi + i, m);
      for (int r = 0; r < rows; ++r) acc[r][0] = at::vec::fmadd(load_f(w0 + r * I + i, m), x0, acc[r][0]);
    }
    for (int r = 0; r < rows; ++r)
      dst[r] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, acc[r][0] + acc[r][1]);
  };
  const int64_t grain = std::max<int64_t>(kRows, 16384 / std::max<int64_t>(1, I * N));
  at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; o += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, o1 - o));
      for (int64_t n = 0; n < N; ++n) {
        float* dst = out + n * O + o;
        dot_rows(in + n * I, w + o * I, rows, dst);
        for (int r = 0; r < rows; ++r) dst[r] += b ? b[o + r] : 0.f;
      }
    }
    for (int64_t n = 0; n < N; ++n) actf(out + n * O + o0, o1 - o0, p);
  });
}

at::Tensor as_f32_matrix(const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.dim() == 2 || (w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1), "se_gate: ", name,
              " must be [out, in, 1, 1] or [out, in], got ", w.sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "se_gate: ", name, " must be floating point");
  return w.reshape({w.size(0), w.size(1)}).to(at::kFloat).contiguous();
}

at::Tensor as_f32_vector(const OptTensor& b, int64_t n, const char* name) {
  if (!b || !b->defined()) return at::Tensor();
  TORCH_CHECK(b->numel() == n, "se_gate: ", name, " must have ", n, " values, got ", b->numel());
  return b->reshape({n}).to(at::kFloat).contiguous();
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, Act act, double act_param) {
  EFFOPS_PROFILE_RANGE("effops::linear");
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), "effops native linear: expected CPU tensors");
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2, "effops native linear: expected a 2-D input and weight, got ",
                    x.dim(), "-D and ", weight.dim(), "-D");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
                    "effops native linear: expected float32 input and weight, got ", x.scalar_type(), " and ",
                    weight.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) == weight.size(1), "effops native linear: the input has ", x.size(1),
                    " features, the weight expects ", weight.size(1));
  const int64_t O = weight.size(0);
  TORCH_CHECK_VALUE(!bias || !bias->defined() || (bias->scalar_type() == at::kFloat && bias->numel() == O),
                    "effops native linear: expected a float32 bias of ", O, " values");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = bias && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({x.size(0), O}, x.options());
  if (x.size(0) > 0 && O > 0)
    linear_act(xc.data_ptr<float>(), x.size(0), x.size(1), wc.data_ptr<float>(),
               bc.defined() ? bc.data_ptr<float>() : nullptr, O, act, static_cast<float>(act_param), y.data_ptr<float>());
  return y;
}

at::Tensor pool_linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias) {
  EFFOPS_PROFILE_RANGE("effops::pool_linear");
  TORCH_CHECK_VALUE(x.dim() == 4 && x.device().is_cpu() && x.scalar_type() == at::kFloat,
                    "effops native pool_linear: expected a 4-D float32 CPU input, got a ", x.dim(), "-D ",
                    x.scalar_type(), " tensor on ", x.device());
  return linear(pool_means(x), weight, bias, Act::Identity, 0.0);
}

at::Tensor se_gate(const at::Tensor& x, const OptTensor& reduce_weight, const OptTensor& reduce_bias,
                   const at::Tensor& expand_weight, const OptTensor& expand_bias, Act act, double act_param,
                   Act gate, double gate_param) {
  EFFOPS_PROFILE_RANGE("effops::se_gate");
  TORCH_CHECK(x.dim() == 4, "se_gate: x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "se_gate: CPU tensors only");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "se_gate: x must be floating point, got ", x.scalar_type());
  return se_gate_of_means(pool_means(x), reduce_weight, reduce_bias, expand_weight, expand_bias, act, act_param, gate,
                          gate_param);
}

at::Tensor se_gate_of_means(const at::Tensor& means, const OptTensor& reduce_weight, const OptTensor& reduce_bias,
                            const at::Tensor& expand_weight, const OptTensor& expand_bias, Act act, double act_param,
                            Act gate, double gate_param) {
  TORCH_CHECK_VALUE(means.dim() == 2 && means.scalar_type() == at::kFloat && means.device().is_cpu(),
                    "se_gate: the pooled means must be a float32 CPU [N, C] tensor, got ", means.scalar_type(), " ",
                    means.sizes());
  const int64_t N = means.size(0), C = means.size(1);
  at::Tensor h = means.contiguous();
  int64_t width = C;
  if (reduce_weight && reduce_weight->defined()) {
    at::Tensor w1 = as_f32_matrix(*reduce_weight, "reduce_weight");
    TORCH_CHECK(w1.size(1) == C, "se_gate: reduce_weight takes ", w1.size(1), " channels, x has ", C);
    at::Tensor b1 = as_f32_vector(reduce_bias, w1.size(0), "reduce_bias");
    at::Tensor h1 = at::empty({N, w1.size(0)}, h.options());
    if (N > 0)
      linear_act(h.data_ptr<float>(), N, C, w1.data_ptr<float>(), b1.defined() ? b1.data_ptr<float>() : nullptr,
                 w1.size(0), act, static_cast<float>(act_param), h1.data_ptr<float>());
    h = h1;
    width = w1.size(0);
  }
  at::Tensor w2 = as_f32_matrix(expand_weight, "expand_weight");
  TORCH_CHECK(w2.size(1) == width, "se_gate: expand_weight takes ", w2.size(1), " inputs, the squeeze gives ", width);
  TORCH_CHECK(w2.size(0) == C, "se_gate: expand_weight gives ", w2.size(0), " channels, x has ", C);
  at::Tensor b2 = as_f32_vector(expand_bias, C, "expand_bias");
  at::Tensor g = at::empty({N, C}, h.options());
  if (N > 0)
    linear_act(h.data_ptr<float>(), N, width, w2.data_ptr<float>(), b2.defined() ? b2.data_ptr<float>() : nullptr, C,
               gate, static_cast<float>(gate_param), g.data_ptr<float>());
  return g;
}

// ---- se_apply -------------------------------------------------------------------------------

namespace {

// act(x * gate + residual) over rows of channels (channel stride 1 everywhere).
template <Act A, typename x_t, typename out_t>
void apply_nhwc(const at::Tensor& x, const float* gate, const at::Tensor& res, at::Tensor& out, float param) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const x_t* xp = x.data_ptr<x_t>();
  out_t* op = out.data_ptr<out_t>();
  const bool has_res = res.defined();
  const bool res_bf16 = has_res && res.scalar_type() == at::kBFloat16;
  const char* rp = has_res ? static_cast<const char*>(res.data_ptr()) : nullptr;
  const int64_t res_es = has_res ? res.element_size() : 0;
  const Vec p(param);
  const int64_t xs0 = x.stride(0), xs2 = x.stride(2), xs3 = x.stride(3);
  const int64_t os0 = out.stride(0), os2 = out.stride(2), os3 = out.stride(3);
  const int64_t rs0 = has_res ? res.stride(0) * res_es : 0, rs2 = has_res ? res.stride(2) * res_es : 0,
                rs3 = has_res ? res.stride(3) * res_es : 0;
  // Tasks are (image, row) pairs; the pixels of a row are walked with their strides.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * W));
  at::parallel_for(0, N * H, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / H, h = t % H;
      const float* gr = gate + n * C;
      const x_t* xr = xp + n * xs0 + h * xs2;
      out_t* orow = op + n * os0 + h * os2;
      const char* rr = has_res ? rp + n * rs0 + h * rs2 : nullptr;
      for (int64_t w = 0; w < W; ++w, xr += xs3, orow += os3, rr += rs3) {
        for (int64_t c = 0; c < C; c += kVecSize) {
          const int64_t m = std::min<int64_t>(kVecSize, C - c);
          Vec v = load_f(xr + c, m) * load_f(gr + c, m);
          if (has_res) {
            v = v + (res_bf16 ? load_f(reinterpret_cast<const BFloat16*>(rr) + c, m)
                              : load_f(reinterpret_cast<const float*>(rr) + c, m));
          }
          store_f(orow + c, ActFn<A>::apply(v, p), m);
        }
      }
    }
  });
}

// Any strides, any float dtype: one (n, c, h) row at a time, scalar.
template <Act A, typename x_t, typename out_t>
void apply_strided(const at::Tensor& x, const float* gate, const at::Tensor& res, at::Tensor& out, float param) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const x_t* xp = x.data_ptr<x_t>();
  out_t* op = out.data_ptr<out_t>();
  const bool has_res = res.defined();
  at::Tensor resf = has_res ? res.to(at::kFloat) : at::Tensor();  // strides kept, values exact
  const float* rp = has_res ? resf.data_ptr<float>() : nullptr;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2), xs3 = x.stride(3);
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2), os3 = out.stride(3);
  const int64_t rs0 = has_res ? resf.stride(0) : 0, rs1 = has_res ? resf.stride(1) : 0,
                rs2 = has_res ? resf.stride(2) : 0, rs3 = has_res ? resf.stride(3) : 0;
  at::parallel_for(0, N * C * H, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, W)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / (C * H), c = (t / H) % C, h = t % H;
      const float g = gate[n * C + c];
      const x_t* xr = xp + n * xs0 + c * xs1 + h * xs2;
      out_t* orow = op + n * os0 + c * os1 + h * os2;
      const float* rr = has_res ? rp + n * rs0 + c * rs1 + h * rs2 : nullptr;
      for (int64_t w = 0; w < W; ++w) {
        float v = static_cast<float>(xr[w * xs3]) * g;
        if (rr) v += rr[w * rs3];
        orow[w * os3] = static_cast<out_t>(ActFn<A>::apply(v, param));
      }
    }
  });
}

bool channel_unit(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

}  // namespace

at::Tensor se_apply(const at::Tensor& x, const at::Tensor& gate, const OptTensor& residual, const OptTensor& out,
                    Act act, double act_param) {
  EFFOPS_PROFILE_RANGE("effops::se_apply");
  TORCH_CHECK(x.dim() == 4, "se_apply: x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "se_apply: CPU tensors only");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16, "se_apply: x must be float32 or bfloat16, got ", st);
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(gate.numel() == N * C && gate.size(0) == N, "se_apply: gate must be [N, C] = [", N, ", ", C, "], got ",
              gate.sizes());
  at::Tensor g = gate.reshape({N, C}).to(at::kFloat).contiguous();
  at::Tensor res;
  if (residual && residual->defined()) {
    res = *residual;
    TORCH_CHECK(res.sizes() == x.sizes(), "se_apply: residual must have x's shape ", x.sizes(), ", got ",
                res.sizes());
    TORCH_CHECK(res.scalar_type() == at::kFloat || res.scalar_type() == at::kBFloat16,
                "se_apply: residual must be float32 or bfloat16, got ", res.scalar_type());
  }
  at::Tensor y;
  if (out && out->defined()) {
    y = *out;
    TORCH_CHECK(y.sizes() == x.sizes(), "se_apply: out must have x's shape ", x.sizes(), ", got ", y.sizes());
    TORCH_CHECK(y.scalar_type() == st, "se_apply: out must have x's dtype ", st, ", got ", y.scalar_type());
    at::assert_no_internal_overlap(y);
    at::assert_no_partial_overlap(y, x);
    if (res.defined()) at::assert_no_partial_overlap(y, res);
  } else {
    y = at::empty(x.sizes(), x.options().memory_format(x.suggest_memory_format()));
  }
  if (x.numel() == 0) return y;
  const float* gp = g.data_ptr<float>();
  const float p = static_cast<float>(act_param);
  const bool fast = channel_unit(x) && channel_unit(y) && (!res.defined() || channel_unit(res));
  dispatch_act(act, [&](auto a) {
    constexpr Act A = decltype(a)::value;
    if (st == at::kFloat) {
      (fast ? apply_nhwc<A, float, float> : apply_strided<A, float, float>)(x, gp, res, y, p);
    } else {
      (fast ? apply_nhwc<A, BFloat16, BFloat16> : apply_strided<A, BFloat16, BFloat16>)(x, gp, res, y, p);
    }
  });
  return y;
}

}  // namespace effops_native
