// Max pooling on NHWC rows, without the indices ATen's CPU max_pool2d always computes (an int64
// tensor twice the output's size, written and dropped in inference).
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "activation.h"
#include "native.h"

namespace effops_native {
namespace {

// PyTorch's pooling_output_shape (dilation 1): floor, or ceil without a window that starts in the
// right / bottom padding.
int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, bool ceil_mode) {
  const int64_t num = in + 2 * p - (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

// Channels [c0, c0 + kChunk) of one output pixel: the max over the window's valid input pixels
// (the others are padding, which never wins). NaN propagates, as in PyTorch.
constexpr int kPoolVecs = 4;
constexpr int64_t kPoolChunk = kPoolVecs * kVecSize;

template <typename T>
inline void pool_pixel(const T* x, int64_t x_sh, int64_t x_sw, int64_t kh0, int64_t kh1, int64_t kw0, int64_t kw1,
                       int64_t c0, int64_t C, T* out) {
  const int64_t nc = std::min(kPoolChunk, C - c0);
  Vec acc[kPoolVecs];
  for (int j = 0; j < kPoolVecs; ++j) acc[j] = Vec(-std::numeric_limits<float>::infinity());
  const bool whole = nc == kPoolChunk && std::is_same_v<T, float>;
  for (int64_t i = kh0; i < kh1; ++i)
    for (int64_t k = kw0; k < kw1; ++k) {
      const T* p = x + i * x_sh + k * x_sw + c0;
      for (int j = 0; j < kPoolVecs; ++j) {
        const int64_t n = nc - j * kVecSize;
        if (n <= 0) break;
        Vec v;
        if constexpr (std::is_same_v<T, float>) {
          v = whole || n >= kVecSize ? Vec::loadu(p + j * kVecSize) : load_f(p + j * kVecSize, n);
        } else {
          v = load_f(p + j * kVecSize, std::min<int64_t>(n, kVecSize));
        }
        acc[j] = at::vec::maximum(acc[j], v);
      }
    }
  for (int j = 0; j < kPoolVecs; ++j) {
    const int64_t n = nc - j * kVecSize;
    if (n <= 0) break;
    store_f(out + c0 + j * kVecSize, acc[j], std::min<int64_t>(n, kVecSize));
  }
}

template <typename T>
void max_pool_rows(const at::Tensor& x, at::Tensor& out, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                   int64_t pw) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = out.size(2), OW = out.size(3);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t x_sn = x.stride(0), x_sh = x.stride(2), x_sw = x.stride(3);
  const int64_t o_sn = out.stride(0), o_sh = out.stride(2), o_sw = out.stride(3);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, OW * C * kh * kw));
  at::parallel_for(0, N * OH, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      const int64_t ih0 = oh * sh - ph;
      const int64_t kh0 = std::max<int64_t>(0, -ih0), kh1 = std::min(kh, H - ih0);
      const T* xr = xp + n * x_sn + ih0 * x_sh;
      T* orow = op + n * o_sn + oh * o_sh;
      for (int64_t ow = 0; ow < OW; ++ow) {
        const int64_t iw0 = ow * sw - pw;
        const int64_t kw0 = std::max<int64_t>(0, -iw0), kw1 = std::min(kw, W - iw0);
        for (int64_t c0 = 0; c0 < C; c0 += kPoolChunk)
          pool_pixel<T>(xr + iw0 * x_sw, x_sh, x_sw, kh0, kh1, kw0, kw1, c0, C, orow + ow * o_sw);
      }
    }
  });
}

}  // namespace

at::Tensor max_pool_nhwc(const at::Tensor& x, IntVec kernel, IntVec stride, IntVec padding, bool ceil_mode) {
  EFFOPS_PROFILE_RANGE("effops::max_pool");
  const char* what = "effops native max_pool: ";
  TORCH_CHECK_VALUE(x.dim() == 4 && x.device().is_cpu(), what, "expected a 4-D CPU tensor, got ", x.dim(), "-D on ",
                    x.device());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what,
                    "expected float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) <= 1 || x.stride(1) == 1, what,
                    "expected channel stride 1 (NHWC, or a channel slice of it), got strides ", x.strides());
  TORCH_CHECK_VALUE(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, what,
                    "kernel, stride and padding need 2 values each");
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1];
  TORCH_CHECK_VALUE(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && ph >= 0 && pw >= 0 && 2 * ph <= kh && 2 * pw <= kw,
                    what, "invalid kernel ", kernel, ", stride ", stride, " or padding ", padding,
                    " (padding at most half the kernel)");
  const int64_t OH = pooled_size(x.size(2), kh, sh, ph, ceil_mode), OW = pooled_size(x.size(3), kw, sw, pw, ceil_mode);
  TORCH_CHECK_VALUE(OH >= 1 && OW >= 1, what, "input ", x.sizes(), " is smaller than the kernel ", kernel);
  at::Tensor out = at::empty({x.size(0), x.size(1), OH, OW}, x.options(), at::MemoryFormat::ChannelsLast);
  if (out.numel() == 0) return out;
  if (x.scalar_type() == at::kFloat)
    max_pool_rows<float>(x, out, kh, kw, sh, sw, ph, pw);
  else
    max_pool_rows<c10::BFloat16>(x, out, kh, kw, sh, sw, ph, pw);
  return out;
}

}  // namespace effops_native
