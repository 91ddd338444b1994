// What the CPU kernels share: the AVX-512 switch, loads that widen 16-bit floats, and activation quantization.
// The extension is compiled for the machine it runs on (-march=native, keyed by the CPU's flags in
// model/kernels/native.py), so one build takes exactly one of the two paths below for every call.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define KVSERVE_AVX512 1
#else
#define KVSERVE_AVX512 0
#endif

namespace {

// f(float{}) or f(c10::BFloat16{}): the two activation dtypes the kernels take (callers check which).
template <typename F>
inline void dispatch_float_or_bf16(c10::ScalarType type, F&& f) {
  if (type == c10::ScalarType::Float) f(float{});
  else f(c10::BFloat16{});
}

// f(float{}), f(c10::BFloat16{}) or f(c10::Half{}): the KV cache dtypes (callers check which).
template <typename F>
inline void dispatch_kv(c10::ScalarType type, F&& f) {
  if (type == c10::ScalarType::Half) f(c10::Half{});
  else dispatch_float_or_bf16(type, f);
}

// x rounded to T. float16 saturates at its largest finite value: a cached key beyond it (none of the models
// seen comes near) is then off by its excess instead of an inf that turns its scores NaN.
template <typename T>
inline T narrow_to(float x) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    constexpr float kMax = 65504.f;
    return static_cast<T>(std::clamp(x, -kMax, kMax));  // NaN passes through: it compares false
  } else {
    return static_cast<T>(x);
  }
}

inline int32_t load_i32(const int16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

#if KVSERVE_AVX512
// e^x for a vector: 2^(x log2 e) as 2^n * 2^f, f in [-0.5, 0.5], a degree-6 polynomial for 2^f.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#endif

// 32 values -> 16-bit codes with one scale (max |x| / 32767, round to nearest even) and scale * sum(codes).
template <typename T>
inline void quantize_group(const T* x, int16_t* codes, float* scale, float* sum) {
  constexpr float kMax = 32767.f;
#if KVSERVE_AVX512
  const __m512 a = load16(x), b = load16(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const float d = amax / kMax;
  const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
  const __m512i ca = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));
  const __m512i cb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), _mm512_cvtsepi32_epi16(ca));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 16), _mm512_cvtsepi32_epi16(cb));
  *scale = d;
  *sum = d * float(_mm512_reduce_add_epi32(_mm512_add_epi32(ca, cb)));
#else
  float v[32], amax = 0.f;
  for (int i = 0; i < 32; ++i) {
    v[i] = static_cast<float>(x[i]);
    amax = std::max(amax, std::fabs(v[i]));
  }
  const float d = amax / kMax;
  const float inv = d > 0.f ? 1.f / d : 0.f;
  int32_t total = 0;
  for (int i = 0; i < 32; ++i) {
    const int32_t c = std::min<int32_t>(32767, std::max<int32_t>(-32767, int32_t(std::nearbyint(v[i] * inv))));
    codes[i] = int16_t(c);
    total += c;
  }
  *scale = d;
  *sum = d * float(total);
#endif
}

}  // namespace
