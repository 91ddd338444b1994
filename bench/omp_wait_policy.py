"""Decode speed of SmolLM2 (model + paged cache, no engine) at batch 1 and 16 under one OpenMP setting.

Run it once per setting, with and without a competing process, e.g.:
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/omp_wait_policy.py bfloat16 2
Results: bench/results/omp_wait_policy.md.
"""
import os, sys, time, torch, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from model.loading import load_model
from model.network.attention import AttentionMetadata, allocate_kv_cache
dtype = sys.argv[1]; threads = int(sys.argv[2])
torch.set_num_threads(threads)
lm = load_model("smollm2", dtype)
m = lm.model
res = {}
for B in (1, 16):
    cache = allocate_kv_cache(lm.config, 16 * B, 16, lm.dtype, "cpu")
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(B)]
    with torch.inference_mode():
        m(torch.arange(128 * B) % 1000, AttentionMetadata.build([128] * B, [128] * B, tables), cache)
        times = []
        for i in range(40):
            t = time.perf_counter()
            m(torch.ones(B, dtype=torch.long), AttentionMetadata.build([1] * B, [129 + i] * B, tables), cache)
            times.append(time.perf_counter() - t)
    res[B] = B / statistics.median(times)
print(f"{dtype} threads={threads} wait={os.environ.get('OMP_WAIT_POLICY','default')} load={os.getloadavg()[0]:.1f} b1={res[1]:.1f} tok/s b16={res[16]:.1f} tok/s")
