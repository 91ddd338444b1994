// paged_attention (attention.cpp), which rotary_attention.cpp runs after rotating and caching a step's K/V.
#pragma once

#include <ATen/ATen.h>

namespace kvserve {

// q (T, heads, hd) over the paged caches (blocks * block_size, kv_heads, hd): each token t attends to keys
// [0, token_pos[t]] of sequence token_seq[t] (the last `window` of them if window > 0).
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& token_seq,
                           const at::Tensor& token_pos, int64_t block_size, double scale, int64_t window,
                           double softcap);

}  // namespace kvserve
