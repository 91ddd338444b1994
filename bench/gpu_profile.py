"""Where a GPU decode step's time goes (a companion to gpu_check.py, same image needs).

1. cProfile of the offline engine at 64 concurrent requests (llama-1b shape, bf16, random weights):
   the host side of a step.
2. torch.profiler of batch-1 CUDA-graph decode steps: the kernels a token costs on the device.

    PYTHONPATH=. python bench/gpu_profile.py
"""
from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_check import _ByteTokenizer, KV_CACHE_BYTES  # noqa: E402
from model.config import preset  # noqa: E402
from model.kernels.plan import KernelPlan  # noqa: E402
from model.loading import LoadedModel, build_model  # noqa: E402
from model.loading.weights import random_weights  # noqa: E402
from model.network.attention import AttentionMetadata, allocate_kv_cache  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402
from service.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.request import SamplingParams  # noqa: E402


def profile_engine(model, config, device, batch: int = 64) -> None:
    loaded = LoadedModel(model, config, _ByteTokenizer(config.vocab_size), "random", torch.bfloat16,
                         torch.device(device), 0.0)
    engine = Engine(loaded, EngineConfig(kv_cache_memory=KV_CACHE_BYTES, max_num_seqs=batch,
                                         max_num_batched_tokens=8192, max_queue=1 << 20))
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)

    def run() -> tuple[float, float]:
        for i in range(batch):
            engine.add_request(list(range(1, 129)), params, f"r{time.perf_counter_ns()}-{i}")
        engine.step()  # the prefill
        torch.cuda.synchronize()
        start, steps = time.perf_counter(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        return (time.perf_counter() - start) / steps, steps

    run()
    profiler = cProfile.Profile()
    profiler.enable()
    per_step, steps = run()
    profiler.disable()
    print(f"engine decode at batch {batch}: {per_step * 1e3:.2f} ms/step over {steps} steps "
          f"= {batch / per_step:.0f} tok/s")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def profile_graph_decode(model, config, device) -> None:
    cache = allocate_kv_cache(config, 65, 16, torch.bfloat16, device)
    table = list(range(64))
    graphs = DecodeGraphs(model, KernelPlan(), cache, 16, 8, 64, 64, torch.device(device))
    with torch.inference_mode():
        model(torch.arange(128, device=device), AttentionMetadata.build([128], [128], [table], device=device), cache,
              kernels=graphs.kernels)
        for i in range(8):
            graphs.run([1], [129 + i], [table])
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(20):
                graphs.run([1], [137 + i], [table])
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


def main() -> None:
    device = "cuda"
    config = preset("llama-1b")
    model = build_model(config, random_weights(config), "random", torch.bfloat16, device)
    profile_graph_decode(model, config, device)
    profile_engine(model, config, device)


if __name__ == "__main__":
    main()
