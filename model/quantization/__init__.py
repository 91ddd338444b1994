"""Weight-only quantization of the decoder's projections for CPU decoding."""
