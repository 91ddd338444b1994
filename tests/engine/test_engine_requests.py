"""What ends a request (length, EOS, stop ids, stop strings, min_tokens) and what the engine refuses
(with the field at fault named), over the tiny random model with the real SmolLM2 tokenizer."""
from __future__ import annotations

import dataclasses

import pytest

from model.tokenizer import TextTokenizer
from service.engine.errors import EngineOverloaded, RequestRejected
from service.engine.request import SamplingParams
from tests.engine.engine_helpers import generate, greedy, make_engine, random_prompt, run_engine

EOS = 2  # <|im_end|>
PLAIN = 1000  # an ordinary token id


@pytest.fixture(scope="module")
def engine(tiny_loaded):
    return make_engine(tiny_loaded, num_blocks=64, max_model_len=512)


def one(engine, params: SamplingParams, prompt=None):
    prompt = prompt if prompt is not None else random_prompt(0, 20)
    return generate(engine, {"x": prompt}, params)["x"]


def test_max_tokens_gives_length(engine):
    result = one(engine, greedy(5))
    assert result.finish_reason == "length" and len(result.token_ids) == 5
    assert result.last.num_output_tokens == 5 and result.last.num_prompt_tokens == 20


def test_eos_stops_and_is_not_in_the_text(engine, smollm2_tokenizer):
    assert smollm2_tokenizer.eos_token_id == EOS
    result = one(engine, greedy(20, logit_bias={EOS: 100.0}))
    assert result.finish_reason == "stop"
    assert result.token_ids == [EOS] and result.text == ""


def test_every_eos_id_of_the_model_ends_a_request(tiny_loaded, smollm2_tokenizer):
    """A model may name several ids that end a generation (Llama 3's <|eot_id|> beside <|end_of_text|>, from
    generation_config.json): each stops a request, as EOS does, and ignore_eos ignores them all."""
    other_eos = 1  # <|im_start|>, standing in for a second EOS id
    tokenizer = TextTokenizer(smollm2_tokenizer.tokenizer, None, EOS, None, extra_eos_ids=(other_eos, EOS))
    assert tokenizer.eos_token_ids == (EOS, other_eos)
    engine = make_engine(dataclasses.replace(tiny_loaded, tokenizer=tokenizer), num_blocks=64)
    result = one(engine, greedy(20, logit_bias={other_eos: 100.0}))
    assert result.finish_reason == "stop" and result.token_ids == [other_eos]
    result = one(engine, greedy(5, logit_bias={other_eos: 100.0}, ignore_eos=True))
    assert result.finish_reason == "length" and result.token_ids == [other_eos] * 5


def test_min_tokens_holds_eos_back(engine):
    # EOS is banned while fewer than min_tokens tokens exist; the next token is then EOS (biased).
    result = one(engine, greedy(20, logit_bias={EOS: 100.0}, min_tokens=3))
    assert result.finish_reason == "stop"
    assert len(result.token_ids) == 4 and result.token_ids[3] == EOS and EOS not in result.token_ids[:3]
    assert result.text != "" and "<|im_end|>" not in result.text


def test_ignore_eos_keeps_going(engine):
    result = one(engine, greedy(6, logit_bias={EOS: 100.0}, ignore_eos=True))
    assert result.finish_reason == "length"
    assert result.token_ids == [EOS] * 6
    assert result.text == ""  # special tokens are skipped by default
    shown = one(engine, greedy(2, logit_bias={EOS: 100.0}, ignore_eos=True, skip_special_tokens=False))
    assert shown.text == "<|im_end|><|im_end|>"


def test_stop_token_ids(engine):
    result = one(engine, greedy(10, logit_bias={PLAIN: 100.0}, stop_token_ids=[PLAIN]))
    assert result.finish_reason == "stop" and result.token_ids == [PLAIN] and result.text == ""
    held = one(engine, greedy(10, logit_bias={PLAIN: 100.0}, stop_token_ids=[PLAIN], min_tokens=2))
    assert held.finish_reason == "stop" and len(held.token_ids) == 3 and held.token_ids[-1] == PLAIN
    assert PLAIN not in held.token_ids[:2]


def test_stop_strings_are_cut_out(engine):
    prompt = random_prompt(7, 30)
    free = one(engine, SamplingParams(temperature=1.0, seed=5, max_tokens=24), prompt)
    text = free.text
    assert len(text) > 20
    stop = text[len(text) // 2: len(text) // 2 + 3]
    expected = text[: text.find(stop)]
    cut = one(engine, SamplingParams(temperature=1.0, seed=5, max_tokens=24, stop=[stop]), prompt)
    assert cut.finish_reason == "stop"
    assert cut.text == expected and stop not in cut.text
    assert len(cut.token_ids) < len(free.token_ids)
    assert free.token_ids[: len(cut.token_ids)] == cut.token_ids
    kept = one(engine, SamplingParams(temperature=1.0, seed=5, max_tokens=24, stop=[stop],
                                      include_stop_str_in_output=True), prompt)
    assert kept.text == expected + stop
    # Streamed pieces never contain a stop string, even where one spans two pieces.
    assert all(stop not in out.new_text for out in cut.outputs)


def test_max_tokens_none_runs_to_the_context_length(engine):
    result = one(engine, SamplingParams(temperature=0, max_tokens=None), random_prompt(1, 500))
    assert result.finish_reason == "length" and len(result.token_ids) == 12


@pytest.mark.parametrize("prompt_len, max_tokens, param", [
    (500, 13, "max_tokens"),  # prompt + max_tokens beyond max_model_len (512)
    (512, 1, "prompt"),  # no room at all for an output token
])
def test_beyond_max_model_len_is_rejected(engine, prompt_len, max_tokens, param):
    with pytest.raises(RequestRejected) as info:
        engine.add_request(random_prompt(2, prompt_len), greedy(max_tokens), "r")
    assert info.value.param == param and param in str(info.value)
    assert not engine.has_unfinished()


def test_beyond_the_whole_cache_is_rejected(tiny_loaded):
    small = make_engine(tiny_loaded, num_blocks=8)  # 128 tokens
    with pytest.raises(RequestRejected) as info:
        small.add_request(random_prompt(3, 120), greedy(9), "fits-prompt-not-output")
    assert info.value.param == "max_tokens" and "KV cache" in str(info.value)
    with pytest.raises(RequestRejected) as info:
        small.add_request(random_prompt(3, 200), greedy(1), "prompt-too-long")
    assert info.value.param == "prompt" and "KV cache" in str(info.value)
    result = generate(small, {"fits": random_prompt(3, 120)}, greedy(8))["fits"]
    assert result.finish_reason == "length" and len(result.token_ids) == 8


@pytest.mark.parametrize("prompt", [[], [5, 49152], [-1, 5]], ids=["empty", "too-big-id", "negative-id"])
def test_bad_prompts_are_rejected(engine, prompt):
    with pytest.raises(RequestRejected) as info:
        engine.add_request(prompt, greedy(4), "bad")
    assert info.value.param == "prompt"
    assert not engine.has_unfinished()


@pytest.mark.parametrize("params, param", [
    (dict(stop_token_ids=[49152]), "stop_token_ids"),
    (dict(logit_bias={-3: 1.0}), "logit_bias"),
])
def test_bad_token_ids_in_params_are_rejected(engine, params, param):
    with pytest.raises(RequestRejected) as info:
        engine.add_request([5, 6], greedy(4, **params), "bad")
    assert info.value.param == param


def test_params_changed_after_construction_are_checked(engine):
    params = greedy(4)
    params.top_p = 0.0
    with pytest.raises(RequestRejected) as info:
        engine.add_request([5, 6], params, "bad")
    assert info.value.param == "top_p"


def test_overload(tiny_loaded):
    engine = make_engine(tiny_loaded, max_queue=2, max_num_seqs=1)
    engine.add_request([5, 6], greedy(2), "a")
    engine.add_request([5, 7], greedy(2), "b")
    with pytest.raises(EngineOverloaded):
        engine.add_request([5, 8], greedy(2), "c")
    engine.step()  # "a" runs; only "b" waits
    with pytest.raises(EngineOverloaded):
        engine.add_request([5, 8], SamplingParams(n=2, max_tokens=2), "pair")  # 1 + 2 > 2
    engine.add_request([5, 8], greedy(2), "c")
    run_engine(engine)
