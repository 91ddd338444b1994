"""The CPU fast path, measured: weight format x OpenMP wait policy, decode tok/s of the model itself.

Each configuration runs in a fresh process (OpenMP reads its variables once, when torch loads it):
SmolLM2 decodes 24 steps after a 128-token prompt, batch 1 and batch 16, median step time. Then the
two wait policies again with one busy process competing for the cores, the case PASSIVE exists for.

    .venv/bin/python bench/cpu_fast_path.py         # ~3 minutes; writes bench/results/cpu_fast_path.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICIES = {"PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin 10k (kvserve default)": {"GOMP_SPINCOUNT": "10000"}}
DEFAULT = "int4 native kernels + float32 (kvserve default)"
# name -> (dtype, quantization, whether the native CPU kernels may load)
FORMATS = {"float32": ("float32", None, False), "bfloat16": ("bfloat16", None, False),
           "int4 torch kernels (8-bit head) + bfloat16": ("bfloat16", "int4", False),
           DEFAULT: ("float32", "int4", True)}


def measure(dtype: str, quantization: str | None) -> dict[int, float]:
    """Runs in the child: decode tok/s at batch 1 and 16."""
    import torch

    from model.loading import load_model
    from model.network.attention import AttentionMetadata, allocate_kv_cache

    torch.set_grad_enabled(False)
    loaded = load_model("smollm2", dtype, "cpu", quantization)
    speeds = {}
    for batch in (1, 16):
        cache = allocate_kv_cache(loaded.config, 16 * batch, 16, loaded.dtype, "cpu")
        tables = [list(range(16 * b, 16 * b + 16)) for b in range(batch)]
        prompt = torch.arange(128 * batch) % 5000 + 100
        loaded.model(prompt, AttentionMetadata.build([128] * batch, [128] * batch, tables), cache)
        times = []
        for i in range(24):
            start = time.perf_counter()
            loaded.model(torch.full((batch,), 200), AttentionMetadata.build([1] * batch, [129 + i] * batch, tables),
                         cache)
            times.append(time.perf_counter() - start)
        speeds[batch] = batch / statistics.median(times)
    return speeds


def run_child(fmt: str, policy: str, busy: bool) -> dict[int, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy], PYTHONPATH=str(ROOT), KVSERVE_NATIVE_KERNELS=str(int(FORMATS[fmt][2])))
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(FORMATS[fmt][:2])], env=env,
                             capture_output=True, text=True, check=True, timeout=600).stdout
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return {int(k): v for k, v in json.loads(out.splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_fast_path.md")
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(measure(*json.loads(args.child))))
        return
    rows, load = [], os.getloadavg()[0]
    for busy in (False, True):
        for fmt in FORMATS if not busy else [DEFAULT]:
            for policy in POLICIES:
                speeds = run_child(fmt, policy, busy)
                rows.append(f"| {fmt} | {policy} | {'one busy process' if busy else 'idle'} | "
                            f"{speeds[1]:.1f} | {speeds[16]:.1f} |")
                print(rows[-1], flush=True)
    report = [f"# CPU fast path: SmolLM2 decode tok/s of the model ({time.strftime('%Y-%m-%d %H:%M')})", "",
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
              f"{load:.2f} before, {os.getloadavg()[0]:.2f} after. Median of 24 decode steps after a "
              "128-token prompt; `bench/cpu_fast_path.py`.", "",
              "| weights | OpenMP waiting | machine | batch 1 tok/s | batch 16 tok/s |", "|---|---|---|---|---|",
              *rows]
    args.out.write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
