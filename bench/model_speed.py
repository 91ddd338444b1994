"""SmolLM2 forward speed on this machine: our model (float32, bfloat16) vs transformers' generate.

Measures, single sequence, paged KV cache, greedy:
  prefill   tokens/s of one 512-token prompt (median of 5)
  decode    tokens/s of the one-token steps that continue a 128-token prompt by 128 tokens (median of 3)
  generate  the same 128 new tokens, prefill included (median of 3), the figure
            comparable to transformers' `generate` (float32, batch 1), measured in the same run
            when transformers is importable (it lives in the dev-only .refvenv).
The CPU is shared, so the script waits for a quiet machine (1-min load average below --quiet-load)
for up to --max-wait seconds and records the load next to the numbers either way.

  .refvenv/bin/python bench/model_speed.py          # with the transformers baseline
  .venv/bin/python bench/model_speed.py             # ours only
Writes the table to bench/results/model_speed.md (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from any venv that has torch, tokenizers and gguf
# As `kvserve serve` does, before torch loads OpenMP: idle workers sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from model.loading import LoadedModel, load_model, smollm2_path  # noqa: E402
from model.network.attention import AttentionMetadata, allocate_kv_cache  # noqa: E402

BLOCK_SIZE = 16
PREFILL_LEN, PREFILL_RUNS = 512, 5
PROMPT_LEN, NEW_TOKENS, DECODE_RUNS = 128, 128, 3
SENTENCES = [
    "The old lighthouse keeper climbed the spiral stairs every evening just before sunset.",
    "From the top he could see the fishing boats returning to the harbor, one after another.",
    "His daughter had moved to the city years ago, but she still wrote him long letters.",
    "In the winter the wind howled around the tower and salt spray froze on the windows.",
    "He kept a logbook of the weather, the ships, and the birds he noticed each day.",
    "Children sometimes visited on Saturdays to hear his stories about storms and shipwrecks.",
]


def machine() -> dict[str, str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                  if line.startswith("Model name")), platform.processor())
    return {"cpu": model, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "python": platform.python_version(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


def load_text() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def wait_for_quiet(threshold: float, max_wait: float) -> None:
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        print(f"load {load_text()} (1/5/15 min) >= {threshold}; waiting...", flush=True)
        time.sleep(15)
    print(f"measuring at load {load_text()}", flush=True)


def prompt_ids(loaded: LoadedModel, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += loaded.tokenizer.encode(" ".join(SENTENCES) + " ")
    return ids[:n]


class Sequence:
    """One sequence over its own paged KV cache, stepped the way the engine steps it."""

    def __init__(self, loaded: LoadedModel, max_len: int):
        self.loaded = loaded
        self.table = list(range(-(-max_len // BLOCK_SIZE)))
        self.cache = allocate_kv_cache(loaded.config, len(self.table), BLOCK_SIZE, loaded.dtype, loaded.device)
        self.length = 0

    def step(self, ids: list[int]) -> int:
        self.length += len(ids)
        meta = AttentionMetadata.build([len(ids)], [self.length], [self.table], BLOCK_SIZE)
        logits = self.loaded.model(torch.tensor(ids), meta, self.cache)
        logits[:, self.loaded.tokenizer.eos_token_id] = float("-inf")  # as min_new_tokens does
        return int(logits.argmax(-1))


@torch.inference_mode()
def time_prefill(loaded: LoadedModel, ids: list[int], runs: int) -> float:
    times = []
    for _ in range(runs + 1):  # the first run warms up
        seq = Sequence(loaded, len(ids))
        start = time.perf_counter()
        seq.step(ids)
        times.append(time.perf_counter() - start)
    return len(ids) / statistics.median(times[1:])


@torch.inference_mode()
def time_generate(loaded: LoadedModel, ids: list[int], new_tokens: int, runs: int):
    """Greedy: the prefill gives the first token, one-token steps the rest. Returns the medians of
    (decode tok/s, generate tok/s incl. prefill) and the generated ids."""
    decode, total = [], []
    for _ in range(runs):
        seq = Sequence(loaded, len(ids) + new_tokens)
        start = time.perf_counter()
        out = [seq.step(ids)]
        prefilled = time.perf_counter()
        while len(out) < new_tokens:
            out.append(seq.step(out[-1:]))
        end = time.perf_counter()
        decode.append((new_tokens - 1) / (end - prefilled))
        total.append(new_tokens / (end - start))
    return statistics.median(decode), statistics.median(total), out


def bench_ours(dtype: str) -> dict:
    loaded = load_model("smollm2", dtype=dtype)
    print(f"ours {dtype}: loaded in {loaded.load_seconds:.1f}s", flush=True)
    prefill, prompt = prompt_ids(loaded, PREFILL_LEN), prompt_ids(loaded, PROMPT_LEN)
    row = {"system": "kvserve (ours)", "dtype": dtype, "load_before": load_text(), "prompt": prompt,
           "prefill_ids": prefill}
    row["prefill"] = time_prefill(loaded, prefill, PREFILL_RUNS)
    row["decode"], row["generate"], row["ids"] = time_generate(loaded, prompt, NEW_TOKENS, DECODE_RUNS)
    row["load_after"] = load_text()
    print(f"  {row_text(row)}", flush=True)
    return row


def bench_transformers(prefill: list[int], prompt: list[int]) -> dict | None:
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers is not importable here: skipping its baseline (use .refvenv/bin/python)")
        return None
    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    row = {"system": f"transformers {transformers.__version__} generate", "dtype": "float32",
           "load_before": load_text(), "decode": None}
    with torch.inference_mode():
        times = []
        for _ in range(PREFILL_RUNS + 1):
            start = time.perf_counter()
            model(torch.tensor([prefill]))
            times.append(time.perf_counter() - start)
        row["prefill"] = len(prefill) / statistics.median(times[1:])
        ids, times = torch.tensor([prompt]), []
        for _ in range(DECODE_RUNS):
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, pad_token_id=2)
            times.append(time.perf_counter() - start)
    row["generate"] = NEW_TOKENS / statistics.median(times)
    row["ids"] = out[0, len(prompt):].tolist()
    row["load_after"] = load_text()
    print(f"  {row_text(row)}", flush=True)
    return row


def row_text(row: dict) -> str:
    decode = "—" if row["decode"] is None else f"{row['decode']:.1f}"
    return (f"| {row['system']} | {row['dtype']} | {row['prefill']:.0f} | {decode} | {row['generate']:.1f} "
            f"| {row['load_before']} → {row['load_after']} |")


def report(rows: list[dict], info: dict[str, str], note: str) -> str:
    lines = [
        "# SmolLM2-135M-Instruct forward speed (bench/model_speed.py)", "",
        f"- Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']} "
        f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY={info['omp_wait_policy']}), "
        f"Python {info['python']}; {info['date']}",
        "- Single sequence, greedy, CPU. prefill: one 512-token prompt (median of 5). decode: the one-token "
        "steps of a 128-token continuation of a 128-token prompt (median of 3). generate: the same 128 new "
        "tokens, prefill included (median of 3), the figure comparable to transformers' `generate`.",
        "- Load is the 1/5/15-min load average before → after each row; it counts this benchmark's own "
        "threads (up to about 2 while it runs). The CPU is shared with other jobs; rows measured under load "
        "are slower than the machine can do.", "",
        "| system | dtype | prefill tok/s | decode tok/s | generate tok/s | load |",
        "|---|---|---|---|---|---|",
        *(row_text(r) for r in rows), "", note, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quiet-load", type=float, default=0.5)
    parser.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for a quiet CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    wait_for_quiet(args.quiet_load, args.max_wait)
    info = machine()
    rows = [bench_ours(dtype) for dtype in ("float32", "bfloat16")]
    hf = bench_transformers(rows[0]["prefill_ids"], rows[0]["prompt"])
    note = "transformers was not importable: no baseline row."
    if hf is not None:
        rows.append(hf)
        same = rows[0]["ids"] == hf["ids"]
        note = (f"Greedy tokens, ours float32 vs transformers: "
                f"{'identical' if same else 'different'} over the {NEW_TOKENS} new tokens.")
    text = report(rows, info, note)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
