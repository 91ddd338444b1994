"""EngineConfig: the engine's knobs as plain values, so a test can build an engine without settings.

Each knob the server exposes (as KVSERVE_<NAME> and --<name>) is declared here once, with its default,
its bounds and its help text; service/settings.py builds its fields from these.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CPU_KV_CACHE_MEMORY = 1 << 30  # bytes; a CPU has no "free device memory" to take a fraction of


def setting(default, description: str = "", **bounds):
    """A knob that is also a server setting; `bounds` are pydantic's (ge, gt, le, lt)."""
    return field(default=default, metadata={"setting": dict(bounds, description=description)})


def default_kv_cache_memory(device: str) -> int | None:
    """The KV cache size when none is given: 1 GiB on a CPU; on a GPU None, which the engine reads as
    gpu_memory_utilization of the device's memory less what the model uses."""
    return None if device.startswith("cuda") else CPU_KV_CACHE_MEMORY


@dataclass
class EngineConfig:
    block_size: int = setting(16, "tokens per KV cache block (the paging and prefix-caching unit)", ge=1, le=256)
    kv_cache_memory: int | None = setting(CPU_KV_CACHE_MEMORY, "KV cache size, e.g. 2GiB (default: 1GiB on CPU, "
                                          "a fraction of free memory on GPU)")
    kv_cache_dtype: str = setting("auto", "dtype of the cached keys and values: auto (float16 for quantized "
                                  "weights on a CPU, else the model's), float16, bfloat16 or float32 (on a CPU "
                                  "float32 holds half the tokens; float16 and bfloat16 round K/V, float16 the "
                                  "least)",
                                  pattern="^(auto|float16|bfloat16|float32)$")
    gpu_memory_utilization: float = setting(0.9, "on a GPU without --kv-cache-memory: the fraction of its memory "
                                            "the model and KV cache may use", gt=0, le=1)
    max_num_seqs: int = setting(64, "most sequences in one batch (running at once)", ge=1)
    max_num_batched_tokens: int = setting(512, "most tokens one step computes (longer prompts are prefilled in "
                                          "chunks of this size)", ge=1)
    max_model_len: int | None = setting(None, "longest prompt + output in tokens (default: the model's own "
                                        "context length)", ge=1)
    max_queue: int = setting(256, "waiting requests beyond this are refused (503 from the server)", ge=0)
    enable_prefix_caching: bool = setting(True, "reuse the KV blocks of prompts' shared prefixes")
    cuda_graphs: bool = setting(True, "replay GPU decode steps from CUDA graphs (--no-cuda-graphs: eager; "
                                "ignored on CPU)")
    # Detokenize and emit a step's tokens while the device runs the next step (None: on a GPU only; on a
    # CPU the next step is the CPU's own work, so deferring would only delay every token by a step).
    defer_outputs: bool | None = None
    seed: int = setting(0, "seed of the sampler for requests without their own seed")
    adaptive_threads: bool = setting(True, "on CPU: time decode steps with every thread and with one, and keep "
                                     "the faster (on a host where another process is busy, one is ~3x faster)")
    speculative_ngram: int = setting(0, "speculative decoding: up to this many draft tokens a step, looked up "
                                     "in the sequence's own prompt and output (0: off; a request's "
                                     "speculative_ngram overrides it)", ge=0, le=16)
    # 1 from bench/results/speculative.md: on 2 CPU cores, drafting in every batch paid at 2 running sequences
    # (1.20x, 1.42x) and went either way at 4-8 (0.71-1.31x) over one or two batches a level; 1 is never a loss.
    speculative_max_batch: int = setting(1, "draft only while at most this many sequences run", ge=1)
