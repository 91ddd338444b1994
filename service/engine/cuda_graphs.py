"""Decode steps replayed from CUDA graphs, one graph per padded batch size.

A decode step of a small model is hundreds of tiny kernels; launched one by one from Python, the GPU
waits on the CPU. A CUDA graph records the whole forward once and replays it with one launch. The
graph's tensors are fixed, so every input lives in a static buffer sized for the largest batch and each
step copies its rows in; a batch is padded up to the next captured size. Padding rows attend one key
of a scratch block that the block manager never hands out, and write their K/V there too, so they can
never touch a live sequence. All sizes are captured at start-up, largest first, into one memory pool
(only one graph replays at a time, so their intermediates can share it); each copies its logits into
one static buffer, so a graph keeps nothing of its own alive.

Only possible because decode attention is the Triton paged kernel (model/kernels/decode.py): its launch
shape depends on the batch size and the table width alone, the context lengths are read from a tensor.
"""
from __future__ import annotations

import bisect
import logging
import time

import torch

from model.kernels.plan import KernelPlan, TuneResult
from model.network.attention import AttentionMetadata, DecodeRows, KVCache, pad_block_tables

log = logging.getLogger("kvserve.cuda_graphs")


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kernels: KernelPlan, kv_caches: list[KVCache], block_size: int,
                 max_batch: int, max_blocks_per_seq: int, scratch_block: int, device: torch.device):
        """`kernels`: the plan the graphs run with; each size's projections are tuned into it before its
        capture."""
        self.model, self.kernels, self.kv_caches, self.block_size = model, kernels, kv_caches, block_size
        self.sizes = graph_batch_sizes(max_batch)
        self.scratch_block = scratch_block
        n, long = self.sizes[-1], dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(n, **long)
        self.positions = torch.zeros(n, **long)
        self.slot_mapping = torch.zeros(n, **long)
        self.rows = torch.arange(n, **long)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.logits = torch.zeros(n, model.config.vocab_size, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.gemv_tuning: list[TuneResult] = []

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every size now (their inputs point at the scratch block), so no request waits on a
        capture later."""
        start = time.perf_counter()
        log.info("capturing CUDA graphs for decode batches of %s (tuning the GEMV per shape) ...", self.sizes)
        for size in reversed(self.sizes):
            self._stage(size, [0], [1], [[self.scratch_block]])
            self.graphs[size] = self._capture(size)
        torch.cuda.synchronize()
        won = sum(result.best is not None for result in self.gemv_tuning)
        log.info("captured CUDA graphs for decode batches of %s in %.1f s (Triton GEMV chosen for %d of %d "
                 "small-batch projection shapes)", self.sizes, time.perf_counter() - start, won, len(self.gemv_tuning))

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def padded_size(self, batch: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, batch)]

    def _metadata(self, size: int) -> AttentionMetadata:
        decode = DecodeRows(self.rows[:size], self.block_size, self.block_tables[:size], self.context_lens[:size])
        # The Python-side lengths only feed checks made while capturing; the graph reads the tensors.
        return AttentionMetadata([1] * size, [1] * size, self.positions[:size], self.rows[:size],
                                 self.slot_mapping[:size], decode, [], self.model.config.sliding_window,
                                 triton_attention=True)

    def _stage(self, size: int, token_ids: list[int], context_lens: list[int],
               block_tables: list[list[int]]) -> None:
        """Copy a step's rows into the static buffers; rows past the batch point at the scratch block."""
        pad = size - len(token_ids)
        positions = [c - 1 for c in context_lens]
        slots = [t[p // self.block_size] * self.block_size + p % self.block_size
                 for t, p in zip(block_tables, positions)]
        scratch_slot = self.scratch_block * self.block_size
        tables = pad_block_tables(block_tables + [[self.scratch_block]] * pad, "cpu", fill=self.scratch_block)
        self.input_ids[:size].copy_(torch.tensor(token_ids + [0] * pad), non_blocking=True)
        self.positions[:size].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slot_mapping[:size].copy_(torch.tensor(slots + [scratch_slot] * pad), non_blocking=True)
        self.context_lens[:size].copy_(torch.tensor(context_lens + [1] * pad, dtype=torch.int32),
                                       non_blocking=True)
        # Columns past this step's width may hold an older step's blocks; the kernel never reads past a
        # row's context.
        self.block_tables[:size, : tables.shape[1]].copy_(tables, non_blocking=True)

    def _capture(self, size: int) -> torch.cuda.CUDAGraph:
        # A small batch's projections: the Triton GEMV where it beats the unfused path on this card (timed now).
        for result in self.kernels.tune_model(self.model, [size]):
            self.gemv_tuning.append(result)
            log.debug("%s projection %s x %d rows: unfused %.1f us, %s %.1f us", result.kind, result.shape,
                      result.rows, result.unfused_us, result.best or "no kernel faster", result.best_us)
        meta = self._metadata(size)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                self.model(self.input_ids[:size], meta, self.kv_caches, kernels=self.kernels)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[:size].copy_(self.model(self.input_ids[:size], meta, self.kv_caches, kernels=self.kernels))
        self.pool = graph.pool()
        return graph

    def run(self, token_ids: list[int], context_lens: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Logits (batch, vocab) of one decode step: row i brings token_ids[i] at position
        context_lens[i] - 1 of the sequence whose blocks are block_tables[i]."""
        size = self.padded_size(len(token_ids))
        self._stage(size, token_ids, context_lens, block_tables)
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        self.graphs[size].replay()
        return self.logits[: len(token_ids)]
