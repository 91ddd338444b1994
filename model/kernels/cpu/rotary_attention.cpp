// RoPE, the KV cache write and attention in one op: the fused QKV projection's output in, the attention
// output out, so a layer's attention costs one call (attention.cpp attends).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention.h"
#include "simd.h"

namespace {

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
    out[d] = narrow_to<Out>(v);
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
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16 ||
              k_cache.scalar_type() == at::kHalf, "KV cache: float32, bfloat16 or float16");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16, "qkv: float32 or bfloat16");
  at::Tensor q = at::empty({T, heads, hd}, qkv.options());
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  dispatch_float_or_bf16(qkv.scalar_type(), [&](auto q_zero) {
    dispatch_kv(k_cache.scalar_type(), [&](auto kv_zero) {
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
  return kvserve::paged_attention(q, k_cache, v_cache, block_tables, token_seq, token_pos, block_size, scale,
                                  window, softcap);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvserve, m) {
  m.def("rotary_paged_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, Tensor block_tables, Tensor token_seq, Tensor token_pos, int block_size, "
        "float scale, int window, int heads, float softcap=0.) -> Tensor");
  m.impl("rotary_paged_attention", c10::DispatchKey::CPU, TORCH_FN(rotary_paged_attention));
}
