// NHWC depthwise convolution + bias + activation (+ residual), vectorised over channels.
//
// Work is split into tasks of (image, output row, channel chunk). Within a task, output pixels
// are computed in register tiles of T pixels x one channel vector: the T accumulators start at
// the bias, every input pixel of a kernel row is loaded once and multiplied into each
// accumulator it contributes to (with the kernel width, stride and dilation known at compile
// time for the common shapes), and the fp32 tile goes to a small L1 scratch. A second function,
// chosen once per call for the activation and the output dtype, then adds the residual, applies
// the activation and rounds once while storing. Splitting there keeps the number of template
// instances small (shapes x input dtype, plus activations x output dtype) for an extra L1 round
// trip of the accumulators, which is cheap next to the KH*KW multiply-adds per output.
//
// Tiles whose receptive field crosses the zero padding or the row end skip those input columns.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>

#include "activation.h"

namespace effops_native {
namespace {

using c10::BFloat16;

constexpr int64_t kChunk = 256;   // channels per task (multiple of kVecSize)
constexpr int kTile = 8;          // output pixels per register tile

template <int... I, class F>
inline __attribute__((always_inline)) void static_for_impl(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}
// f(integral_constant<int, 0>) ... f(integral_constant<int, N-1>), fully unrolled.
template <int N, class F>
inline __attribute__((always_inline)) void static_for(F&& f) {
  static_for_impl(std::make_integer_sequence<int, N>{}, std::forward<F>(f));
}

struct Geometry {
  int64_t C, H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t x_sn, x_sh, x_sw;  // element strides of x (channel stride 1)
  const float* taps;         // [kh*kw, C], row stride tap_stride
  int64_t tap_stride;
  const float* bias;         // [C] (zeros when the op has none)
};

// One register tile: T output pixels from ow0 for channels [c0, c0 + nc), into
// acc[t * kChunk + c - c0]. xn points at image n; kernel rows [kh_lo, kh_hi) hit valid input rows
// from ih0. Checked: input columns outside [0, W) are zero padding, skipped (borders, and the
// last tile of a row, whose pixels past the row end are computed but never stored); unchecked
// tiles lie wholly inside the input row.
// KW_/S_/D_ > 0 fix the kernel width / stride / dilation at compile time; 0 reads them from g.
template <typename in_t, int KW_, int S_, int D_, int T, bool Checked>
void dw_tile(const Geometry& g, const in_t* xn, int64_t ih0, int64_t kh_lo, int64_t kh_hi, int64_t ow0,
             int64_t c0, int64_t nc, float* acc_out) {
  const int64_t KW = KW_ ? KW_ : g.kw;
  const int64_t S = S_ ? S_ : g.sw;
  const int64_t D = D_ ? D_ : g.dw;
  const int64_t sw = g.x_sw;
  const int64_t iw0 = ow0 * S - g.pw;
  const auto inside = [&](int64_t j) { return !Checked || static_cast<uint64_t>(iw0 + j) < static_cast<uint64_t>(g.W); };
  for (int64_t cb = 0; cb < nc; cb += kVecSize) {
    const int64_t n = std::min<int64_t>(kVecSize, nc - cb);
    const int64_t c = c0 + cb;
    Vec acc[T];
    const Vec b = load_f(g.bias + c, n);
    for (int t = 0; t < T; ++t) acc[t] = b;
    for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
      const in_t* xr = xn + (ih0 + kh * g.dh) * g.x_sh + iw0 * sw + c;
      const float* tr = g.taps + kh * KW * g.tap_stride + c;
      if constexpr (KW_ > 0 && S_ > 0 && D_ > 0) {
        Vec w[KW_];
        static_for<KW_>([&](auto K) { w[K.value] = load_f(tr + K.value * g.tap_stride, n); });
        // Input position j of this kernel row feeds output t through tap k when j = t*S + k*D:
        // each input vector is loaded once per kernel row.
        constexpr int NJ = (T - 1) * S_ + (KW_ - 1) * D_ + 1;
        static_for<NJ>([&](auto J) {
          constexpr int j = J.value;
          if (!inside(j)) return;
          const Vec xv = load_f(xr + j * sw, n);
          static_for<KW_>([&](auto K) {
            constexpr int r = j - K.value * D_;
            if constexpr (r >= 0 && r % S_ == 0 && r / S_ < T) {
              acc[r / S_] = at::vec::fmadd(xv, w[K.value], acc[r / S_]);
            }
          });
        });
      } else {
        for (int64_t k = 0; k < KW; ++k) {
          const Vec w = load_f(tr + k * g.tap_stride, n);
          for (int t = 0; t < T; ++t) {
            const int64_t j = t * S + k * D;
            if (inside(j)) acc[t] = at::vec::fmadd(load_f(xr + j * sw, n), w, acc[t]);
          }
        }
      }
    }
    for (int t = 0; t < T; ++t) acc[t].store(acc_out + t * kChunk + cb);
  }
}

// ---- epilogue: residual, activation, rounding, store ------------------------------------------

struct Epilogue {
  const void* res;  // residual at (n, 0, 0, 0), or null
  bool res_bf16;
  bool res_after_act;
  int64_t res_sn, res_sh, res_sw;
  void* out;  // out at (n, out_oh0, 0, 0)
  int64_t out_sn, out_sh, out_sw;
  int64_t out_oh0;  // the output row `out` points at: 0, or a band's first row (a band buffer)
  float act_param;
};

using EpilogueFn = void (*)(const Epilogue& e, const float* acc, int64_t n, int64_t oh, int64_t ow0, int64_t npix,
                            int64_t c0, int64_t nc);

template <Act A, typename out_t, typename res_t>
inline void epilogue_impl(const Epilogue& e, const float* acc, int64_t n, int64_t oh, int64_t ow0, int64_t npix,
                          int64_t c0, int64_t nc, const res_t* res) {
  const Vec p(e.act_param);
  out_t* out = static_cast<out_t*>(e.out) + n * e.out_sn + (oh - e.out_oh0) * e.out_sh + ow0 * e.out_sw + c0;
  if constexpr (!std::is_same_v<res_t, void>) res += n * e.res_sn + oh * e.res_sh + ow0 * e.res_sw + c0;
  const bool after = e.res_after_act;
  for (int64_t t = 0; t < npix; ++t) {
    const float* a = acc + t * kChunk;
    out_t* o = out + t * e.out_sw;
    for (int64_t cb = 0; cb < nc; cb += kVecSize) {
      const int64_t m = std::min<int64_t>(kVecSize, nc - cb);
      Vec v = Vec::loadu(a + cb);
      if constexpr (!std::is_same_v<res_t, void>) {
        const res_t* r = res + t * e.res_sw;
        if (after) {
          v = ActFn<A>::apply(v, p) + load_f(r + cb, m);
        } else {
          v = ActFn<A>::apply(v + load_f(r + cb, m), p);
        }
      } else {
        v = ActFn<A>::apply(v, p);
      }
      store_f(o + cb, v, m);
    }
  }
}

template <Act A, typename out_t>
void epilogue(const Epilogue& e, const float* acc, int64_t n, int64_t oh, int64_t ow0, int64_t npix, int64_t c0,
              int64_t nc) {
  if (!e.res) {
    epilogue_impl<A, out_t, void>(e, acc, n, oh, ow0, npix, c0, nc, static_cast<const void*>(nullptr));
  } else if (e.res_bf16) {
    epilogue_impl<A, out_t>(e, acc, n, oh, ow0, npix, c0, nc, static_cast<const BFloat16*>(e.res));
  } else {
    epilogue_impl<A, out_t>(e, acc, n, oh, ow0, npix, c0, nc, static_cast<const float*>(e.res));
  }
}

// ---- one (image, output row, channel chunk) task ------------------------------------------

using TileFn = void (*)(const Geometry&, const void*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float*);

template <typename in_t, int KW_, int S_, int D_, int T, bool Checked>
void tile_entry(const Geometry& g, const void* xn, int64_t ih0, int64_t kh_lo, int64_t kh_hi, int64_t ow0, int64_t c0,
                int64_t nc, float* acc) {
  dw_tile<in_t, KW_, S_, D_, T, Checked>(g, static_cast<const in_t*>(xn), ih0, kh_lo, kh_hi, ow0, c0, nc, acc);
}

struct Kernels {
  TileFn inner8, edge8, edge4;  // unchecked 8-pixel tiles; checked 8- and 4-pixel tiles
};

template <typename in_t, int KW_, int S_, int D_>
Kernels kernels_for() {
  return {&tile_entry<in_t, KW_, S_, D_, 8, false>, &tile_entry<in_t, KW_, S_, D_, 8, true>,
          &tile_entry<in_t, KW_, S_, D_, 4, true>};
}

template <typename in_t>
Kernels select_kernels(const Geometry& g) {
  if (g.dw == 1 && g.kw == 3 && g.sw == 1) return kernels_for<in_t, 3, 1, 1>();
  if (g.dw == 1 && g.kw == 3 && g.sw == 2) return kernels_for<in_t, 3, 2, 1>();
  if (g.dw == 1 && g.kw == 5 && g.sw == 1) return kernels_for<in_t, 5, 1, 1>();
  if (g.dw == 1 && g.kw == 5 && g.sw == 2) return kernels_for<in_t, 5, 2, 1>();
  return kernels_for<in_t, 0, 0, 0>();
}

void check_channel_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "depthwise_nhwc: ", name,
              " must have channel stride 1 (NHWC / channels_last, or a channel slice of one); got strides ",
              t.strides());
}

}  // namespace

namespace {

// What every (image, output row, channel chunk) task of one call needs: the geometry, the tile
// kernels for its shape and the epilogue for its activation and output dtype.
struct DwCall {
  Geometry g;
  Epilogue e;
  EpilogueFn epi;
  Kernels k;
  int64_t ow_lo, ow_hi, nchunks, esize;
};

// g and e hold the shapes, strides and pointers; fills in the rest. x_bf16: the input dtype.
void prepare(DwCall& d, bool x_bf16, bool out_bf16, Act act) {
  Geometry& g = d.g;
  d.epi = dispatch_act(act, [&](auto a) -> EpilogueFn {
    constexpr Act A = decltype(a)::value;
    return out_bf16 ? &epilogue<A, BFloat16> : &epilogue<A, float>;
  });
  d.k = x_bf16 ? select_kernels<BFloat16>(g) : select_kernels<float>(g);
  d.esize = x_bf16 ? 2 : 4;
  // Output columns [ow_lo, ow_hi) read no padding: ow*sw - pw >= 0 and the last tap < W.
  d.ow_lo = std::min(g.OW, (g.pw + g.sw - 1) / g.sw);
  const int64_t last = g.W - 1 + g.pw - (g.kw - 1) * g.dw;
  d.ow_hi = last < 0 ? d.ow_lo : std::max(d.ow_lo, std::min(g.OW, last / g.sw + 1));
  d.nchunks = (g.C + kChunk - 1) / kChunk;
}

// Output row oh, channel chunk cc of image n. xn: image n's input, whose row `row0` is at xn (rows
// outside [0, g.H) are zero padding; the rows the output row reads must lie in what xn holds).
inline void dw_row(const DwCall& d, const char* xn, int64_t row0, int64_t n, int64_t oh, int64_t cc, float* acc) {
  const Geometry& g = d.g;
  const int64_t c0 = cc * kChunk, nc = std::min(kChunk, g.C - c0);
  const int64_t ih0 = oh * g.sh - g.ph;
  // Kernel rows that land inside the input (the others multiply zero padding).
  int64_t kh_lo = 0, kh_hi = g.kh;
  while (kh_lo < g.kh && ih0 + kh_lo * g.dh < 0) ++kh_lo;
  while (kh_hi > kh_lo && ih0 + (kh_hi - 1) * g.dh >= g.H) --kh_hi;
  // Tiles of 8 pixels; a tile reaching into the padding or past the row end is checked (a last
  // one of 1-4 pixels is a 4-pixel tile), its extra pixels are not stored.
  for (int64_t ow = 0; ow < g.OW; ow += kTile) {
    const int64_t npix = std::min<int64_t>(kTile, g.OW - ow);
    TileFn tile;
    if (npix <= 4) {
      tile = d.k.edge4;
    } else if (npix == kTile && ow >= d.ow_lo && ow + kTile <= d.ow_hi) {
      tile = d.k.inner8;
    } else {
      tile = d.k.edge8;
    }
    tile(g, xn, ih0 - row0, kh_lo, kh_hi, ow, c0, nc, acc);
    d.epi(d.e, acc, n, oh, ow, npix, c0, nc);
  }
}

// The fields both entry points fill alike: shape, kernel, output, no residual. x's strides, the taps,
// the bias and a residual are the caller's.
void set_conv(DwCall& d, int64_t C, int64_t H, int64_t W, at::Tensor& out, int64_t kh, int64_t kw,
              const IntVec& stride, const IntVec& padding, const IntVec& dilation, double act_param) {
  Geometry& g = d.g;
  g.C = C, g.H = H, g.W = W, g.OH = out.size(2), g.OW = out.size(3);
  g.kh = kh, g.kw = kw, g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1];
  g.dh = dilation[0], g.dw = dilation[1];
  Epilogue& e = d.e;
  e.res = nullptr;
  e.res_bf16 = false;
  e.res_after_act = true;
  e.res_sn = e.res_sh = e.res_sw = 0;
  e.out = out.data_ptr();
  e.out_sn = out.stride(0), e.out_sh = out.stride(2), e.out_sw = out.stride(3);
  e.out_oh0 = 0;
  e.act_param = static_cast<float>(act_param);
}

}  // namespace

void depthwise_nhwc(const at::Tensor& x, const at::Tensor& taps, const OptTensor& bias, const OptTensor& residual,
                    bool residual_after_act, at::Tensor& out, int64_t kh, int64_t kw, IntVec stride, IntVec padding,
                    IntVec dilation, Act act, double act_param) {
  TORCH_CHECK(x.dim() == 4, "depthwise_nhwc: x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(out.dim() == 4, "depthwise_nhwc: out must be [N, C, OH, OW], got ", out.sizes());
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "depthwise_nhwc: CPU tensors only");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16, "depthwise_nhwc: x must be float32 or bfloat16, got ", st);
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16,
              "depthwise_nhwc: out must be float32 or bfloat16, got ", out.scalar_type());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "depthwise_nhwc: stride, padding and dilation must have 2 values each");
  TORCH_CHECK(kh >= 1 && kw >= 1 && stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "depthwise_nhwc: invalid kernel ", kh, "x", kw, ", stride ", stride, ", padding ", padding,
              " or dilation ", dilation);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t OW = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(OH >= 1 && OW >= 1, "depthwise_nhwc: input ", x.sizes(), " is smaller than the dilated kernel");
  TORCH_CHECK(out.sizes() == at::IntArrayRef({N, C, OH, OW}), "depthwise_nhwc: out must be [", N, ", ", C, ", ",
              OH, ", ", OW, "], got ", out.sizes());
  check_channel_stride(x, "x");
  check_channel_stride(out, "out");
  TORCH_CHECK(taps.scalar_type() == at::kFloat && taps.dim() == 2 && taps.size(0) == kh * kw &&
                  taps.size(1) == C && (C <= 1 || taps.stride(1) == 1),
              "depthwise_nhwc: taps must be float32 [kh*kw, C] = [", kh * kw, ", ", C,
              "] with unit channel stride, got ", taps.scalar_type(), " ", taps.sizes());
  at::Tensor bias_t;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == C,
                "depthwise_nhwc: bias must be float32 with ", C, " values");
    bias_t = bias->reshape({C}).contiguous();
  } else {
    bias_t = at::zeros({C}, x.options().dtype(at::kFloat));
  }
  at::Tensor res_t;
  if (residual && residual->defined()) {
    res_t = *residual;
    TORCH_CHECK(res_t.sizes() == out.sizes(), "depthwise_nhwc: residual must have out's shape ", out.sizes(),
                ", got ", res_t.sizes());
    TORCH_CHECK(res_t.scalar_type() == at::kFloat || res_t.scalar_type() == at::kBFloat16,
                "depthwise_nhwc: residual must be float32 or bfloat16, got ", res_t.scalar_type());
    check_channel_stride(res_t, "residual");
    at::assert_no_partial_overlap(out, res_t);
  }
  if (N == 0 || C == 0) return;
  at::assert_no_overlap(out, x);

  DwCall d;
  set_conv(d, C, H, W, out, kh, kw, stride, padding, dilation, act_param);
  Geometry& g = d.g;
  g.x_sn = x.stride(0), g.x_sh = x.stride(2), g.x_sw = x.stride(3);
  g.taps = taps.data_ptr<float>();
  g.tap_stride = taps.stride(0);
  g.bias = bias_t.data_ptr<float>();
  if (res_t.defined()) {
    Epilogue& e = d.e;
    e.res = res_t.data_ptr();
    e.res_bf16 = res_t.scalar_type() == at::kBFloat16;
    e.res_after_act = residual_after_act;
    e.res_sn = res_t.stride(0), e.res_sh = res_t.stride(2), e.res_sw = res_t.stride(3);
  }
  prepare(d, st == at::kBFloat16, out.scalar_type() == at::kBFloat16, act);

  const char* xbase = static_cast<const char*>(x.data_ptr());
  const int64_t nchunks = d.nchunks;
  const int64_t tasks = N * OH * nchunks;
  const int64_t work_per_task = OW * std::min(C, kChunk) * kh * kw;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, work_per_task));

  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kTile * kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t cc = task % nchunks;
      const int64_t oh = (task / nchunks) % OH;
      const int64_t n = task / (nchunks * OH);
      dw_row(d, xbase + n * g.x_sn * d.esize, 0, n, oh, cc, acc);
    }
  });
}

void depthwise_rows_f32(const float* xb, int64_t row0, int64_t H, int64_t W, int64_t C, int64_t x_sh,
                        const float* taps, const float* bias, at::Tensor& out, int64_t n, int64_t oh0, int64_t oh1,
                        int64_t kh, int64_t kw, const IntVec& stride, const IntVec& padding, const IntVec& dilation,
                        Act act, double act_param) {
  DwCall d;
  set_conv(d, C, H, W, out, kh, kw, stride, padding, dilation, act_param);
  Geometry& g = d.g;
  g.x_sn = 0, g.x_sh = x_sh, g.x_sw = C;
  g.taps = taps;
  g.tap_stride = C;
  g.bias = bias;
  prepare(d, false, out.scalar_type() == at::kBFloat16, act);
  alignas(64) float acc[kTile * kChunk];
  for (int64_t oh = oh0; oh < oh1; ++oh)
    for (int64_t cc = 0; cc < d.nchunks; ++cc) dw_row(d, reinterpret_cast<const char*>(xb), row0, n, oh, cc, acc);
}

void depthwise_rows_into_f32(const float* xn, int64_t H, int64_t W, int64_t C, int64_t x_sh, int64_t x_sw,
                             const float* taps, const float* bias, float* buf, int64_t OH, int64_t OW, int64_t oh0,
                             int64_t oh1, int64_t kh, int64_t kw, const IntVec& stride, const IntVec& padding,
                             const IntVec& dilation, Act act, double act_param) {
  DwCall d;
  Geometry& g = d.g;
  g.C = C, g.H = H, g.W = W, g.OH = OH, g.OW = OW;
  g.kh = kh, g.kw = kw, g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1];
  g.dh = dilation[0], g.dw = dilation[1];
  g.x_sn = 0, g.x_sh = x_sh, g.x_sw = x_sw;
  g.taps = taps;
  g.tap_stride = C;
  g.bias = bias;
  Epilogue& e = d.e;
  e.res = nullptr;
  e.res_bf16 = false;
  e.res_after_act = true;
  e.res_sn = e.res_sh = e.res_sw = 0;
  e.out = buf;
  e.out_sn = 0, e.out_sh = OW * C, e.out_sw = C;
  e.out_oh0 = oh0;
  e.act_param = static_cast<float>(act_param);
  prepare(d, false, false, act);
  alignas(64) float acc[kTile * kChunk];
  for (int64_t oh = oh0; oh < oh1; ++oh)
    for (int64_t cc = 0; cc < d.nchunks; ++cc) dw_row(d, reinterpret_cast<const char*>(xn), 0, 0, oh, cc, acc);
}

}  // namespace effops_native
