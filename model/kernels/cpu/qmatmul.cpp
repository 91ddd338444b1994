// y = x @ W^T on the CPU, W as 4- or 8-bit group codes, x quantized to 16 bits per group of 32 (integer dot
// products as in llama.cpp's Q4_1 x Q8_1, with activations twice as wide: on SmolLM2 8-bit activations cost
// ~3% of the greedy tokens that match the float32 reference, 16-bit ones none), with one reduction order for
// every output.
//
// Why one order: an output element is the same float sum over the same groups whatever the number of rows
// in the call, how the rows are tiled or how the work is split between threads, so a token's result does
// not depend on what else shares its step (DESIGN.md, decision 5).
//
// Layout (built by model/kernels/native.py): output columns in blocks of 16, input in groups of 32.
//   codes  uint8 (blocks, groups, bytes): for each (block, group), 4-bit: 8 runs of 32 bytes, byte 2*c+j of
//          run q holds column c's codes for inputs 2q+j (low nibble) and 16+2q+j (high nibble), unsigned;
//          8-bit: 16 runs of 32 bytes, byte 2*c+j of run p holds column c's code for input 2p+j, signed.
//   scale, offset float16 (blocks, groups, 16), as GGUF stores them: w = scale * code + offset; no offset
//          (an empty tensor) for symmetric 8-bit codes, which saves its reads.
// Per group: sum_k w x = scale * x_scale * dot(code, x_code) + offset * x_sum, where x_sum = x_scale * sum(x_code).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "simd.h"

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kCols = 16;
constexpr int64_t kRowsPerTask = 64;  // rows one task multiplies by its column block (the block stays in L1)

struct QuantizedRows {
  const int16_t* codes;  // (M, K)
  const float* scale;   // (M, G)
  const float* sum;     // (M, G)
};

template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t K, int16_t* codes, float* scale, float* sum) {
  const int64_t G = K / kGroup;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t at = r * K + g * kGroup;
      quantize_group(x + at, codes + at, scale + r * G + g, sum + r * G + g);
    }
  }
}

// One tile: R rows by one column block, every group; acc[r][c] is output (row r, column c).
template <int R, int BITS>
inline void tile(const QuantizedRows& xq, int64_t row, int64_t K, const uint8_t* codes, const c10::Half* scale,
                 const c10::Half* offset, float acc[R][kCols]) {
  const int64_t G = K / kGroup;
  constexpr int64_t kBytes = BITS * kGroup * kCols / 8;
#if KVSERVE_AVX512
  __m512 facc[R];
  for (int r = 0; r < R; ++r) facc[r] = _mm512_setzero_ps();
  const __m512i low_nibbles = _mm512_set1_epi16(0x0F);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* w = codes + g * kBytes;
    __m512i iacc[R];
    for (int r = 0; r < R; ++r) iacc[r] = _mm512_setzero_si512();
    // 32 bytes widen to 32 words: lane c holds column c's codes for one pair of inputs (two pairs for 4-bit:
    // the low nibbles' and the high nibbles'); vpdpwssd multiplies each pair by the row's pair of x codes.
    for (int q = 0; q < (BITS == 4 ? 8 : 16); ++q) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * q));
      const __m512i v = BITS == 4 ? _mm512_cvtepu8_epi16(bytes) : _mm512_cvtepi8_epi16(bytes);
      const __m512i lo = BITS == 4 ? _mm512_and_si512(v, low_nibbles) : v;
      for (int r = 0; r < R; ++r) {
        const int16_t* x = xq.codes + (row + r) * K + g * kGroup + 2 * q;
        iacc[r] = _mm512_dpwssd_epi32(iacc[r], lo, _mm512_set1_epi32(load_i32(x)));
      }
      if (BITS == 4) {
        const __m512i hi = _mm512_srli_epi16(v, 4);
        for (int r = 0; r < R; ++r) {
          const int16_t* x = xq.codes + (row + r) * K + g * kGroup + 16 + 2 * q;
          iacc[r] = _mm512_dpwssd_epi32(iacc[r], hi, _mm512_set1_epi32(load_i32(x)));
        }
      }
    }
    const __m512 s = load16(scale + g * kCols);
    const __m512 o = offset ? load16(offset + g * kCols) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const int64_t xg = (row + r) * G + g;
      const __m512 ws = _mm512_mul_ps(s, _mm512_set1_ps(xq.scale[xg]));
      facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), ws, facc[r]);
      if (offset) facc[r] = _mm512_fmadd_ps(o, _mm512_set1_ps(xq.sum[xg]), facc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc[r], facc[r]);
#else
  for (int r = 0; r < R; ++r) std::fill(acc[r], acc[r] + kCols, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* w = codes + g * kBytes;
    for (int r = 0; r < R; ++r) {
      const int16_t* x = xq.codes + (row + r) * K + g * kGroup;
      const int64_t xg = (row + r) * G + g;
      for (int c = 0; c < kCols; ++c) {
        int32_t dot = 0;
        for (int q = 0; q < (BITS == 4 ? 8 : 16); ++q) {
          for (int j = 0; j < 2; ++j) {
            const uint8_t byte = w[32 * q + 2 * c + j];
            if (BITS == 4) {
              dot += int32_t(byte & 0x0F) * x[2 * q + j] + int32_t(byte >> 4) * x[16 + 2 * q + j];
            } else {
              dot += int32_t(int8_t(byte)) * x[2 * q + j];
            }
          }
        }
        const float ws = float(scale[g * kCols + c]) * xq.scale[xg];
        acc[r][c] = std::fma(float(dot), ws, acc[r][c]);
        if (offset) acc[r][c] = std::fma(float(offset[g * kCols + c]), xq.sum[xg], acc[r][c]);
      }
    }
  }
#endif
}

template <typename T>
inline void store_rows(const float (*acc)[kCols], int rows, T* out, int64_t ldo, int64_t col, int64_t N,
                       const float* bias) {
  const int64_t width = std::min<int64_t>(kCols, N - col);
  for (int r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < width; ++c) {
      out[r * ldo + col + c] = static_cast<T>(bias ? acc[r][c] + bias[col + c] : acc[r][c]);
    }
  }
}

// Rows [row, end) by column block `block`: tiles of 8 rows, then 4, 2, 1 (each output's sum is the same).
template <int BITS, typename T>
void multiply_block(const QuantizedRows& xq, int64_t row, int64_t end, int64_t K, const uint8_t* codes,
                    const c10::Half* scale, const c10::Half* offset, int64_t block, T* out, int64_t N,
                    const float* bias) {
  const int64_t G = K / kGroup;
  const uint8_t* w = codes + block * G * (BITS * kGroup * kCols / 8);
  const c10::Half* s = scale + block * G * kCols;
  const c10::Half* o = offset ? offset + block * G * kCols : nullptr;
  float acc[8][kCols];
  while (row < end) {
    const int64_t left = end - row;
    const int rows = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    if (rows == 8) tile<8, BITS>(xq, row, K, w, s, o, acc);
    else if (rows == 4) tile<4, BITS>(xq, row, K, w, s, o, acc);
    else if (rows == 2) tile<2, BITS>(xq, row, K, w, s, o, acc);
    else tile<1, BITS>(xq, row, K, w, s, o, acc);
    store_rows<T>(acc, rows, out + row * N, N, block * kCols, N, bias);
    row += rows;
  }
}

template <int BITS, typename T>
void multiply(const QuantizedRows& xq, int64_t M, int64_t K, const at::Tensor& codes, const at::Tensor& scale,
              const std::optional<at::Tensor>& offset, const float* bias, T* out, int64_t N) {
  const int64_t blocks = codes.size(0);
  const int64_t row_chunks = (M + kRowsPerTask - 1) / kRowsPerTask;
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const c10::Half* s = scale.data_ptr<c10::Half>();
  const c10::Half* o = offset ? offset->data_ptr<c10::Half>() : nullptr;
  at::parallel_for(0, blocks * row_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / row_chunks, chunk = task % row_chunks;
      const int64_t row = chunk * kRowsPerTask;
      multiply_block<BITS, T>(xq, row, std::min(M, row + kRowsPerTask), K, w, s, o, block, out, N, bias);
    }
  });
}

at::Tensor quantized_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                            const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias,
                            int64_t bits,
                            int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (rows, in_features) matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const int64_t M = x.size(0), K = x.size(1), G = K / kGroup;
  TORCH_CHECK(K % kGroup == 0 && codes.dim() == 3 && codes.size(1) == G &&
              codes.size(2) == bits * kGroup * kCols / 8, "codes do not match x's width");
  TORCH_CHECK(codes.size(0) * kCols >= out_features && scale.scalar_type() == at::kHalf &&
              scale.numel() == codes.size(0) * G * kCols && scale.is_contiguous(),
              "scale: float16 (blocks, groups, 16)");
  TORCH_CHECK(!offset || (offset->sizes() == scale.sizes() && offset->scalar_type() == at::kHalf &&
                          offset->is_contiguous()), "offset: shaped and typed like scale");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == out_features), "bias: float (N,)");
  at::Tensor out = at::empty({M, out_features}, x.options());
  if (M == 0) return out;
  at::Tensor xcodes = at::empty({M, K}, x.options().dtype(at::kShort));
  at::Tensor xscale = at::empty({M, G}, x.options().dtype(at::kFloat));
  at::Tensor xsum = at::empty({M, G}, x.options().dtype(at::kFloat));
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  dispatch_float_or_bf16(x.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      quantize_rows(xp + begin * K, end - begin, K, xcodes.data_ptr<int16_t>() + begin * K,
                    xscale.data_ptr<float>() + begin * G, xsum.data_ptr<float>() + begin * G);
    });
    const QuantizedRows xq{xcodes.data_ptr<int16_t>(), xscale.data_ptr<float>(), xsum.data_ptr<float>()};
    if (bits == 4) multiply<4, scalar_t>(xq, M, K, codes, scale, offset, b, out.data_ptr<scalar_t>(), out_features);
    else multiply<8, scalar_t>(xq, M, K, codes, scale, offset, b, out.data_ptr<scalar_t>(), out_features);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvserve, m) {
  m.def("quantized_matmul(Tensor x, Tensor codes, Tensor scale, Tensor? offset, Tensor? bias, int bits, "
        "int out_features) -> Tensor");
  m.impl("quantized_matmul", c10::DispatchKey::CPU, TORCH_FN(quantized_matmul));
}
