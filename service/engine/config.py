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
    # Detokenize and emit a step's tokens while the device runs the next step (None: on a GPU only; on a
    # CPU the next step is the CPU's own work, so deferring would only delay every token by a step).
    defer_outputs: bool | None = None
    seed: int = 0
