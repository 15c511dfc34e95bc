// Channel shuffle in one pass: output channel j*groups + i = input channel i*(C/groups) + j.
// Elements are moved as bytes of their size, so every dtype shares the same few loops.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "activation.h"

namespace effops_native {
namespace {

template <int ES>
struct Elem {
  unsigned char b[ES];
};

// fn(std::integral_constant<int, ES>{}) for an element size es of 1, 2, 4, 8 or 16 bytes.
template <typename F>
void by_element_size(int64_t es, const char* what, F&& fn) {
  switch (es) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 16: fn(std::integral_constant<int, 16>{}); break;
    default: TORCH_CHECK(false, what, ": unsupported element size ", es);
  }
}

// out[2j] = a[j], out[2j + 1] = b[j] for j < n: one pixel's channel vectors (channel stride 1).
template <int ES>
inline void interleave_pixel(const Elem<ES>* a, const Elem<ES>* b, Elem<ES>* out, int64_t n) {
  int64_t j0 = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if (ES == 4) {
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (; j0 + 16 <= n; j0 += 16) {
      const __m512i va = _mm512_loadu_si512(a + j0), vb = _mm512_loadu_si512(b + j0);
      _mm512_storeu_si512(out + 2 * j0, _mm512_permutex2var_epi32(va, lo, vb));
      _mm512_storeu_si512(out + 2 * j0 + 16, _mm512_permutex2var_epi32(va, hi, vb));
    }
  } else if (ES == 2) {
    alignas(64) int16_t lo_idx[32], hi_idx[32];
    for (int k = 0; k < 16; ++k) {
      lo_idx[2 * k] = k, lo_idx[2 * k + 1] = 32 + k;
      hi_idx[2 * k] = 16 + k, hi_idx[2 * k + 1] = 48 + k;
    }
    const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
    for (; j0 + 32 <= n; j0 += 32) {
      const __m512i va = _mm512_loadu_si512(a + j0), vb = _mm512_loadu_si512(b + j0);
      _mm512_storeu_si512(out + 2 * j0, _mm512_permutex2var_epi16(va, lo, vb));
      _mm512_storeu_si512(out + 2 * j0 + 32, _mm512_permutex2var_epi16(va, hi, vb));
    }
  }
#endif
  for (int64_t j = j0; j < n; ++j) {
    out[2 * j] = a[j];
    out[2 * j + 1] = b[j];
  }
}

// One pixel's channel vector (channel stride 1 on both sides): a [groups, cpg] -> [cpg, groups]
// transpose. groups == 2 (ShuffleNetV2) is an interleave of the two halves.
template <int ES>
inline void shuffle_pixel(const Elem<ES>* in, Elem<ES>* out, int64_t groups, int64_t cpg) {
  if (groups == 2) return interleave_pixel<ES>(in, in + cpg, out, cpg);
  for (int64_t i = 0; i < groups; ++i) {
    const Elem<ES>* src = in + i * cpg;
    for (int64_t j = 0; j < cpg; ++j) out[j * groups + i] = src[j];
  }
}

template <int ES>
void shuffle_nhwc(const at::Tensor& x, at::Tensor& out, int64_t groups) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), cpg = C / groups;
  const auto* xp = static_cast<const Elem<ES>*>(x.data_ptr());
  auto* op = static_cast<Elem<ES>*>(out.data_ptr());
  const int64_t xs0 = x.stride(0), xs2 = x.stride(2), xs3 = x.stride(3);
  const int64_t os0 = out.stride(0), os2 = out.stride(2), os3 = out.stride(3);
  at::parallel_for(0, N * H, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, W * C * ES)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / H, h = t % H;
      const Elem<ES>* src = xp + n * xs0 + h * xs2;
      Elem<ES>* dst = op + n * os0 + h * os2;
      for (int64_t w = 0; w < W; ++w) shuffle_pixel<ES>(src + w * xs3, dst + w * os3, groups, cpg);
    }
  });
}

// Any strides: one output channel plane at a time (a plain copy of the source plane).
template <int ES>
void shuffle_strided(const at::Tensor& x, at::Tensor& out, int64_t groups) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), cpg = C / groups;
  const auto* xp = static_cast<const Elem<ES>*>(x.data_ptr());
  auto* op = static_cast<Elem<ES>*>(out.data_ptr());
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2), xs3 = x.stride(3);
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2), os3 = out.stride(3);
  at::parallel_for(0, N * C * H, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, W * ES)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / (C * H), oc = (t / H) % C, h = t % H;
      const int64_t j = oc / groups, i = oc % groups, ic = i * cpg + j;
      const Elem<ES>* src = xp + n * xs0 + ic * xs1 + h * xs2;
      Elem<ES>* dst = op + n * os0 + oc * os1 + h * os2;
      if (xs3 == 1 && os3 == 1) {
        std::memcpy(dst, src, static_cast<size_t>(W) * ES);
      } else {
        for (int64_t w = 0; w < W; ++w) dst[w * os3] = src[w * xs3];
      }
    }
  });
}

}  // namespace

at::Tensor channel_shuffle(const at::Tensor& x, int64_t groups, const OptTensor& out) {
  EFFOPS_PROFILE_RANGE("effops::channel_shuffle");
  TORCH_CHECK(x.dim() == 4, "channel_shuffle: x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "channel_shuffle: CPU tensors only");
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(groups >= 1 && C % groups == 0, "channel_shuffle: ", C,
                    " channels are not divisible into ", groups, " groups");
  at::Tensor y;
  if (out && out->defined()) {
    y = *out;
    TORCH_CHECK(y.sizes() == x.sizes(), "channel_shuffle: out must have x's shape ", x.sizes(), ", got ",
                y.sizes());
    TORCH_CHECK(y.scalar_type() == x.scalar_type(), "channel_shuffle: out must have x's dtype ", x.scalar_type(),
                ", got ", y.scalar_type());
    TORCH_CHECK(y.device().is_cpu(), "channel_shuffle: CPU tensors only");
    at::assert_no_internal_overlap(y);
    at::assert_no_overlap(y, x);  // a permutation cannot be done in place in one pass
  } else {
    y = at::empty(x.sizes(), x.options().memory_format(x.suggest_memory_format()));
  }
  if (x.numel() == 0) return y;
  const bool nhwc = (C <= 1 || (x.stride(1) == 1 && y.stride(1) == 1));
  const int64_t es = x.element_size();
  auto run = [&](auto tag) {
    constexpr int ES = decltype(tag)::value;
    (nhwc ? shuffle_nhwc<ES> : shuffle_strided<ES>)(x, y, groups);
  };
  by_element_size(es, "channel_shuffle", run);
  return y;
}

// out[:, 0::2] = a, out[:, 1::2] = b: a g = 2 channel shuffle of cat(a, b) without the concat (the
// ShuffleNetV2 unit's two halves). Channel-minor a, b and out (NHWC or channel views of one) take
// the vectorised pixel loop; other strides two strided copies.
void interleave_channels(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  EFFOPS_PROFILE_RANGE("effops::interleave");
  TORCH_CHECK_VALUE(a.dim() == 4 && b.dim() == 4 && out.dim() == 4, "interleave: expected 4-D a, b and out, got ",
                    a.dim(), "-D, ", b.dim(), "-D and ", out.dim(), "-D");
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), "interleave: a and b must have one shape, got ", a.sizes(), " and ",
                    b.sizes());
  TORCH_CHECK_VALUE(out.size(0) == a.size(0) && out.size(1) == 2 * a.size(1) && out.size(2) == a.size(2) &&
                        out.size(3) == a.size(3),
                    "interleave: out must be ", a.size(0), "x", 2 * a.size(1), "x", a.size(2), "x", a.size(3),
                    " for halves of shape ", a.sizes(), ", got ", out.sizes());
  TORCH_CHECK_VALUE(a.scalar_type() == out.scalar_type() && b.scalar_type() == out.scalar_type(),
                    "interleave: a, b and out must share one dtype, got ", a.scalar_type(), ", ", b.scalar_type(),
                    " and ", out.scalar_type());
  TORCH_CHECK_VALUE(a.device().is_cpu() && b.device().is_cpu() && out.device().is_cpu(),
                    "interleave: CPU tensors only");
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, a);
  at::assert_no_overlap(out, b);
  if (out.numel() == 0) return;
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3);
  if (!(a.stride(1) == 1 && b.stride(1) == 1 && out.stride(1) == 1) || C == 1) {
    out.unflatten(1, {C, 2}).select(2, 0).copy_(a);
    out.unflatten(1, {C, 2}).select(2, 1).copy_(b);
    return;
  }
  const int64_t es = a.element_size();
  auto run = [&](auto tag) {
    constexpr int ES = decltype(tag)::value;
    const auto* ap = static_cast<const Elem<ES>*>(a.data_ptr());
    const auto* bp = static_cast<const Elem<ES>*>(b.data_ptr());
    auto* op = static_cast<Elem<ES>*>(out.data_ptr());
    at::parallel_for(0, N * H, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, W * C * ES)),
                     [&](int64_t s, int64_t e) {
                       for (int64_t t = s; t < e; ++t) {
                         const int64_t n = t / H, h = t % H;
                         const Elem<ES>* ar = ap + n * a.stride(0) + h * a.stride(2);
                         const Elem<ES>* br = bp + n * b.stride(0) + h * b.stride(2);
                         Elem<ES>* orow = op + n * out.stride(0) + h * out.stride(2);
                         for (int64_t w = 0; w < W; ++w)
                           interleave_pixel<ES>(ar + w * a.stride(3), br + w * b.stride(3), orow + w * out.stride(3),
                                                C);
                       }
                     });
  };
  by_element_size(es, "interleave", run);
}

}  // namespace effops_native
