// Attention over the paged KV cache on the CPU, for prefill and decode alike: each query token by one recipe,
// in runs of up to 16 consecutive tokens of a sequence that read each block of keys once.
//
// Why one kernel for both: a token's attention output is then the same float computation (its own keys,
// in blocks of 32 keys aligned to absolute positions, an online softmax over those blocks) whether the
// token is decoded alone, batched with others, or part of a prefill chunk of any length, and whether its
// prefix was computed in this step or read from the prefix cache (DESIGN.md, decision 5).
//
// Why runs: a prefill token's keys are mostly its neighbours' keys too, and reading them is what a token
// alone waits on (one 1,500-token sequence's K and V are ~2.3 MB a layer for SmolLM2, more than L2 holds);
// a run reads each block of 32 keys into L1 once for all its tokens (widened there to float32 from a 16-bit
// cache: float32, bfloat16 and float16 caches are read). A token's own arithmetic is unchanged,
// its softmax state kept between blocks in memory (stores and loads of floats are exact), so a token gives
// the same bits in a run of 16 as decoded alone.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"
#include "simd.h"

namespace {

constexpr int64_t kKeysPerBlock = 32;
constexpr int64_t kMaxHeadDim = 256;

struct Cache {
  int64_t n_kv, hd, block_size, table_width;
  const int64_t* tables;
};

constexpr int64_t kRunTokens = 16;

// Keys [lo, pos] of one token, in blocks of 32 keys aligned to absolute positions.
struct Span {
  int64_t lo, pos;
  int64_t first_block() const { return lo / kKeysPerBlock * kKeysPerBlock; }
};

// A run of `tokens` consecutive query tokens of sequence `seq` (the last at position `pos`), their `group`
// heads that share KV head `kv`; keys [lo, pos], lo the first token's (a sliding window of `window` keys,
// if > 0, starts later for later tokens). Each token is attended by one recipe, an online softmax updated
// once a block; two builds of it: AVX-512 for head sizes that are multiples of 16, plain C++ otherwise (one
// per model, so one per token).
struct Task {
  const Cache& c;
  int64_t seq, pos, lo, kv, group, tokens, window;
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
  Span span(int64_t token) const {  // the keys of the run's token-th token
    const int64_t at = pos - (tokens - 1) + token;
    return {window > 0 ? std::max<int64_t>(0, at - window + 1) : 0, at};
  }
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

template <typename Q, typename KV>
void attend_generic(const Q* q, const KV* k_cache, const KV* v_cache, const Task& t, Span span, Q* out) {
  const int64_t hd = t.c.hd;
  std::vector<float> qf(hd), acc(hd), p(kKeysPerBlock);
  for (int64_t i = 0; i < t.group; ++i) {
    for (int64_t d = 0; d < hd; ++d) qf[d] = static_cast<float>(q[i * hd + d]), acc[d] = 0.f;
    float running_max = -std::numeric_limits<float>::infinity(), total = 0.f;
    for (int64_t start = span.first_block(); start <= span.pos; start += kKeysPerBlock) {
      const int64_t first = std::max(start, span.lo), last = std::min(start + kKeysPerBlock, span.pos + 1);
      float block_max = -std::numeric_limits<float>::infinity();
      for (int64_t key = first; key < last; ++key) {
        const KV* k = k_cache + t.row(key);
        float dot = 0.f;
        for (int64_t d = 0; d < hd; ++d) dot = std::fma(qf[d], static_cast<float>(k[d]), dot);
        p[key - first] = dot * t.scale;
        if (t.softcap > 0.f) {
          p[key - first] = t.softcap * (1.f - 2.f / (std::exp(2.f * p[key - first] / t.softcap) + 1.f));
        }
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

// The run's tokens; q and out as attend_avx512's.
template <typename Q, typename KV>
void attend_run(const Q* q, const KV* k_cache, const KV* v_cache, const Task& t, int64_t stride, Q* out) {
#if KVSERVE_AVX512
  switch (t.c.hd) {
    case 64: return attend_avx512<4>(q, k_cache, v_cache, t, stride, out);
    case 96: return attend_avx512<6>(q, k_cache, v_cache, t, stride, out);
    case 128: return attend_avx512<8>(q, k_cache, v_cache, t, stride, out);
    case 256: return attend_avx512<16>(q, k_cache, v_cache, t, stride, out);
  }
#endif
  for (int64_t j = 0; j < t.tokens; ++j) {
    attend_generic(q + j * stride, k_cache, v_cache, t, t.span(j), out + j * stride);
  }
}

// Where each run starts (and T at the end): a run is up to kRunTokens tokens of one sequence at consecutive
// positions, as a prefill chunk's are; a decode step's tokens are runs of one.
std::vector<int64_t> run_starts(const int64_t* seqs, const int64_t* positions, int64_t T) {
  std::vector<int64_t> starts;
  for (int64_t t = 0; t < T; ++t) {
    const bool continues = t > 0 && seqs[t] == seqs[t - 1] && positions[t] == positions[t - 1] + 1 &&
                           t - starts.back() < kRunTokens;
    if (!continues) starts.push_back(t);
  }
  starts.push_back(T);
  return starts;
}

}  // namespace

namespace kvserve {

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& token_seq,
                           const at::Tensor& token_pos, int64_t block_size, double scale, int64_t window,
                           double softcap) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "q (T, heads, hd) and the caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches must have one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "q: float32 or bfloat16");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16 ||
              k_cache.scalar_type() == at::kHalf, "KV cache: float32, bfloat16 or float16");
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
    dispatch_kv(k_cache.scalar_type(), [&](auto kv_zero) {
      using Q = decltype(q_zero);
      using KV = decltype(kv_zero);
      const Q* qp = q.data_ptr<Q>();
      Q* op = out.data_ptr<Q>();
      const std::vector<int64_t> runs = run_starts(seqs, positions, T);
      const int64_t R = int64_t(runs.size()) - 1;
      at::parallel_for(0, R * n_kv, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          // Runs in the order first, last, second, second to last...: a causal prefill's long and short
          // rows alternate, so each thread's contiguous share of tasks holds the same work.
          const int64_t i = task / n_kv, r = i % 2 ? R - 1 - i / 2 : i / 2;
          const int64_t kv = task % n_kv, first = runs[r], last = runs[r + 1] - 1;
          Task work{c, seqs[first], positions[last], 0, kv, group, last - first + 1, window, float(scale),
                    float(softcap), {}};
          work.lo = work.span(0).lo;
          work.find_rows();
          const int64_t at = (first * heads + kv * group) * hd;
          attend_run(qp + at, k_cache.data_ptr<KV>(), v_cache.data_ptr<KV>(), work, heads * hd, op + at);
        }
      });
    });
  });
  return out;
}

}  // namespace kvserve

TORCH_LIBRARY_FRAGMENT(kvserve, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor token_seq, "
        "Tensor token_pos, int block_size, float scale, int window, float softcap=0.) -> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CPU, TORCH_FN(kvserve::paged_attention));
}
