"""EngineConfig: the engine's knobs as plain values, so a test can build an engine without settings."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: int | None = 1 << 30  # bytes; None on GPU means a fraction of free memory
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's own context length
    max_queue: int = 512  # waiting requests beyond this are refused (EngineOverloaded)
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True  # decode steps replayed from CUDA graphs on GPU (ignored on CPU)
    seed: int = 0
