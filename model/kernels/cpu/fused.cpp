// The per-token work between the CPU's matmuls, one op each instead of a handful of torch ops: the residual
// add with its RMSNorm, and SwiGLU's product. Why: a decode step of SmolLM2 is ~30 layers of such glue, and
// each torch op costs a few microseconds of dispatch whatever its size. Each row is computed alone, in one
// fixed order, so a token's result does not depend on the other rows of its step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "simd.h"

namespace {

template <typename T>
float sum_of_squares(const T* x, int64_t n) {
  int64_t d = 0;
  float total = 0.f;
#if KVSERVE_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= n; d += 16) {
    const __m512 v = load16(x + d);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; d < n; ++d) total += static_cast<float>(x[d]) * static_cast<float>(x[d]);
  return total;
}

// sum = x + delta (x itself when delta is undefined), normed = RMSNorm(sum) * weight.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& input, const std::optional<at::Tensor>& delta,
                                                const at::Tensor& weight, double eps) {
  const at::Tensor x = input.contiguous();
  TORCH_CHECK(x.dim() == 2 && weight.numel() == x.size(1), "x (rows, width), weight (width)");
  TORCH_CHECK(!delta || (delta->sizes() == x.sizes() && delta->scalar_type() == x.scalar_type()),
              "delta must be shaped and typed like x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  const at::Tensor sum = delta ? at::empty_like(x) : x;
  const at::Tensor d = delta ? delta->contiguous() : x;
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor normed = at::empty_like(x);
  const int64_t rows = x.size(0), n = x.size(1);
  dispatch_float_or_bf16(x.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* s = sum.data_ptr<T>() + r * n;
        if (delta) {
          const T *a = x.data_ptr<T>() + r * n, *b = d.data_ptr<T>() + r * n;
          for (int64_t i = 0; i < n; ++i) s[i] = static_cast<T>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
        }
        const float inv = 1.f / std::sqrt(sum_of_squares(s, n) / float(n) + float(eps));
        T* out = normed.data_ptr<T>() + r * n;
        const float* wp = w.data_ptr<float>();
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<float>(s[i]) * inv * wp[i]);
      }
    });
  });
  return {sum, normed};
}

// h (rows, 2F) = [gate | up] -> silu(gate) * up (rows, F).
at::Tensor silu_mul(const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.size(1) % 2 == 0, "h must be a contiguous (rows, 2F)");
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16, "h: float32 or bfloat16");
  const int64_t rows = h.size(0), f = h.size(1) / 2;
  at::Tensor out = at::empty({rows, f}, h.options());
  dispatch_float_or_bf16(h.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T *gate = h.data_ptr<T>() + r * 2 * f, *up = gate + f;
        T* o = out.data_ptr<T>() + r * f;
        int64_t i = 0;
#if KVSERVE_AVX512
        alignas(64) float lanes[16];
        for (; i + 16 <= f; i += 16) {
          const __m512 g = load16(gate + i);
          const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
          const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
          _mm512_store_ps(lanes, _mm512_mul_ps(silu, load16(up + i)));
          for (int l = 0; l < 16; ++l) o[i + l] = static_cast<T>(lanes[l]);
        }
#endif
        for (; i < f; ++i) {
          const float g = static_cast<float>(gate[i]);
          o[i] = static_cast<T>(g / (1.f + std::exp(-g)) * static_cast<float>(up[i]));
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvserve, m) {
  m.def("add_rms_norm(Tensor x, Tensor? delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.impl("add_rms_norm", c10::DispatchKey::CPU, TORCH_FN(add_rms_norm));
  m.def("silu_mul(Tensor h) -> Tensor");
  m.impl("silu_mul", c10::DispatchKey::CPU, TORCH_FN(silu_mul));
}
