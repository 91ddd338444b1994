"""The decoder network: the Transformer, its layers, and attention over the paged KV cache."""
