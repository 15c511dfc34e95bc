// Activations of effops/activations.py for the native CPU kernels, scalar (float) and
// at::vec::Vectorized<float>, plus the fp32/bf16 vector load/store helpers the kernels share.
//
// Each activation is a specialisation of ActFn<Act>; kernels pick one once per call with
// dispatch_act (a template argument, so the inner loops carry no switch) or act_array_fn (a
// function pointer applying it in place to a float array, for code that stages results).
#pragma once

// at::vec only uses AVX2/AVX-512 code when CPU_CAPABILITY_* is defined, which ATen's own build
// does per kernel file and an extension build does not: without it Vectorized<float> is a plain
// array and exp/erf/tanh become scalar calls. The build compiles with -march=native, so select
// the matching implementation here. A private namespace name keeps these inline functions from
// being merged with libtorch's own copies compiled for other targets.
#if !defined(CPU_CAPABILITY) && !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2)
#if defined(VECTOR_WIDTH)
#warning "activation.h included after ATen/cpu/vec: the vector code falls back to the generic (slow) version"
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY effops_avx512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY effops_avx2
#define CPU_CAPABILITY_AVX2
#endif
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "native.h"

namespace effops_native {

using Vec = at::vec::Vectorized<float>;
constexpr int kVecSize = Vec::size();

// ---- activations ---------------------------------------------------------------------------

template <Act A>
struct ActFn;

template <>
struct ActFn<Act::Identity> {
  static inline float apply(float x, float) { return x; }
  static inline Vec apply(const Vec& x, const Vec&) { return x; }
};

template <>
struct ActFn<Act::Relu> {
  // clamp_min keeps NaN (as F.relu does).
  static inline float apply(float x, float) { return std::isnan(x) ? x : (x > 0.f ? x : 0.f); }
  static inline Vec apply(const Vec& x, const Vec&) { return at::vec::clamp_min(x, Vec(0.f)); }
};

template <>
struct ActFn<Act::Relu6> {
  static inline float apply(float x, float) { return std::isnan(x) ? x : std::min(std::max(x, 0.f), 6.f); }
  static inline Vec apply(const Vec& x, const Vec&) { return at::vec::clamp(x, Vec(0.f), Vec(6.f)); }
};

template <>
struct ActFn<Act::LeakyRelu> {
  // act_param is the negative slope.
  static inline float apply(float x, float p) { return x > 0.f ? x : x * p; }
  static inline Vec apply(const Vec& x, const Vec& p) { return Vec::blendv(x * p, x, x > Vec(0.f)); }
};

template <>
struct ActFn<Act::Hardswish> {
  // x * relu6(x + 3) / 6
  static inline float apply(float x, float) { return x * std::min(std::max(x + 3.f, 0.f), 6.f) / 6.f; }
  static inline Vec apply(const Vec& x, const Vec&) {
    return x * at::vec::clamp(x + Vec(3.f), Vec(0.f), Vec(6.f)) * Vec(1.f / 6.f);
  }
};

template <>
struct ActFn<Act::Hardsigmoid> {
  // relu6(x + 3) / 6
  static inline float apply(float x, float) { return std::min(std::max(x + 3.f, 0.f), 6.f) / 6.f; }
  static inline Vec apply(const Vec& x, const Vec&) {
    return at::vec::clamp(x + Vec(3.f), Vec(0.f), Vec(6.f)) * Vec(1.f / 6.f);
  }
};

template <>
struct ActFn<Act::Silu> {
  static inline float apply(float x, float) { return x / (1.f + std::exp(-x)); }
  static inline Vec apply(const Vec& x, const Vec&) { return x / (Vec(1.f) + x.neg().exp()); }
};

template <>
struct ActFn<Act::Sigmoid> {
  static inline float apply(float x, float) { return 1.f / (1.f + std::exp(-x)); }
  static inline Vec apply(const Vec& x, const Vec&) { return Vec(1.f) / (Vec(1.f) + x.neg().exp()); }
};

template <>
struct ActFn<Act::Gelu> {
  // erf-based: x * (1 + erf(x / sqrt 2)) / 2
  static inline float apply(float x, float) { return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f)); }
  static inline Vec apply(const Vec& x, const Vec&) {
    return Vec(0.5f) * x * (Vec(1.f) + (x * Vec(0.70710678118654752f)).erf());
  }
};

template <>
struct ActFn<Act::GeluTanh> {
  // x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) / 2
  static inline float apply(float x, float) {
    const float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.f + std::tanh(inner));
  }
  static inline Vec apply(const Vec& x, const Vec&) {
    const Vec inner = Vec(0.79788456080286536f) * (x + Vec(0.044715f) * x * x * x);
    return Vec(0.5f) * x * (Vec(1.f) + inner.tanh());
  }
};

// Calls f(std::integral_constant<Act, A>{}) for the runtime `act`: the one switch of a kernel call.
template <class F>
inline decltype(auto) dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::Identity: return f(std::integral_constant<Act, Act::Identity>{});
    case Act::Relu: return f(std::integral_constant<Act, Act::Relu>{});
    case Act::Relu6: return f(std::integral_constant<Act, Act::Relu6>{});
    case Act::LeakyRelu: return f(std::integral_constant<Act, Act::LeakyRelu>{});
    case Act::Hardswish: return f(std::integral_constant<Act, Act::Hardswish>{});
    case Act::Hardsigmoid: return f(std::integral_constant<Act, Act::Hardsigmoid>{});
    case Act::Silu: return f(std::integral_constant<Act, Act::Silu>{});
    case Act::Sigmoid: return f(std::integral_constant<Act, Act::Sigmoid>{});
    case Act::Gelu: return f(std::integral_constant<Act, Act::Gelu>{});
    case Act::GeluTanh: return f(std::integral_constant<Act, Act::GeluTanh>{});
  }
  TORCH_CHECK(false, "effops_native: invalid activation id ", static_cast<int64_t>(act));
}

// One activation applied to a value (a switch per call: for setup code, not inner loops).
inline float act_scalar(Act act, float x, float p) {
  return dispatch_act(act, [&](auto a) { return ActFn<decltype(a)::value>::apply(x, p); });
}

// ---- fp32 / bf16 vector loads and stores ---------------------------------------------------
// load_f(p, n) reads n <= kVecSize elements as floats (the lanes past n are zero); store_f(p, v, n)
// writes the first n lanes, rounding to bf16 (nearest even) for BFloat16 destinations. With
// AVX-512 both are one masked instruction, so kernels call them for full and tail vectors alike.

#if defined(CPU_CAPABILITY_AVX512)
inline __mmask16 lane_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}
inline Vec load_f(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(lane_mask(n), p); }
inline Vec load_f(const c10::BFloat16* p, int64_t n) {
  const __m256i h = _mm256_maskz_loadu_epi16(lane_mask(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store_f(float* p, const Vec& v, int64_t n) { _mm512_mask_storeu_ps(p, lane_mask(n), v); }
inline void store_f(c10::BFloat16* p, const Vec& v, int64_t n) {
  _mm256_mask_storeu_epi16(p, lane_mask(n), at::vec::cvtfp32_bf16(__m512(v)));
}
#else
inline Vec load_f(const float* p, int64_t n) { return n >= kVecSize ? Vec::loadu(p) : Vec::loadu(p, n); }
inline Vec load_f(const c10::BFloat16* p, int64_t n) {
  __at_align__ float buf[kVecSize] = {};
  for (int64_t i = 0; i < n && i < kVecSize; ++i) buf[i] = static_cast<float>(p[i]);
  return Vec::loadu(buf);
}
inline void store_f(float* p, const Vec& v, int64_t n) {
  if (n >= kVecSize) v.store(p);
  else v.store(p, n);
}
inline void store_f(c10::BFloat16* p, const Vec& v, int64_t n) {
  __at_align__ float buf[kVecSize];
  v.store(buf);
  for (int64_t i = 0; i < n && i < kVecSize; ++i) p[i] = c10::BFloat16(buf[i]);
}
#endif

// ---- activation over a float array, chosen once --------------------------------------------

using ActArrayFn = void (*)(float* data, int64_t n, float param);

template <Act A>
void act_array(float* data, int64_t n, float param) {
  if constexpr (A == Act::Identity) return;
  const Vec p(param);
  int64_t i = 0;
  for (; i + kVecSize <= n; i += kVecSize) ActFn<A>::apply(Vec::loadu(data + i), p).store(data + i);
  if (i < n) store_f(data + i, ActFn<A>::apply(load_f(data + i, n - i), p), n - i);
}

// In-place activation of a float array, selected once (e.g. per call of a staging kernel).
inline ActArrayFn act_array_fn(Act act) {
  return dispatch_act(act, [](auto a) -> ActArrayFn { return &act_array<decltype(a)::value>; });
}

}  // namespace effops_native
