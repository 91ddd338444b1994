"""SmolLM2 against Hugging Face transformers: same token ids, same greedy continuations.

The reference (reference/smollm2_reference.json, made by reference/make_reference.py with transformers
in float32) holds 12 prompts with 48 greedy tokens each, EOS banned at every step (min_new_tokens=48),
and the top-5 ids and top-1 margin of the raw logits at each step. All 12 prompts run here as one
packed batch over the paged KV cache: one prefill forward, then one decode forward per token.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from model.network.attention import AttentionMetadata, allocate_kv_cache

pytestmark = pytest.mark.slow

REFERENCE = json.loads((Path(__file__).parent / "reference" / "smollm2_reference.json").read_text("utf-8"))
PROMPTS = REFERENCE["prompts"]
CHAT_PROMPTS = [p for p in PROMPTS if p["kind"] == "chat"]
NUM_NEW = REFERENCE["metadata"]["max_new_tokens"]
TOPK = REFERENCE["metadata"]["topk"]
EOS_ID = REFERENCE["metadata"]["eos_token_id"]
BLOCK_SIZE = 16
TINY_MARGIN = 0.05  # logits this close may swap order under a different summation order


@dataclass
class Continuation:
    output_ids: list[int]
    top5_ids: list[list[int]]  # of the raw logits, before EOS is banned, like the reference's


def shuffled_block_tables(lengths: list[int], seed: int = 0) -> tuple[list[list[int]], int]:
    """Distinct, scattered blocks for each sequence, so a slot-mapping bug mixes sequences up."""
    counts = [-(-n // BLOCK_SIZE) for n in lengths]
    blocks = list(range(sum(counts)))
    random.Random(seed).shuffle(blocks)
    tables, start = [], 0
    for n in counts:
        tables.append(blocks[start:start + n])
        start += n
    return tables, len(blocks)


def pick(logits: torch.Tensor) -> tuple[list[int], list[list[int]]]:
    """Greedy tokens with EOS banned (min_new_tokens), and the raw top-5 of each row."""
    top5 = logits.topk(TOPK, dim=-1).indices.tolist()
    logits = logits.clone()
    logits[:, EOS_ID] = float("-inf")
    return logits.argmax(dim=-1).tolist(), top5


@torch.inference_mode()
def generate_packed(loaded, prompts: list[list[int]], num_new: int,
                    kv_dtype: torch.dtype | None = None) -> list[Continuation]:
    """Prefill every prompt in one packed forward, then decode all of them together (K/V cached in kv_dtype,
    by default the model's)."""
    tables, num_blocks = shuffled_block_tables([len(p) + num_new for p in prompts])
    cache = allocate_kv_cache(loaded.config, num_blocks, BLOCK_SIZE, kv_dtype or loaded.dtype, loaded.device)
    lens = [len(p) for p in prompts]
    meta = AttentionMetadata.build(lens, lens, tables, BLOCK_SIZE)
    tokens, top5 = pick(loaded.model(torch.tensor(sum(prompts, [])), meta, cache))
    outputs = [Continuation([t], [k]) for t, k in zip(tokens, top5)]
    for _ in range(num_new - 1):
        lens = [n + 1 for n in lens]
        meta = AttentionMetadata.build([1] * len(prompts), lens, tables, BLOCK_SIZE)
        tokens, top5 = pick(loaded.model(torch.tensor(tokens), meta, cache))
        for out, t, k in zip(outputs, tokens, top5):
            out.output_ids.append(t)
            out.top5_ids.append(k)
    return outputs


@pytest.fixture(scope="module")
def continuations(smollm2) -> dict[str, Continuation]:
    outputs = generate_packed(smollm2, [p["input_ids"] for p in PROMPTS], NUM_NEW)
    return {p["name"]: out for p, out in zip(PROMPTS, outputs)}


def first_divergence(ours: list[int], ref: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)


def tolerated(step: int, ours: Continuation, ref: dict) -> bool:
    """A near-tie: each side's token is in the other's top-5 and the reference's top-2 gap is tiny.
    At a step where the reference banned EOS, its recorded margin is EOS's lead over its pick, which
    says nothing about a near-tie between the tokens that remain, so that step is never excused."""
    mine, theirs = ours.output_ids[step], ref["output_ids"][step]
    return (mine in ref["top5_ids"][step] and theirs in ours.top5_ids[step]
            and ref["top1_margin"][step] < TINY_MARGIN and step not in ref["eos_suppressed_steps"])


@pytest.mark.parametrize("ref", PROMPTS, ids=[p["name"] for p in PROMPTS])
def test_prompt_tokens_match(smollm2, ref):
    tok = smollm2.tokenizer
    text = ref["prompt"] if ref["kind"] == "text" else ref["rendered"]
    assert tok.encode(text) == ref["input_ids"]


@pytest.mark.parametrize("ref", CHAT_PROMPTS, ids=[p["name"] for p in CHAT_PROMPTS])
def test_chat_template_renders_the_same_text(smollm2, ref):
    assert smollm2.tokenizer.render_chat(ref["messages"], add_generation_prompt=True) == ref["rendered"]


@pytest.mark.parametrize("case", REFERENCE["tokenizer_cases"], ids=lambda c: repr(c["text"][:20]))
def test_tokenizer_cases(smollm2, case):
    assert smollm2.tokenizer.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("ref", PROMPTS, ids=[p["name"] for p in PROMPTS])
def test_output_text_decodes_from_output_ids(smollm2, ref):
    assert smollm2.tokenizer.decode(ref["output_ids"]) == ref["output_text"]


@pytest.mark.parametrize("ref", PROMPTS, ids=[p["name"] for p in PROMPTS])
def test_greedy_continuation_matches(continuations, ref):
    ours = continuations[ref["name"]]
    step = first_divergence(ours.output_ids, ref["output_ids"])
    if step is None:
        return
    print(f"{ref['name']}: diverges at step {step}: ours {ours.output_ids[step]} "
          f"(top5 {ours.top5_ids[step]}), reference {ref['output_ids'][step]} "
          f"(top5 {ref['top5_ids'][step]}, margin {ref['top1_margin'][step]})")
    assert tolerated(step, ours, ref), (
        f"{ref['name']} diverges from the reference at step {step} beyond a near-tie: "
        f"ours {ours.output_ids[step]} top5 {ours.top5_ids[step]}, reference {ref['output_ids'][step]} "
        f"top5 {ref['top5_ids'][step]} margin {ref['top1_margin'][step]}")


def test_exact_match_count(continuations, record_property):
    exact = [p["name"] for p in PROMPTS if continuations[p["name"]].output_ids == p["output_ids"]]
    record_property("exact_matches", len(exact))
    print(f"\n{len(exact)}/{len(PROMPTS)} prompts match the reference's {NUM_NEW} tokens exactly; "
          f"inexact: {sorted(set(p['name'] for p in PROMPTS) - set(exact)) or 'none'}")
    assert all(len(c.output_ids) == NUM_NEW for c in continuations.values())
