"""The engine with the real SmolLM2-135M-Instruct (fp32, CPU): greedy output does not depend on the
batch or on preemption, and streamed text never splits a character. Also LLM.generate's bookkeeping."""
from __future__ import annotations

import pytest

from service.engine.llm import LLM
from service.engine.request import SamplingParams
from tests.engine.engine_helpers import Collector, generate, greedy, make_engine, random_prompt

QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.",
             "Explain what a KV cache is in one sentence.", "Name three prime numbers."]
FILLER = ("The history of the printing press begins in the fifteenth century, when movable type "
          "changed how books were made and how ideas travelled across Europe. ")
MAX_TOKENS = 16


def chat(tok, question: str) -> list[int]:
    return tok.encode(tok.render_chat([{"role": "user", "content": question}]))


@pytest.fixture(scope="module")
def workload(smollm2):
    """4 chat prompts and 12 plain-text prompts of 8 to 85 tokens (sharing prefixes, as real traffic does)."""
    tok = smollm2.tokenizer
    prompts = {f"chat{i}": chat(tok, q) for i, q in enumerate(QUESTIONS)}
    for i in range(12):
        text = FILLER * (1 + i % 4) + f"Question {i}: what happened next?"
        prompts[f"text{i}"] = tok.encode(text)[: 8 + 7 * i]
    return prompts


@pytest.fixture(scope="module")
def chats_alone(smollm2, workload):
    results = Collector()
    for request_id in [k for k in workload if k.startswith("chat")]:
        got = generate(make_engine(smollm2, 64), {request_id: workload[request_id]}, greedy(MAX_TOKENS))
        results.results.update(got.results)
    return results


def assert_chats_match(alone: Collector, together: Collector) -> None:
    for i in range(len(QUESTIONS)):
        key = (f"chat{i}", 0)
        assert together[key].token_ids == alone[key].token_ids, (together[key].text, alone[key].text)
        assert together[key].text == alone[key].text


@pytest.mark.slow
def test_chat_answers_are_sensible(chats_alone):
    assert "Paris" in chats_alone["chat0"].text
    assert all(chats_alone[f"chat{i}"].text.strip() for i in range(len(QUESTIONS)))


@pytest.mark.slow
def test_greedy_output_is_batch_invariant(smollm2, workload, chats_alone):
    engine = make_engine(smollm2, 256, max_num_batched_tokens=128)
    steps = []
    engine.events.on_step.append(steps.append)
    together = generate(engine, workload, greedy(MAX_TOKENS))
    assert max(s.num_sequences for s in steps) == 16
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in steps), "no chunked prefill beside decodes"
    assert engine.core.scheduler.num_preemptions == 0
    assert_chats_match(chats_alone, together)


@pytest.mark.slow
def test_greedy_output_survives_preemption(smollm2, workload, chats_alone):
    engine = make_engine(smollm2, 24, max_num_batched_tokens=128)  # the 16 need ~70 blocks
    together = generate(engine, workload, greedy(MAX_TOKENS))
    assert engine.core.scheduler.num_preemptions > 0
    assert_chats_match(chats_alone, together)


@pytest.mark.slow
def test_streamed_chinese_never_splits_a_character(smollm2):
    tok = smollm2.tokenizer
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": "请用中文写一段关于北京的介绍。"}])
                        + "北京是中国的首都，")
    result = generate(make_engine(smollm2, 64), {"zh": prompt}, greedy(MAX_TOKENS))["zh"]
    pieces = [out.new_text for out in result.outputs]
    # Only the final piece may hold U+FFFD: when max_tokens cuts a character, finish() releases its
    # incomplete bytes as tokenizer.decode does. Before that, a partial character is held back.
    assert all("\ufffd" not in piece for piece in pieces[:-1]), pieces
    assert result.text == tok.decode(result.token_ids, skip_special_tokens=True)
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in result.text) >= 4, result.text
    # The test has power only if some token ends inside a character (its bytes are not valid UTF-8).
    assert any(_cuts_a_character(tok, result.token_ids[: k + 1]) for k in range(len(result.token_ids)))


def _cuts_a_character(tok, ids) -> bool:
    try:
        b"".join(tok.token_bytes(t) for t in ids).decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def offline_llm(loaded, **options) -> LLM:
    """An LLM over an already loaded model (LLM() itself would load the weights again)."""
    llm = LLM.__new__(LLM)
    llm.engine = make_engine(loaded, **options)
    llm.tokenizer = llm.engine.tokenizer
    return llm


def test_llm_generate_keeps_prompt_and_sample_order(tiny_loaded):
    llm = offline_llm(tiny_loaded, max_queue=1 << 30)
    prompts = ["Hello there", random_prompt(1, 30), "A third prompt, longer than the first one"]
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, logprobs=0)
    results = llm.generate(prompts, params)
    assert [r.prompt_ids for r in results] == [llm.tokenizer.encode(prompts[0]), prompts[1],
                                               llm.tokenizer.encode(prompts[2])]
    for result in results:
        assert len(result.outputs) == 3
        for completion in result.outputs:
            assert len(completion.token_ids) == 6 and len(completion.logprobs) == 6
            assert completion.finish_reason == "length"
            assert completion.text == llm.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    # Each sample's seed is params.seed + its index, so an index-ordered list is reproducible.
    again = offline_llm(tiny_loaded).generate(prompts[1:2], params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in results[1].outputs]
    assert llm.engine.core.blocks.num_used == 0
    single = llm.generate("just one string", greedy(3))
    assert len(single) == 1 and len(single[0].token_ids) == 3
