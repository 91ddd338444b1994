"""Batch -> tensors -> model forward -> sampled tokens. Owns the KV cache tensors."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from model.kernels.decode import triton_available
from model.kernels.plan import KernelPlan
from model.network.attention import AttentionMetadata, allocate_kv_cache, kv_cache_bytes_per_block, to_device
from model.loading import LoadedModel
from service.engine.cuda_graphs import DecodeGraphs
from service.engine.sequence import Sequence
from service.engine.speculative import position_seed
from service.engine.sampler import PendingSample, Sampler, SamplingRow

log = logging.getLogger("kvserve.runner")

GPU_ACTIVATION_RESERVE = 1 << 30  # left free for activations and CUDA graphs when sizing the cache


@dataclass
class CacheSize:
    num_blocks: int
    block_size: int
    bytes_per_block: int
    dtype: torch.dtype  # of the cached keys and values

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def kv_cache_dtype_of(loaded: LoadedModel, kv_cache_dtype: str = "auto") -> torch.dtype:
    """The setting as a dtype. auto: float16 for quantized weights on a CPU (the default fast path): half
    float32's bytes, so twice the tokens in the same memory and half the reads of a decode step's attention,
    for a rounding of K/V to 11 significant bits (bench/results/kv_cache_dtype.md: a teacher-forced greedy
    token differs from a float32 cache's ~1 in 1,400, bfloat16's ~1 in 350). Otherwise the model's own dtype:
    unquantized on a CPU is the reference model, and a GPU's kernels read K/V in the model's dtype."""
    if kv_cache_dtype != "auto":
        return getattr(torch, kv_cache_dtype)
    return torch.float16 if loaded.device.type == "cpu" and loaded.quantization else loaded.dtype


def plan_cache(loaded: LoadedModel, block_size: int, kv_cache_memory: int | None,
               gpu_memory_utilization: float, kv_cache_dtype: str = "auto") -> CacheSize:
    """How many blocks fit: a byte budget on CPU (or when given), a fraction of free memory on GPU."""
    dtype = kv_cache_dtype_of(loaded, kv_cache_dtype)
    if dtype != loaded.dtype and loaded.device.type != "cpu":
        # The GPU's kernels read K/V in the model's dtype; only the CPU's native kernel converts as it reads.
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype} differs from the model's {loaded.dtype}: "
                         "CPU only (on a GPU use --dtype)")
    per_block = kv_cache_bytes_per_block(loaded.config, block_size, dtype)
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
    return CacheSize(int(num_blocks), block_size, per_block, dtype)


class Runner:
    def __init__(self, loaded: LoadedModel, cache: CacheSize, seed: int = 0, cuda_graphs: bool = False,
                 max_batch: int = 64, max_model_len: int | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.device = loaded.device
        self.cache = cache
        self.kernels = KernelPlan() if triton_available(self.device) else None
        # None: the fused attention kernels (native CPU, Triton) wherever they run; False: torch's attention,
        # on a GPU for a model whose scores are soft-capped (the native CPU kernel caps them, Triton's do not).
        capped_on_gpu = loaded.config.attention_softcap is not None and self.device.type != "cpu"
        self.fused_attention = False if capped_on_gpu else None
        if capped_on_gpu:
            log.info("attention soft-capping (%s) runs on torch's attention ops: the Triton attention kernels "
                     "do not implement it", loaded.config.architecture)
        # A graph's metadata has no sequence lengths, which dynamic NTK and longrope rotate by.
        scaling = loaded.config.rope_scaling
        use_graphs = cuda_graphs and self.kernels is not None and self.fused_attention is None \
            and not (scaling is not None and scaling.length_dependent)
        # Graphs need one scratch block for their padding rows, past the blocks the engine hands out.
        self.kv_caches = allocate_kv_cache(loaded.config, cache.num_blocks + use_graphs, cache.block_size,
                                           cache.dtype, loaded.device)
        self.graphs = None
        if use_graphs:
            max_len = max_model_len or loaded.config.max_position
            self.graphs = DecodeGraphs(self.model, self.kernels, self.kv_caches, cache.block_size, max_batch,
                                       -(-max_len // cache.block_size), cache.num_blocks, self.device)
            self.graphs.capture_all()
        self.sampler = Sampler(loaded.config.vocab_size, seed=seed)
        log.info("KV cache: %d blocks of %d tokens = %d tokens, %.1f MiB (%s, %s, decode %s)", cache.num_blocks,
                 cache.block_size, cache.num_tokens, cache.num_bytes / 2**20, cache.dtype, self.device,
                 "CUDA graphs" if self.graphs else "eager")

    def _generator(self, seq: Sequence, position: int) -> torch.Generator | None:
        """A seeded sequence's generator for one output position, keyed on (seed, sample index, position):
        the same draw whether the position is sampled alone or as one of a step's draft positions."""
        if seq.params.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(position_seed(seq.params.seed, seq.index, position))

    @torch.inference_mode()
    def execute(self, sequences: list[Sequence], num_new_tokens: list[int],
                block_tables: list[list[int]]) -> tuple[list[tuple[int, int]], PendingSample | None]:
        """Run one step. Returns (row, number of samples) for the sequences whose step reached their last
        token, one sample per position for a row with drafts, and the samples in that order (on a GPU
        still on their way: resolve() them)."""
        token_ids, context_lens, spans = [], [], []
        for i, (seq, n) in enumerate(zip(sequences, num_new_tokens)):
            start = seq.num_computed_tokens
            token_ids.extend(seq.token_slice(start, start + n))
            context_lens.append(start + n)
            if start + n == seq.num_tokens + len(seq.draft_ids):
                spans.append((i, 1 + len(seq.draft_ids)))
        rows = self._sampling_rows(sequences, spans)
        if self.graphs is not None and len(spans) == len(sequences) == len(token_ids) \
                and self.graphs.fits(len(sequences)):
            logits = self.graphs.run(token_ids, context_lens, block_tables)
            return spans, self.sampler.sample(logits, rows)
        meta = AttentionMetadata.build(num_new_tokens, context_lens, block_tables, self.cache.block_size,
                                       self.config.sliding_window, self.device, self.fused_attention,
                                       self.fused_attention)
        if not spans:
            # A step of prefill chunks only: fill the cache, skip the output head.
            self.model(to_device(token_ids, self.device), meta, self.kv_caches,
                       logits_index=meta.logits_index[:0], kernels=self.kernels)
            return [], None
        # A row's last token's logits; a drafted row's also for the positions of its drafts, before it.
        last = meta.logits_index.tolist() if any(count > 1 for _, count in spans) else None
        index = meta.logits_index[[i for i, _ in spans]] if last is None else \
            to_device([last[i] - count + 1 + j for i, count in spans for j in range(count)], self.device)
        logits = self.model(to_device(token_ids, self.device), meta, self.kv_caches, logits_index=index,
                            kernels=self.kernels)
        return spans, self.sampler.sample(logits, rows)

    def _sampling_rows(self, sequences: list[Sequence], spans: list[tuple[int, int]]) -> list[SamplingRow]:
        """One row per sample: a draft position's as if the drafts before it were accepted."""
        rows = []
        for i, count in spans:
            seq = sequences[i]
            for j in range(count):
                history = seq.output_ids + seq.draft_ids[:j] if j else seq.output_ids
                rows.append(SamplingRow(seq.params, seq.prompt_ids, history,
                                        self._generator(seq, len(seq.output_ids) + j), seq.stop_ids, seq.grammar))
        return rows
