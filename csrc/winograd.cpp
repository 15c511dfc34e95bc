// Winograd F(4x4, 3x3) for 3x3 stride-1 float32 convs on channel-minor (NHWC) tensors, dense or
// grouped (RegNet's group convs: each group's GEMMs read and write its own channel range).
//
// A 3x3 conv computes each 4x4 output tile from a 6x6 input patch. Winograd's minimal filtering
// (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) writes it as
//     Y = A^T [ (G g G^T) (.) (B^T d B) ] A
// per input/output channel pair, with an elementwise product (.) of 6x6 matrices. Summed over
// input channels, the 36 elementwise products become 36 GEMMs [tiles x C] @ [C x K]: 36 products
// per tile and channel pair instead of 16 * 9 = 144, i.e. 4x fewer multiplies than a direct conv,
// the transforms (additions and small constant multiples) aside.
//
// The three passes per chunk of tiles:
//   1. input transform  x (NHWC, zero padding) -> V [tiles][36][C]     (at::vec over channels)
//   2. 36 GEMMs          V[:, e] @ U[e] -> M [tiles][36][K]             (batched_gemm below; per group)
//   3. output transform  M -> A^T M A + bias, activation, residual -> out (NHWC, any channel view)
// U = G g G^T is computed once per weight (in float64, then rounded), packed in 32-column
// panels (batched_gemm) and cached with the BN-folded weight by conv.cpp.
//
// Numerics: the transforms amplify float32 rounding. On random data the relative error against
// a float64 conv is about 2e-6 (a direct float32 conv: about 2e-7), inside the project's 1e-5
// rule; tests/test_native.py checks it. conv.cpp runs this kernel only where it is measured
// faster than oneDNN for the problem, and set_winograd_policy(0) turns it off.
#include "activation.h"
#include "native.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace effops_native {
namespace {

constexpr int64_t kTile = 4;     // output tile
constexpr int64_t kPatch = 6;    // input patch = kTile + 3 - 1
constexpr int64_t kElems = 36;   // kPatch * kPatch

// B^T d for one 6-vector (rows of d): B^T =
//   [4  0 -5  0  1  0]
//   [0 -4 -4  1  1  0]
//   [0  4 -4 -1  1  0]
//   [0 -2 -1  2  1  0]
//   [0  2 -1 -2  1  0]
//   [0  4  0 -5  0  1]
inline void bt6(const Vec* d, Vec* r) {
  const Vec four(4.f), five(5.f), two(2.f);
  const Vec d1_plus_d2 = d[1] + d[2], d3_plus_d4 = d[3] + d[4];
  const Vec d1_minus_d2 = d[1] - d[2], d4_minus_d3 = d[4] - d[3];
  const Vec d1_minus_d3 = d[1] - d[3], d4_minus_d2 = d[4] - d[2];
  r[0] = at::vec::fmadd(four, d[0], d[4] - five * d[2]);
  r[1] = d3_plus_d4 - four * d1_plus_d2;
  r[2] = at::vec::fmadd(four, d1_minus_d2, d4_minus_d3);
  r[3] = d4_minus_d2 - two * d1_minus_d3;
  r[4] = at::vec::fmadd(two, d1_minus_d3, d4_minus_d2);
  r[5] = at::vec::fmadd(four, d[1], d[5] - five * d[3]);
}

// A^T m for one 6-vector: A^T =
//   [1  1  1  1  1  0]
//   [0  1 -1  2 -2  0]
//   [0  1  1  4  4  0]
//   [0  1 -1  8 -8  1]
inline void at6(const Vec* m, Vec* o) {
  const Vec a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], d = m[3] - m[4];
  o[0] = m[0] + a + c;
  o[1] = at::vec::fmadd(Vec(2.f), d, b);
  o[2] = at::vec::fmadd(Vec(4.f), c, a);
  o[3] = at::vec::fmadd(Vec(8.f), d, b) + m[5];
}

// ---- the 36 GEMMs: M[e] (T x K) = V[e] (T x C) @ U[e] (C x K) ----------------------------------
// A small-M GEMM: at batch 1 a 14x14 map has 16 tiles, so each of the 36 products is 16 rows
// against a C x K weight, and the whole transformed weight (36 C K floats: 21 MB for 384
// channels) streams from memory on every call. A BLAS call packs its B operand on every call
// (one more pass over those bytes, and MKL's at::bmm ran at about 9 GB/s here); U is packed once
// instead, as kNR-column panels [36][K / kNR][C][kNR], and each panel is read once per call by a
// broadcast-FMA kernel over kMR-row blocks of V.
constexpr int64_t kNR = 2 * kVecSize;                  // output columns per panel: two vectors
constexpr int64_t kMR = kVecSize == 16 ? 8 : 4;        // rows per block: 2 * kMR accumulators

// GCC vector types: unlike at::vec::Vectorized (a class whose arrays GCC keeps in memory), an
// array of these stays in registers in the unrolled loop below. Loads through the aligned(4)
// variant are unaligned loads.
typedef float Reg __attribute__((vector_size(sizeof(float) * kVecSize)));
typedef float RegU __attribute__((vector_size(sizeof(float) * kVecSize), aligned(4)));

template <int R>
inline void gemm_block(const float* v, int64_t ldv, const float* up, int64_t C, float* m, int64_t ldm, int64_t nk) {
  Reg acc0[R], acc1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = Reg{};
  for (int64_t c = 0; c < C; ++c) {
    const Reg u0 = *reinterpret_cast<const RegU*>(up + c * kNR);
    const Reg u1 = *reinterpret_cast<const RegU*>(up + c * kNR + kVecSize);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float b = v[r * ldv + c];
      acc0[r] += b * u0;  // -ffp-contract=fast (GCC's default): one FMA each
      acc1[r] += b * u1;
    }
  }
  for (int r = 0; r < R; ++r) {
    float* row = m + r * ldm;
    if (nk == kNR) {
      *reinterpret_cast<RegU*>(row) = acc0[r];
      *reinterpret_cast<RegU*>(row + kVecSize) = acc1[r];
    } else {
      float tmp[kNR];
      *reinterpret_cast<RegU*>(tmp) = acc0[r];
      *reinterpret_cast<RegU*>(tmp + kVecSize) = acc1[r];
      std::memcpy(row, tmp, sizeof(float) * nk);
    }
  }
}

template <int R>
inline void gemm_tail(int64_t rows, const float* v, int64_t ldv, const float* up, int64_t C, float* m, int64_t ldm,
                      int64_t nk) {
  if constexpr (R > 0) {
    if (rows == R) return gemm_block<R>(v, ldv, up, C, m, ldm, nk);
    gemm_tail<R - 1>(rows, v, ldv, up, C, m, ldm, nk);
  }
}

// M[t][e][g Kg + k] = sum_c V[t][e][g Cg + c] U[e][g][c][k] for t < T and each of the G groups
// (Cg = C / G input and Kg = K / G output channels each), with U packed by winograd_weight.
void batched_gemm(const float* V, int64_t T, int64_t C, const float* Up, int64_t K, int64_t G, float* M) {
  const int64_t Cg = C / G, Kg = K / G, KP = (Kg + kNR - 1) / kNR, ldv = kElems * C, ldm = kElems * K;
  // One work item per (element, group, panel): consecutive items share V[e], which stays in the cache.
  at::parallel_for(0, kElems * G * KP, 1, [&](int64_t a, int64_t b) {
    for (int64_t w = a; w < b; ++w) {
      const int64_t e = w / (G * KP), g = (w / KP) % G, kp = w % KP;
      const float* ve = V + e * C + g * Cg;
      const float* up = Up + w * Cg * kNR;
      float* me = M + e * K + g * Kg + kp * kNR;
      const int64_t nk = std::min(kNR, Kg - kp * kNR);  // a partial panel writes its own group's columns only
      int64_t t = 0;
      for (; t + kMR <= T; t += kMR) gemm_block<kMR>(ve + t * ldv, ldv, up, Cg, me + t * ldm, ldm, nk);
      if (t < T) gemm_tail<kMR - 1>(T - t, ve + t * ldv, ldv, up, Cg, me + t * ldm, ldm, nk);
    }
  });
}

struct Geometry {
  int64_t N, C, H, W, K, OH, OW, TH, TW, pad_h, pad_w;
};

// Pass 1 for tiles [t0, t1): V[t - t0][e][c] = (B^T d B)[e] of the 6x6 patch at the tile, zero
// outside the image. Tile-major: each tile's 36 rows are one contiguous block, written (and in
// pass 3 read) as one stream rather than 36 streams a chunk apart, whose cache sets collide.
void input_transform(const float* x, const int64_t* xs, const Geometry& g, int64_t t0, int64_t t1, float* V) {
  const int64_t ldv = kElems * g.C;
  at::parallel_for(t0, t1, std::max<int64_t>(1, 512 / std::max<int64_t>(g.C, 1)), [&](int64_t a, int64_t b) {
    Vec d[kPatch], tmp[kPatch][kPatch], col[kPatch], out[kPatch];
    for (int64_t t = a; t < b; ++t) {
      const int64_t n = t / (g.TH * g.TW), rem = t % (g.TH * g.TW);
      const int64_t h0 = (rem / g.TW) * kTile - g.pad_h, w0 = (rem % g.TW) * kTile - g.pad_w;
      const float* xn = x + n * xs[0];
      bool in_h[kPatch], in_w[kPatch];
      for (int64_t i = 0; i < kPatch; ++i) {
        in_h[i] = h0 + i >= 0 && h0 + i < g.H;
        in_w[i] = w0 + i >= 0 && w0 + i < g.W;
      }
      float* vt = V + (t - t0) * ldv;
      for (int64_t c = 0; c < g.C; c += kVecSize) {
        const int64_t nc = std::min<int64_t>(kVecSize, g.C - c);
        for (int64_t i = 0; i < kPatch; ++i) {  // rows: d B (the row transform)
          for (int64_t j = 0; j < kPatch; ++j) {
            const bool in = in_h[i] && in_w[j];
            // A masked load of no lanes reads nothing: out-of-image taps are zeros.
            d[j] = load_f(in ? xn + (h0 + i) * xs[2] + (w0 + j) * xs[3] + c : xn, in ? nc : 0);
          }
          bt6(d, tmp[i]);
        }
        for (int64_t j = 0; j < kPatch; ++j) {  // columns: B^T (d B)
          for (int64_t i = 0; i < kPatch; ++i) col[i] = tmp[i][j];
          bt6(col, out);
          for (int64_t i = 0; i < kPatch; ++i) store_f(vt + (i * kPatch + j) * g.C + c, out[i], nc);
        }
      }
    }
  });
}

// Pass 3 for tiles [t0, t1): out = act(A^T M A + bias [+ residual]) [+ residual], the tile's
// pixels inside the output only.
void output_transform(const float* M, const Geometry& g, int64_t t0, int64_t t1,
                      const float* bias, const float* res, const int64_t* rs, bool residual_after_act, float* y,
                      const int64_t* ys, Act act, float act_param) {
  dispatch_act(act, [&](auto a_) {
    constexpr Act A = decltype(a_)::value;
    at::parallel_for(t0, t1, std::max<int64_t>(1, 512 / std::max<int64_t>(g.K, 1)), [&](int64_t a, int64_t b) {
      const Vec pv(act_param);
      Vec m[kPatch], tmp[kPatch][kTile], col[kPatch], o[kTile];
      for (int64_t t = a; t < b; ++t) {
        const int64_t n = t / (g.TH * g.TW), rem = t % (g.TH * g.TW);
        const int64_t oh0 = (rem / g.TW) * kTile, ow0 = (rem % g.TW) * kTile;
        const int64_t rows = std::min(kTile, g.OH - oh0), cols = std::min(kTile, g.OW - ow0);
        const float* mt = M + (t - t0) * kElems * g.K;
        for (int64_t k = 0; k < g.K; k += kVecSize) {
          const int64_t nk = std::min<int64_t>(kVecSize, g.K - k);
          const Vec bv = load_f(bias + k, nk);
          for (int64_t i = 0; i < kPatch; ++i) {  // rows: m A
            for (int64_t j = 0; j < kPatch; ++j) m[j] = load_f(mt + (i * kPatch + j) * g.K + k, nk);
            at6(m, tmp[i]);
          }
          for (int64_t j = 0; j < cols; ++j) {  // columns: A^T (m A)
            for (int64_t i = 0; i < kPatch; ++i) col[i] = tmp[i][j];
            at6(col, o);
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t oh = oh0 + i, ow = ow0 + j;
              Vec v = o[i] + bv;
              const float* rp = res ? res + n * rs[0] + oh * rs[2] + ow * rs[3] + k : nullptr;
              if (rp && !residual_after_act) v = v + load_f(rp, nk);
              v = ActFn<A>::apply(v, pv);
              if (rp && residual_after_act) v = v + load_f(rp, nk);
              store_f(y + n * ys[0] + oh * ys[2] + ow * ys[3] + k, v, nk);
            }
          }
        }
      }
    });
  });
}

}  // namespace

bool winograd_applies(const at::Tensor& x, const at::Tensor& weight, const IntVec& stride, const IntVec& dilation,
                      int64_t groups) {
  // Grouped convs need groups of at least 8 input and output channels (RegNet's are 8-112 wide):
  // narrower ones waste most of each 32-column panel, and depthwise convs have their own kernel.
  const bool group_ok = groups == 1 || (weight.size(1) >= 8 && weight.size(0) % groups == 0 &&
                                        weight.size(0) / groups >= 8);
  return weight.size(2) == 3 && weight.size(3) == 3 && stride[0] == 1 && stride[1] == 1 && dilation[0] == 1 &&
         dilation[1] == 1 && group_ok && x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.size(1) > 1;
}

at::Tensor winograd_weight(const at::Tensor& w32, int64_t groups) {
  TORCH_CHECK(w32.dim() == 4 && w32.size(2) == 3 && w32.size(3) == 3 && groups >= 1 && w32.size(0) % groups == 0,
              "winograd_weight: expected [K, C / groups, 3, 3] with K a multiple of groups");
  const double G[kPatch][3] = {{1. / 4, 0, 0},          {-1. / 6, -1. / 6, -1. / 6}, {-1. / 6, 1. / 6, -1. / 6},
                               {1. / 24, 1. / 12, 1. / 6}, {1. / 24, -1. / 12, 1. / 6}, {0, 0, 1}};
  const at::Tensor g = at::from_blob(const_cast<double*>(&G[0][0]), {kPatch, 3}, at::kDouble).clone();
  const int64_t Cg = w32.size(1), Kg = w32.size(0) / groups, KP = (Kg + kNR - 1) / kNR;
  // U[k][c] = G w[k][c] G^T (6x6) as two batched matmuls, then [36, G, Cg, Kg] with each group's
  // Kg padded to whole panels.
  at::Tensor u = at::matmul(at::matmul(g, w32.to(at::kDouble)), g.t());         // [K, Cg, 6, 6]
  u = u.reshape({groups, Kg, Cg, kElems}).permute({3, 0, 2, 1});                 // [36, G, Cg, Kg]
  u = at::constant_pad_nd(u.to(at::kFloat), {0, KP * kNR - Kg});
  return u.view({kElems, groups, Cg, KP, kNR}).permute({0, 1, 3, 2, 4}).contiguous();  // [36][G][KP][Cg][kNR]
}

void winograd_nhwc(const at::Tensor& x, const at::Tensor& U, const at::Tensor& bias, const OptTensor& residual,
                   bool residual_after_act, at::Tensor& out, const IntVec& padding, Act act, double act_param) {
  Geometry g;
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.pad_h = padding[0], g.pad_w = padding[1];
  g.OH = g.H + 2 * g.pad_h - 2, g.OW = g.W + 2 * g.pad_w - 2;
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "winograd_nhwc: expected channel-minor x and out");
  g.K = out.size(1);
  const int64_t G = U.dim() == 5 ? U.size(1) : 0;
  TORCH_CHECK(G >= 1 && U.size(0) == kElems && g.C % G == 0 && g.K % G == 0 &&
                  U.size(2) == (g.K / G + kNR - 1) / kNR && U.size(3) == g.C / G && out.size(2) == g.OH &&
                  out.size(3) == g.OW,
              "winograd_nhwc: shape mismatch");
  if (g.N == 0 || g.OH <= 0 || g.OW <= 0) return;
  g.TH = (g.OH + kTile - 1) / kTile, g.TW = (g.OW + kTile - 1) / kTile;
  const int64_t T = g.N * g.TH * g.TW;
  // Chunks of tiles keep V and M (36 rows per tile each) within a few MB, in the last-level cache.
  const int64_t chunk_max = std::max<int64_t>(64, (int64_t(6) << 20) / (kElems * 4 * (g.C + g.K)));
  const int64_t chunks = (T + chunk_max - 1) / chunk_max;
  const int64_t tc = (T + chunks - 1) / chunks;  // equal chunks: no small GEMM for a remainder
  // Reused per calling thread and kept for its life (about 6 MB; more where 64 tiles of thousands
  // of channels need it): a fresh multi-MB buffer per call costs page faults on every call.
  thread_local at::Tensor workspace;
  const int64_t need = kElems * tc * (g.C + g.K);
  if (!workspace.defined() || workspace.numel() < need) workspace = at::empty({need}, x.options().dtype(at::kFloat));
  float* vbuf = workspace.data_ptr<float>();
  float* mbuf = vbuf + kElems * tc * g.C;

  const at::Tensor res = residual.has_value() && residual->defined() ? *residual : at::Tensor();
  TORCH_CHECK(!res.defined() || (res.scalar_type() == at::kFloat && res.stride(1) == 1 && res.sizes() == out.sizes()),
              "winograd_nhwc: expected a float32 channel-minor residual of the output's shape");
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t ys[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  int64_t rs[4] = {0, 0, 0, 0};
  if (res.defined())
    for (int i = 0; i < 4; ++i) rs[i] = res.stride(i);

  for (int64_t t0 = 0; t0 < T; t0 += tc) {
    const int64_t t1 = std::min(T, t0 + tc), nt = t1 - t0;
    input_transform(x.data_ptr<float>(), xs, g, t0, t1, vbuf);
    batched_gemm(vbuf, nt, g.C, U.data_ptr<float>(), g.K, G, mbuf);
    output_transform(mbuf, g, t0, t1, bias.data_ptr<float>(), res.defined() ? res.data_ptr<float>() : nullptr, rs,
                     residual_after_act, out.data_ptr<float>(), ys, act, static_cast<float>(act_param));
  }
}

}  // namespace effops_native
