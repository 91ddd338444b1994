"""Batch -> tensors -> model forward -> sampled tokens. Owns the KV cache tensors."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from model.attention import AttentionMetadata, allocate_kv_cache, kv_cache_bytes_per_block
from model.loading import LoadedModel
from service.engine.request import Request
from service.engine.sampler import SampleResult, Sampler, SamplingRow

log = logging.getLogger("kvserve.runner")

GPU_ACTIVATION_RESERVE = 1 << 30  # left free for activations and CUDA graphs when sizing the cache


@dataclass
class CacheSize:
    num_blocks: int
    block_size: int
    bytes_per_block: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def plan_cache(loaded: LoadedModel, block_size: int, kv_cache_memory: int | None,
               gpu_memory_utilization: float) -> CacheSize:
    """How many blocks fit: a byte budget on CPU (or when given), a fraction of free memory on GPU."""
    per_block = kv_cache_bytes_per_block(loaded.config, block_size, loaded.dtype)
    if kv_cache_memory is None and loaded.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(loaded.device)
        used = total - free
        kv_cache_memory = int(total * gpu_memory_utilization) - used - GPU_ACTIVATION_RESERVE
    if kv_cache_memory is None:
        raise ValueError("kv_cache_memory (bytes) must be set for a CPU cache")
    num_blocks = kv_cache_memory // per_block
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory {kv_cache_memory} bytes is less than one KV block "
                         f"({per_block} bytes)")
    return CacheSize(int(num_blocks), block_size, per_block)


class Runner:
    def __init__(self, loaded: LoadedModel, cache: CacheSize, seed: int = 0):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.device = loaded.device
        self.cache = cache
        self.kv_caches = allocate_kv_cache(loaded.config, cache.num_blocks, cache.block_size,
                                           loaded.dtype, loaded.device)
        self.sampler = Sampler(loaded.config.vocab_size, seed=seed)
        self.generators: dict[str, torch.Generator] = {}
        log.info("KV cache: %d blocks of %d tokens = %d tokens, %.1f MiB (%s, %s)", cache.num_blocks,
                 cache.block_size, cache.num_tokens, cache.num_bytes / 2**20, loaded.dtype, self.device)

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator | None:
        if request.params.seed is None:
            return None
        gen = self.generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(request.params.seed + request.sample_index)
            self.generators[request.request_id] = gen
        return gen

    @torch.inference_mode()
    def execute(self, requests: list[Request], num_new_tokens: list[int],
                block_tables: list[list[int]]) -> tuple[list[int], SampleResult | None]:
        """Run one step. Returns the indices of the requests whose step reached their last token,
        and the tokens sampled for them, in that order."""
        token_ids, context_lens, sample_rows = [], [], []
        for i, (request, n) in enumerate(zip(requests, num_new_tokens)):
            start = request.num_computed_tokens
            token_ids.extend(request.token_slice(start, start + n))
            context_lens.append(start + n)
            if start + n == request.num_tokens:
                sample_rows.append(i)
        meta = AttentionMetadata.build(num_new_tokens, context_lens, block_tables, self.cache.block_size,
                                       self.config.sliding_window, self.device)
        if not sample_rows:
            # A step of prefill chunks only: fill the cache, skip the output head.
            self.model(torch.tensor(token_ids, device=self.device), meta, self.kv_caches,
                       logits_index=meta.logits_index[:0])
            return [], None
        logits = self.model(torch.tensor(token_ids, device=self.device), meta, self.kv_caches,
                            logits_index=meta.logits_index[sample_rows])
        rows = [SamplingRow(requests[i].params, requests[i].prompt_ids, requests[i].output_ids,
                            self._generator(requests[i]), requests[i].stop_ids) for i in sample_rows]
        return sample_rows, self.sampler(logits, rows)
