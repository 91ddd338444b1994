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
#include "attention_avx512.h"
#include "attention_task.h"
#include "simd.h"

namespace {

constexpr int64_t kMaxHeadDim = 256;

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
