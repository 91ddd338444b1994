"""Where a CPU decode step's time goes: SmolLM2, one batch-1 step and one 16-row step, by op.

Each configuration runs in a fresh process (the native kernels load, or not, once per process): the CPU
default (the native kernels, float32 activations, float16 KV cache) and the previous default (torch's int4
kernels, bfloat16; KVSERVE_NATIVE_KERNELS=0). Each decodes after a 128-token prompt a sequence, under torch's
profiler: 20 steps after 5 of warm-up; the table lists the ops that take the most self time per step,
and the median step's wall time beside the profiled total.

    .venv/bin/python bench/cpu_profile.py        # ~2 minutes; writes bench/results/cpu_profile.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIGS = {"native kernels + float32, float16 KV (default)": ("float32", "1"),
           "torch int4 kernels + bfloat16 (previous default)": ("bfloat16", "0")}
STEPS, WARMUP, TOP = 20, 5, 8


def profile(dtype: str, batch: int) -> dict:
    """In the child: the median step and the top ops by self CPU time, per step."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from model.loading import load_model
    from model.network.attention import AttentionMetadata, allocate_kv_cache
    from service.engine.runner import kv_cache_dtype_of

    torch.set_grad_enabled(False)
    loaded = load_model("smollm2", dtype, "cpu", "int4")
    # The KV dtype each configuration's server used: float16 now (auto), the model's own in the previous one.
    kv_dtype = kv_cache_dtype_of(loaded) if os.environ["KVSERVE_NATIVE_KERNELS"] == "1" else loaded.dtype
    cache = allocate_kv_cache(loaded.config, 16 * batch, 16, kv_dtype, "cpu")
    tables = [list(range(16 * b, 16 * b + 16)) for b in range(batch)]
    loaded.model(torch.arange(128 * batch) % 5000 + 100, AttentionMetadata.build([128] * batch, [128] * batch, tables),
                 cache)

    def step(i: int) -> float:
        start = time.perf_counter()
        meta = AttentionMetadata.build([1] * batch, [129 + i] * batch, tables)
        loaded.model(torch.full((batch,), 200), meta, cache)
        return time.perf_counter() - start

    for i in range(WARMUP):
        step(i)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        times = [step(WARMUP + i) for i in range(STEPS)]
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / STEPS / 1000
    ops = [(e.key, e.self_cpu_time_total / STEPS / 1000, e.count // STEPS) for e in events[:TOP]]
    return {"median_ms": statistics.median(times) * 1000, "profiled_ms": total, "ops": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_profile.md")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(profile(*json.loads(args.child))))
        return
    from bench.machine import machine
    lines = [f"# Where a CPU decode step's time goes ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Machine: {machine()}, load average {os.getloadavg()[0]:.2f} at start. SmolLM2, int4, decode after a "
             f"128-token prompt, {STEPS} profiled steps (after {WARMUP}); `bench/cpu_profile.py`. Self CPU time per "
             "step of the ops that take the most, summed over the threads (so it can exceed the wall time).", ""]
    for name, (dtype, native) in CONFIGS.items():
        for batch in (1, 16):
            env = dict(os.environ, KVSERVE_NATIVE_KERNELS=native, PYTHONPATH=str(ROOT))
            if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
                env["GOMP_SPINCOUNT"] = "10000"  # what `kvserve serve` sets (service/cli.py)
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps([dtype, batch])], env=env,
                                 capture_output=True, text=True, check=True, timeout=900).stdout
            result = json.loads(out.strip().splitlines()[-1])
            lines += [f"## {name}, {batch} row{'s' if batch > 1 else ''} a step", "",
                      f"Median step {result['median_ms']:.2f} ms ({batch / result['median_ms'] * 1000:.0f} tok/s); "
                      f"profiled self time {result['profiled_ms']:.2f} ms a step.", "",
                      "| op | ms a step | calls a step |", "|---|---|---|",
                      *[f"| `{op}` | {ms:.2f} | {calls} |" for op, ms, calls in result["ops"]], ""]
            print("\n".join(lines[-TOP - 6:]), flush=True)
    args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
