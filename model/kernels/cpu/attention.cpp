// Attention over the paged KV cache on the CPU, one query token at a time, for prefill and decode alike.
//
// Why one kernel for both: a token's attention output is then the same float computation (its own keys,
// in blocks of 32 keys aligned to absolute positions, an online softmax over those blocks) whether the
// token is decoded alone, batched with others, or part of a prefill chunk of any length, and whether its
// prefix was computed in this step or read from the prefix cache (DESIGN.md, decision 5).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

constexpr int64_t kKeysPerBlock = 32;
constexpr int64_t kMaxHeadDim = 256;

struct Cache {
  int64_t n_kv, hd, block_size, table_width;
  const int64_t* tables;
};

// One query token's `group` heads that share KV head `kv`, over keys [lo, pos], in blocks of 32 keys aligned
// to absolute positions; an online softmax updated once a block. Two builds of the same recipe: AVX-512
// for head sizes that are multiples of 16, plain C++ otherwise (one per model, so one per token).
struct Task {
  const Cache& c;
  int64_t seq, pos, lo, kv, group;
  float scale;
  float softcap;  // > 0: scores become softcap * tanh(score / softcap) (Gemma 2); 0: none
  std::vector<int64_t> rows;  // rows[key - lo]: where key's K/V for head kv start, in elements

  void find_rows() {  // the table walked once (a division per key would cost more than its dot products)
    const int64_t* table = c.tables + seq * c.table_width;
    rows.resize(pos + 1 - lo);
    int64_t block = lo / c.block_size, offset = lo % c.block_size;
    for (int64_t& row : rows) {
      row = ((table[block] * c.block_size + offset) * c.n_kv + kv) * c.hd;
      if (++offset == c.block_size) offset = 0, ++block;
    }
  }
  int64_t row(int64_t key) const { return rows[key - lo]; }
};

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

// Lane l of the result: q . K[start + l] * scale (soft-capped if the task says so) for keys in [first, last),
// -inf elsewhere.
template <int NV, typename KV>
inline __m512 scores16(const __m512* q, const KV* k_cache, const Task& t, int64_t start, int64_t first,
                       int64_t last) {
  __m512 dots[16];
  for (int l = 0; l < 16; ++l) {
    const int64_t key = start + l;
    dots[l] = _mm512_setzero_ps();
    if (key < first || key >= last) continue;
    const KV* k = k_cache + t.row(key);
    __m512 acc = _mm512_mul_ps(q[0], load16(k));
    for (int v = 1; v < NV; ++v) acc = _mm512_fmadd_ps(q[v], load16(k + 16 * v), acc);
    dots[l] = acc;
  }
  const int64_t lo = std::clamp<int64_t>(first - start, 0, 16), hi = std::clamp<int64_t>(last - start, 0, 16);
  const __mmask16 valid = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
  __m512 scaled = _mm512_mul_ps(reduce16(dots), _mm512_set1_ps(t.scale));
  if (t.softcap > 0.f) scaled = softcap16(scaled, t.softcap);
  return _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid, scaled);
}

template <int NV, typename Q, typename KV>
void attend_avx512(const Q* q, const KV* k_cache, const KV* v_cache, const Task& t, Q* out) {
  constexpr int64_t hd = 16 * NV;
  const __m512 none = _mm512_set1_ps(-std::numeric_limits<float>::infinity());  // a key outside the range
  for (int64_t i = 0; i < t.group; ++i) {
    __m512 qv[NV], acc[NV];
    for (int v = 0; v < NV; ++v) qv[v] = load16(q + i * hd + 16 * v), acc[v] = _mm512_setzero_ps();
    float running_max = -std::numeric_limits<float>::infinity(), total = 0.f;
    alignas(64) float p[kKeysPerBlock];
    for (int64_t start = t.lo / kKeysPerBlock * kKeysPerBlock; start <= t.pos; start += kKeysPerBlock) {
      const int64_t first = std::max(start, t.lo), last = std::min(start + kKeysPerBlock, t.pos + 1);
      const __m512 s0 = scores16<NV>(qv, k_cache, t, start, first, last);
      const __m512 s1 = scores16<NV>(qv, k_cache, t, start + 16, first, last);
      const float new_max = std::max(running_max, _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
      const float alpha = std::exp(running_max - new_max);  // 0 for the first block (-inf - finite)
      const __m512 m = _mm512_set1_ps(new_max);
      const __m512 e0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s0, none, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(s0, m)));
      const __m512 e1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s1, none, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(s1, m)));
      _mm512_store_ps(p, e0);
      _mm512_store_ps(p + 16, e1);
      total = total * alpha + _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
      running_max = new_max;
      const __m512 a = _mm512_set1_ps(alpha);
      for (int v = 0; v < NV; ++v) acc[v] = _mm512_mul_ps(acc[v], a);
      for (int64_t key = first; key < last; ++key) {
        const KV* value = v_cache + t.row(key);
        const __m512 w = _mm512_set1_ps(p[key - start]);
        for (int v = 0; v < NV; ++v) acc[v] = _mm512_fmadd_ps(w, load16(value + 16 * v), acc[v]);
      }
    }
    alignas(64) float row[hd];
    const __m512 inv = _mm512_set1_ps(1.f / total);
    for (int v = 0; v < NV; ++v) _mm512_store_ps(row + 16 * v, _mm512_mul_ps(acc[v], inv));
    for (int64_t d = 0; d < hd; ++d) out[i * hd + d] = static_cast<Q>(row[d]);
  }
}
#endif

template <typename Q, typename KV>
void attend_generic(const Q* q, const KV* k_cache, const KV* v_cache, const Task& t, Q* out) {
  const int64_t hd = t.c.hd;
  std::vector<float> qf(hd), acc(hd), p(kKeysPerBlock);
  for (int64_t i = 0; i < t.group; ++i) {
    for (int64_t d = 0; d < hd; ++d) qf[d] = static_cast<float>(q[i * hd + d]), acc[d] = 0.f;
    float running_max = -std::numeric_limits<float>::infinity(), total = 0.f;
    for (int64_t start = t.lo / kKeysPerBlock * kKeysPerBlock; start <= t.pos; start += kKeysPerBlock) {
      const int64_t first = std::max(start, t.lo), last = std::min(start + kKeysPerBlock, t.pos + 1);
      float block_max = -std::numeric_limits<float>::infinity();
      for (int64_t key = first; key < last; ++key) {
        const KV* k = k_cache + t.row(key);
        float dot = 0.f;
        for (int64_t d = 0; d < hd; ++d) dot = std::fma(qf[d], static_cast<float>(k[d]), dot);
        p[key - first] = dot * t.scale;
        if (t.softcap > 0.f) p[key - first] = t.softcap * (1.f - 2.f / (std::exp(2.f * p[key - first] / t.softcap) + 1.f));
        block_max = std::max(block_max, p[key - first]);
      }
      const float new_max = std::max(running_max, block_max), alpha = std::exp(running_max - new_max);
      float block_total = 0.f;
      for (int64_t j = 0; j < last - first; ++j) block_total += (p[j] = std::exp(p[j] - new_max));
      total = total * alpha + block_total;
      running_max = new_max;
      for (int64_t d = 0; d < hd; ++d) acc[d] *= alpha;
      for (int64_t key = first; key < last; ++key) {
        const KV* v = v_cache + t.row(key);
        for (int64_t d = 0; d < hd; ++d) acc[d] = std::fma(p[key - first], static_cast<float>(v[d]), acc[d]);
      }
    }
    for (int64_t d = 0; d < hd; ++d) out[i * hd + d] = static_cast<Q>(acc[d] / total);
  }
}

template <typename Q, typename KV>
void attend_token(const Q* q, const KV* k_cache, const KV* v_cache, const Task& t, Q* out) {
#if KVSERVE_AVX512
  switch (t.c.hd) {
    case 64: return attend_avx512<4>(q, k_cache, v_cache, t, out);
    case 96: return attend_avx512<6>(q, k_cache, v_cache, t, out);
    case 128: return attend_avx512<8>(q, k_cache, v_cache, t, out);
    case 256: return attend_avx512<16>(q, k_cache, v_cache, t, out);
  }
#endif
  attend_generic(q, k_cache, v_cache, t, out);
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& token_seq,
                           const at::Tensor& token_pos, int64_t block_size, double scale, int64_t window,
                           double softcap) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "q (T, heads, hd) and the caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches must have one dtype");
  for (const at::Tensor* t : {&q, &k_cache}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16,
                "q and the KV cache must be float32 or bfloat16");
  }
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && token_seq.scalar_type() == at::kLong &&
              token_pos.scalar_type() == at::kLong && block_tables.is_contiguous(), "indices must be int64");
  const int64_t T = q.size(0), heads = q.size(1), hd = q.size(2), n_kv = k_cache.size(1);
  TORCH_CHECK(heads % n_kv == 0 && k_cache.size(2) == hd && hd <= kMaxHeadDim, "bad head layout");
  const Cache c{n_kv, hd, block_size, block_tables.size(1), block_tables.data_ptr<int64_t>()};
  const int64_t group = heads / n_kv;
  at::Tensor out = at::empty_like(q);
  const int64_t* seqs = token_seq.data_ptr<int64_t>();
  const int64_t* positions = token_pos.data_ptr<int64_t>();
  dispatch_float_or_bf16(q.scalar_type(), [&](auto q_zero) {
    dispatch_float_or_bf16(k_cache.scalar_type(), [&](auto kv_zero) {
      using Q = decltype(q_zero);
      using KV = decltype(kv_zero);
      const Q* qp = q.data_ptr<Q>();
      Q* op = out.data_ptr<Q>();
      at::parallel_for(0, T * n_kv, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          // Tokens in the order first, last, second, second to last...: a causal prefill's long and short
          // rows alternate, so each thread's contiguous share of tasks holds the same work.
          const int64_t i = task / n_kv, t = i % 2 ? T - 1 - i / 2 : i / 2;
          const int64_t kv = task % n_kv, pos = positions[t];
          const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
          const int64_t at = (t * heads + kv * group) * hd;
          Task work{c, seqs[t], pos, lo, kv, group, float(scale), float(softcap), {}};
          work.find_rows();
          attend_token(qp + at, k_cache.data_ptr<KV>(), v_cache.data_ptr<KV>(), work, op + at);
        }
      });
    });
  });
  return out;
}

// out = x rotated by RoPE in the half-split layout (x * cos + rotate_half(x) * sin); a copy without cos.
template <typename In, typename Out, typename C>
inline void rotate(const In* x, const C* cos, const C* sin, int64_t hd, Out* out) {
  const int64_t half = hd / 2;
  for (int64_t d = 0; d < hd; ++d) {
    float v = static_cast<float>(x[d]);
    if (cos) {
      const float other = d < half ? -static_cast<float>(x[d + half]) : static_cast<float>(x[d - half]);
      v = v * static_cast<float>(cos[d]) + other * static_cast<float>(sin[d]);
    }
    out[d] = static_cast<Out>(v);
  }
}

// The fused QKV projection's output (T, (heads + 2 kv_heads) * hd) -> attention output (T, heads, hd): q and
// k rotated (cos and sin (T, hd) in qkv's dtype; empty for a model without RoPE), k and v written to the
// caches at slot_mapping, then every token attended as paged_attention does.
at::Tensor rotary_paged_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                  const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                  const at::Tensor& token_seq, const at::Tensor& token_pos, int64_t block_size,
                                  double scale, int64_t window, int64_t heads, double softcap) {
  const int64_t T = qkv.size(0), n_kv = k_cache.size(1), hd = k_cache.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (heads + 2 * n_kv) * hd,
              "qkv must be a contiguous (T, (heads + 2 kv_heads) * head_dim)");
  const bool rope = cos.numel() > 0;
  TORCH_CHECK(!rope || (cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * hd &&
                        sin.numel() == T * hd && cos.scalar_type() == qkv.scalar_type() &&
                        sin.scalar_type() == qkv.scalar_type()), "cos/sin: (T, head_dim) in qkv's dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == T, "slot_mapping: (T,) int64");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16, "cache dtype");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16, "qkv: float32 or bfloat16");
  at::Tensor q = at::empty({T, heads, hd}, qkv.options());
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  dispatch_float_or_bf16(qkv.scalar_type(), [&](auto q_zero) {
    dispatch_float_or_bf16(k_cache.scalar_type(), [&](auto kv_zero) {
      using Q = decltype(q_zero);
      using KV = decltype(kv_zero);
      at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const Q* row = qkv.data_ptr<Q>() + t * qkv.size(1);
          const Q* c = rope ? cos.data_ptr<Q>() + t * hd : nullptr;
          const Q* s = rope ? sin.data_ptr<Q>() + t * hd : nullptr;
          for (int64_t h = 0; h < heads; ++h) rotate(row + h * hd, c, s, hd, q.data_ptr<Q>() + (t * heads + h) * hd);
          for (int64_t j = 0; j < n_kv; ++j) {
            const int64_t at = (slots[t] * n_kv + j) * hd;
            rotate(row + (heads + j) * hd, c, s, hd, k_cache.data_ptr<KV>() + at);
            rotate<Q, KV, Q>(row + (heads + n_kv + j) * hd, nullptr, nullptr, hd, v_cache.data_ptr<KV>() + at);
          }
        }
      });
    });
  });
  return paged_attention(q, k_cache, v_cache, block_tables, token_seq, token_pos, block_size, scale, window, softcap);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvserve, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor token_seq, "
        "Tensor token_pos, int block_size, float scale, int window, float softcap=0.) -> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CPU, TORCH_FN(paged_attention));
  m.def("rotary_paged_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, Tensor block_tables, Tensor token_seq, Tensor token_pos, int block_size, "
        "float scale, int window, int heads, float softcap=0.) -> Tensor");
  m.impl("rotary_paged_attention", c10::DispatchKey::CPU, TORCH_FN(rotary_paged_attention));
}
