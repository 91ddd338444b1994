"""Single-stream decode on an idle host and beside one busy process: the engine's thread tuning on and off.

Each configuration runs the engine (on its own step thread, as the server does) in a fresh process with the
server's OpenMP default (workers spin ~10k iterations, then sleep; service/cli.py), or with
OMP_WAIT_POLICY=PASSIVE: 3 requests one at a time, a 128-token prompt and 128 output tokens each (EOS
ignored), output tok/s of each, median. "Busy" starts a
process that spins on one core for the whole run. Rounds alternate the configurations.

    .venv/bin/python bench/busy_host.py          # ~5 minutes; writes bench/results/busy_host.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIGS = {  # name -> (environment, adaptive_threads)
    "spin 10k, thread tuning (kvserve default)": ({"GOMP_SPINCOUNT": "10000"}, True),
    "spin 10k, every thread always": ({"GOMP_SPINCOUNT": "10000"}, False),
    "PASSIVE, every thread always": ({"OMP_WAIT_POLICY": "PASSIVE"}, False),
    "spin 10k, one thread": ({"GOMP_SPINCOUNT": "10000", "KVSERVE_BENCH_THREADS": "1"}, False),
}


def child(adaptive: bool) -> list[float]:
    import torch

    from bench.engine_throughput import distinct_prompts
    from model.loading import load_model
    from service.engine.config import EngineConfig
    from service.engine.engine import Engine
    from service.engine.request import SamplingParams
    from service.settings import Settings

    if "KVSERVE_BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["KVSERVE_BENCH_THREADS"]))
    defaults = Settings(device="cpu")
    loaded = load_model("smollm2", defaults.resolved_dtype(), "cpu", defaults.resolved_quantization())
    engine = Engine(loaded, EngineConfig(adaptive_threads=adaptive)).start()  # its own step thread, as served
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    speeds = []
    for i, prompt in enumerate(distinct_prompts(loaded.tokenizer, 4, 128)):
        done = threading.Event()
        start = time.perf_counter()
        engine.add_request(prompt, params, f"r{i}", lambda out: done.set() if out.finished else None)
        done.wait(600)
        if i:  # the first request warms up
            speeds.append(128 / (time.perf_counter() - start))
    engine.stop()
    return speeds


def run(name: str, busy: bool) -> float:
    env_extra, adaptive = CONFIGS[name]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(adaptive)], env=env,
                             capture_output=True, text=True, check=True, timeout=900).stdout
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return statistics.median(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "busy_host.md")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from bench.machine import machine
    header = f"Machine: {machine()}, load average {os.getloadavg()[0]:.2f} at start."
    results = {(name, busy): [] for busy in (False, True) for name in CONFIGS}
    for _ in range(args.rounds):
        for key in results:
            results[key].append(run(*key))
            print(key, f"{results[key][-1]:.1f}", flush=True)
    lines = [f"# Single-stream decode, idle host and busy host ({time.strftime('%Y-%m-%d %H:%M')})", "", header,
             "Engine, SmolLM2 with the CPU defaults, requests one at a time (128-token prompt, 128 output tokens); "
             f"median over requests, then over {args.rounds} rounds; `bench/busy_host.py`.", "",
             "| OpenMP and threads | idle tok/s | beside one busy process tok/s | rounds (idle; busy) |",
             "|---|---|---|---|"]
    for name in CONFIGS:
        idle, busy = results[(name, False)], results[(name, True)]
        lines.append(f"| {name} | {statistics.median(idle):.1f} | {statistics.median(busy):.1f} | "
                     f"{', '.join(f'{v:.0f}' for v in idle)}; {', '.join(f'{v:.0f}' for v in busy)} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
