// The AVX-512 build of attention.cpp's recipe for head sizes that are multiples of 16: one block of 32 keys
// at a time, an online softmax per token and head, the block's rows widened to float32 once per run.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention_task.h"
#include "simd.h"

namespace {

#if KVSERVE_AVX512
// r[i] = the sum of a[i]'s 16 lanes, by one fixed tree for every i (pairs within 128-bit lanes, then across).
inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int k = 0; k < 8; ++k) {
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  }
  for (int k = 0; k < 4; ++k) {
    c[k] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0xEE));
  }
  for (int k = 0; k < 2; ++k) {
    d[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

// cap * tanh(x / cap), tanh(y) as 1 - 2 / (exp(2y) + 1): exact at both ends (exp overflowing to inf gives 1),
// and its absolute error near 0 is cap times float's epsilon, what a softmax input can tell apart.
inline __m512 softcap16(__m512 x, float cap) {
  const __m512 e = exp16(_mm512_mul_ps(x, _mm512_set1_ps(2.f / cap)));
  const __m512 th = _mm512_sub_ps(_mm512_set1_ps(1.f),
                                    _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, _mm512_set1_ps(1.f))));
  return _mm512_mul_ps(th, _mm512_set1_ps(cap));
}

// A block's K and V rows as float32, copied from the cache once for the run and then read by every token and
// head of it: widening a 16-bit cache's values once instead of once per token and head, and reading rows that
// lie side by side in L1 instead of looking each up in the block table, made a prefill ~5% faster and a
// 16-row decode step ~6% (float32 and float16 caches alike). Copying and widening are exact: the bits are
// those of reading the cache.
template <int NV>
struct WidenedRows {
  static constexpr int64_t hd = 16 * NV;
  float *k_rows, *v_rows;  // kKeysPerBlock rows each, 64-byte aligned
  int64_t start;
  const float* k(int64_t key) const { return k_rows + (key - start) * hd; }
  const float* v(int64_t key) const { return v_rows + (key - start) * hd; }

  template <typename KV>
  void widen(const KV* k_cache, const KV* v_cache, const Task& t, int64_t first, int64_t last) {
    for (int64_t key = first; key < last; ++key) {
      const KV *k = k_cache + t.row(key), *v = v_cache + t.row(key);
      for (int i = 0; i < NV; ++i) {
        _mm512_store_ps(k_rows + (key - start) * hd + 16 * i, load16(k + 16 * i));
        _mm512_store_ps(v_rows + (key - start) * hd + 16 * i, load16(v + 16 * i));
      }
    }
  }
};

// Lane l of the result: q . K[start + l] * scale (soft-capped if the task says so) for keys in [first, last),
// -inf elsewhere.
template <int NV>
inline __m512 scores16(const __m512* q, const WidenedRows<NV>& rows, const Task& t, int64_t start, int64_t first,
                       int64_t last) {
  __m512 dots[16];
  const auto dot = [&](int64_t key) {
    const float* k = rows.k(key);
    __m512 acc = _mm512_mul_ps(q[0], load16(k));
    for (int v = 1; v < NV; ++v) acc = _mm512_fmadd_ps(q[v], load16(k + 16 * v), acc);
    return acc;
  };
  if (first <= start && start + 16 <= last) {  // every key in range (most of a prefill's): no tests
    for (int l = 0; l < 16; ++l) dots[l] = dot(start + l);
  } else {
    for (int l = 0; l < 16; ++l) {
      const int64_t key = start + l;
      dots[l] = key < first || key >= last ? _mm512_setzero_ps() : dot(key);
    }
  }
  const int64_t lo = std::clamp<int64_t>(first - start, 0, 16), hi = std::clamp<int64_t>(last - start, 0, 16);
  const __mmask16 valid = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
  __m512 scaled = _mm512_mul_ps(reduce16(dots), _mm512_set1_ps(t.scale));
  if (t.softcap > 0.f) scaled = softcap16(scaled, t.softcap);
  return _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid, scaled);
}

// The online softmax of one token's head between blocks: running max, total, and the weighted sum of values.
struct HeadState {
  float running_max, total;
  float* acc;  // hd floats
};

// One block of keys [first, last) (it starts at `start`) for one head of one token.
template <int NV, typename Q>
inline void block_avx512(const Q* q, const WidenedRows<NV>& rows, const Task& t, int64_t start, int64_t first,
                         int64_t last, HeadState& st) {
  const __m512 none = _mm512_set1_ps(-std::numeric_limits<float>::infinity());  // a key outside the range
  __m512 qv[NV], acc[NV];
  for (int v = 0; v < NV; ++v) qv[v] = load16(q + 16 * v);
  const __m512 s0 = scores16<NV>(qv, rows, t, start, first, last);
  const __m512 s1 = scores16<NV>(qv, rows, t, start + 16, first, last);
  const float new_max = std::max(st.running_max, _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
  const float alpha = std::exp(st.running_max - new_max);  // 0 for the first block (-inf - finite)
  const __m512 m = _mm512_set1_ps(new_max);
  const __m512 e0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s0, none, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(s0, m)));
  const __m512 e1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s1, none, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(s1, m)));
  alignas(64) float p[kKeysPerBlock];
  _mm512_store_ps(p, e0);
  _mm512_store_ps(p + 16, e1);
  st.total = st.total * alpha + _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
  st.running_max = new_max;
  const __m512 a = _mm512_set1_ps(alpha);
  for (int v = 0; v < NV; ++v) acc[v] = _mm512_mul_ps(_mm512_load_ps(st.acc + 16 * v), a);
  for (int64_t key = first; key < last; ++key) {
    const float* value = rows.v(key);
    const __m512 w = _mm512_set1_ps(p[key - start]);
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_fmadd_ps(w, load16(value + 16 * v), acc[v]);
  }
  for (int v = 0; v < NV; ++v) _mm512_store_ps(st.acc + 16 * v, acc[v]);
}

// The run: block by block, each token whose keys the block holds, head by head (a token's heads walked
// together, sharing each V row's loads, measured slower: their sums spill out of the vector registers).
// q and out at the run's first token, its heads for t.kv; a token's heads lie `stride` elements after the
// previous token's.
template <int NV, typename Q, typename KV>
void attend_avx512(const Q* q, const KV* k_cache, const KV* v_cache, const Task& t, int64_t stride, Q* out) {
  constexpr int64_t hd = 16 * NV;
  const int64_t n = t.tokens * t.group;
  // The run's sums and states, then room for a block's widened K and V rows; kept by the thread run to run.
  thread_local std::vector<float> storage;
  thread_local std::vector<HeadState> state;
  storage.resize((n + 2 * kKeysPerBlock) * hd + 16);
  state.resize(n);
  float* acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
  std::fill(acc, acc + n * hd, 0.f);
  for (int64_t i = 0; i < n; ++i) state[i] = {-std::numeric_limits<float>::infinity(), 0.f, acc + i * hd};
  WidenedRows<NV> widened{acc + n * hd, acc + (n + kKeysPerBlock) * hd, 0};
  for (int64_t start = t.span(0).first_block(); start <= t.pos; start += kKeysPerBlock) {
    widened.start = start;  // the block's keys that any token of the run reads
    widened.widen(k_cache, v_cache, t, std::max(start, t.lo), std::min(start + kKeysPerBlock, t.pos + 1));
    for (int64_t j = 0; j < t.tokens; ++j) {
      const Span span = t.span(j);
      if (start < span.first_block() || start > span.pos) continue;
      const int64_t first = std::max(start, span.lo), last = std::min(start + kKeysPerBlock, span.pos + 1);
      const Q* qj = q + j * stride;
      for (int64_t h = 0; h < t.group; ++h) {
        block_avx512<NV>(qj + h * hd, widened, t, start, first, last, state[j * t.group + h]);
      }
    }
  }
  for (int64_t j = 0; j < t.tokens; ++j) {
    for (int64_t h = 0; h < t.group; ++h) {
      const HeadState& st = state[j * t.group + h];
      alignas(64) float row[hd];
      const __m512 inv = _mm512_set1_ps(1.f / st.total);
      for (int v = 0; v < NV; ++v) _mm512_store_ps(row + 16 * v, _mm512_mul_ps(_mm512_load_ps(st.acc + 16 * v), inv));
      for (int64_t d = 0; d < hd; ++d) out[j * stride + h * hd + d] = static_cast<Q>(row[d]);
    }
  }
}
#endif

}  // namespace
