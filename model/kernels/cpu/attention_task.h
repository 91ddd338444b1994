// What a paged attention task is (attention.cpp): the cache's shape, one token's span of keys, and a run of
// consecutive tokens of one sequence with the rows where their keys lie.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kKeysPerBlock = 32;
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

}  // namespace
