// Direct convolution for float32 convs with at most 4 input channels, NHWC: the stem conv of every
// image model (3 -> 16..64 channels, 3x3 or 7x7, stride 2, at 224²).
//
// oneDNN's blocked kernels vectorise over input channels, of which there are 3 (0.1-0.3 TFLOP/s
// on the 2-core AVX-512 benchmark machine: benchmarks/test_native_kernels.py -k direct_stem).
// Here every output pixel is a sum of kh * kw * C_in taps, each an input
// value broadcast against a vector of output channels: a tile of R output pixels x NV vectors of
// output channels lives in R * NV accumulator registers, each tap loads NV weight vectors (from
// L1: the whole packed weight is kh * kw * C_in * C_out floats, 7 KB for a 3x3 stem to 64
// channels) and broadcasts R input values. The folded BN bias starts the accumulators and the
// activation is applied before the one store of each output vector.
//
// Padding: the taps of an output row that fall above or below the image are skipped for the
// whole row; the few output columns whose taps cross the left or right edge (one or two per row)
// run a one-pixel tile that checks every tap.
//
// conv.cpp runs this kernel where it is measured faster than oneDNN for the problem
// (set_direct_policy(0) turns it off); tests/test_native.py checks it against float64.
#include "activation.h"
#include "native.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace effops_native {
namespace {

constexpr int64_t kMaxDirectCin = 4;
constexpr int kDirectVecs = kVecSize >= 16 ? 4 : 2;  // vectors of output channels per column block
constexpr int kDirectAcc = kVecSize >= 16 ? 24 : 12; // accumulators per tile

struct DirectConv {
  const float* x;  // image n's pixel (0, 0)
  int64_t H, W, C, sh, sw;  // input rows / pixels sh / sw floats apart, channel stride 1
  const float* w;  // [kh * kw * C taps + 1 bias row][Cpad]
  int64_t Cpad, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  float* y;        // image n's output pixel (0, 0); pixels y_sw apart, rows y_sh apart
  int64_t y_sh, y_sw;
  Vec param;
};

// Output pixels [ow0, ow0 + R) of row oh, columns [n0, n0 + NV vectors) (cnt: the last vector's
// valid lanes). kh0..kh1: the row's taps inside the image. Edge: check each tap's column.
template <int R, int NV, Act A, bool Edge>
inline __attribute__((always_inline)) void direct_tile(const DirectConv& d, int64_t oh, int64_t ow0, int64_t kh0,
                                                       int64_t kh1, int64_t n0, int64_t cnt) {
  Vec acc[R][NV];
  const float* bias = d.w + d.kh * d.kw * d.C * d.Cpad + n0;
  for (int j = 0; j < NV; ++j) {
    const Vec b = Vec::loadu(bias + j * kVecSize);  // padded rows: whole vectors
    for (int r = 0; r < R; ++r) acc[r][j] = b;
  }
  const int64_t iw0 = ow0 * d.stride_w - d.pad_w;
  for (int64_t i = kh0; i < kh1; ++i) {
    const float* xrow = d.x + (oh * d.stride_h - d.pad_h + i * d.dil_h) * d.sh;
    for (int64_t k = 0; k < d.kw; ++k) {
      const int64_t iw = iw0 + k * d.dil_w;
      if (Edge && (iw < 0 || iw >= d.W)) continue;  // Edge tiles are one pixel wide
      const float* xp = xrow + iw * d.sw;
      const float* wp = d.w + ((i * d.kw + k) * d.C) * d.Cpad + n0;
      for (int64_t c = 0; c < d.C; ++c, wp += d.Cpad) {
        Vec wv[NV];
        for (int j = 0; j < NV; ++j) wv[j] = Vec::loadu(wp + j * kVecSize);
        for (int r = 0; r < R; ++r) {
          const Vec a(xp[r * d.stride_w * d.sw + c]);
          for (int j = 0; j < NV; ++j) acc[r][j] = at::vec::fmadd(a, wv[j], acc[r][j]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* yp = d.y + oh * d.y_sh + (ow0 + r) * d.y_sw + n0;
    for (int j = 0; j < NV; ++j) {
      const Vec v = ActFn<A>::apply(acc[r][j], d.param);
      if (j < NV - 1 || cnt == kVecSize)
        v.store(yp + j * kVecSize);
      else
        store_f(yp + j * kVecSize, v, cnt);
    }
  }
}

// One output row, one column block of NV vectors.
template <int NV, Act A>
void direct_row(const DirectConv& d, int64_t oh, int64_t OW, int64_t n0, int64_t cnt) {
  constexpr int R = kDirectAcc / NV;
  // taps inside the image for this row
  int64_t kh0 = 0, kh1 = d.kh;
  const int64_t ih0 = oh * d.stride_h - d.pad_h;
  while (kh0 < kh1 && ih0 + kh0 * d.dil_h < 0) ++kh0;
  while (kh1 > kh0 && ih0 + (kh1 - 1) * d.dil_h >= d.H) --kh1;
  // columns whose taps all lie inside the image: [lo, hi)
  const int64_t lo = std::min(OW, (d.pad_w + d.stride_w - 1) / d.stride_w);
  const int64_t last = d.W - 1 - (d.kw - 1) * d.dil_w + d.pad_w;  // largest ow * stride inside
  const int64_t hi = std::max(lo, std::min(OW, last < 0 ? int64_t(0) : last / d.stride_w + 1));
  for (int64_t ow = 0; ow < lo; ++ow) direct_tile<1, NV, A, true>(d, oh, ow, kh0, kh1, n0, cnt);
  int64_t ow = lo;
  for (; ow + R <= hi; ow += R) direct_tile<R, NV, A, false>(d, oh, ow, kh0, kh1, n0, cnt);
  if constexpr (R > 4)
    for (; ow + 4 <= hi; ow += 4) direct_tile<4, NV, A, false>(d, oh, ow, kh0, kh1, n0, cnt);
  for (; ow < hi; ++ow) direct_tile<1, NV, A, false>(d, oh, ow, kh0, kh1, n0, cnt);
  for (ow = hi; ow < OW; ++ow) direct_tile<1, NV, A, true>(d, oh, ow, kh0, kh1, n0, cnt);
}

}  // namespace

bool direct_applies(const at::Tensor& x, const at::Tensor& weight, int64_t groups) {
  return groups == 1 && x.scalar_type() == at::kFloat && x.dim() == 4 && weight.dim() == 4 && x.size(1) >= 1 &&
         x.size(1) <= kMaxDirectCin && x.stride(1) == 1;
}

at::Tensor direct_weight(const at::Tensor& w32, const at::Tensor& bias) {
  const int64_t K = w32.size(0), C = w32.size(1), kh = w32.size(2), kw = w32.size(3);
  const int64_t Cpad = (K + kVecSize - 1) / kVecSize * kVecSize;
  at::Tensor packed = at::zeros({kh * kw * C + 1, Cpad}, w32.options().dtype(at::kFloat));
  // [K, C, kh, kw] -> [kh, kw, C, K]: tap-major rows of output channels
  packed.narrow(0, 0, kh * kw * C).narrow(1, 0, K).copy_(w32.permute({2, 3, 1, 0}).reshape({kh * kw * C, K}));
  packed.select(0, kh * kw * C).narrow(0, 0, K).copy_(bias);
  return packed;
}

void direct_nhwc(const at::Tensor& x, const at::Tensor& packed, int64_t K, int64_t kh, int64_t kw, const IntVec& stride,
                 const IntVec& padding, const IntVec& dilation, at::Tensor& out, Act act, double act_param) {
  const int64_t N = x.size(0), OH = out.size(2), OW = out.size(3);
  TORCH_INTERNAL_ASSERT(x.stride(1) == 1 && out.stride(1) == 1 && out.size(1) == K, "effops direct conv: layouts");
  DirectConv d{x.data_ptr<float>(), x.size(2), x.size(3), x.size(1), x.stride(2), x.stride(3),
               packed.data_ptr<float>(), packed.size(1), kh, kw, stride[0], stride[1], padding[0], padding[1],
               dilation[0], dilation[1], out.data_ptr<float>(), out.stride(2), out.stride(3),
               Vec(static_cast<float>(act_param))};
  const int64_t blocks = (K + kDirectVecs * kVecSize - 1) / (kDirectVecs * kVecSize);
  const float* x0 = d.x;
  float* y0 = d.y;
  const int64_t x_sn = x.stride(0), y_sn = out.stride(0);
  dispatch_act(act, [&](auto tag) {
    constexpr Act A = decltype(tag)::value;
    at::parallel_for(0, N * OH, 1, [&](int64_t t0, int64_t t1) {
      DirectConv di = d;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / OH, oh = t % OH;
        di.x = x0 + n * x_sn;
        di.y = y0 + n * y_sn;
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t n0 = b * kDirectVecs * kVecSize, rem = K - n0;
          const int64_t nv = std::min<int64_t>(kDirectVecs, (rem + kVecSize - 1) / kVecSize);
          const int64_t cnt = std::min<int64_t>(kVecSize, rem - (nv - 1) * kVecSize);  // the last vector's lanes
          switch (nv) {
            case 1: direct_row<1, A>(di, oh, OW, n0, cnt); break;
            case 2: direct_row<2, A>(di, oh, OW, n0, cnt); break;
            case 3: direct_row<kDirectVecs >= 3 ? 3 : 2, A>(di, oh, OW, n0, cnt); break;
            default: direct_row<kDirectVecs, A>(di, oh, OW, n0, cnt); break;
          }
        }
      }
    });
  });
}

}  // namespace effops_native
