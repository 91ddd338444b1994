"""Constrained decoding without a model: the StructuredOutput forms, llguidance compiles and refusals, the
compile cache, and the sampler's grammar mask composed with greedy, top-k, logit_bias, min_tokens and
sampling (SmolLM2's real tokenizer)."""
from __future__ import annotations

import pytest
import torch

from service.engine.errors import RequestRejected
from service.engine.request import InvalidParam, SamplingParams
from service.engine.sampler import Sampler, SamplingRow
from service.engine.structured import StructuredOutput
from service.engine.structured.compiler import GrammarCompiler

V = 49152
EOS = 2


@pytest.fixture(scope="module")
def compiled_log():
    return []


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer, compiled_log):
    compiler = GrammarCompiler(smollm2_tokenizer, V, listeners=[lambda *event: compiled_log.append(event)])
    yield compiler
    compiler.shutdown()


def state(compiler, **spec):
    compiled = compiler.compile(StructuredOutput(**spec)).result(timeout=30)
    assert compiled.error is None, compiled.error
    return compiled.new_state()


def row(grammar=None, output=(), stop_ids=(EOS,), **params) -> SamplingRow:
    params.setdefault("temperature", 0)
    return SamplingRow(SamplingParams(**params), [5, 6], list(output), None, list(stop_ids), grammar)


def allowed_ids(grammar, stop_ids=(EOS,), **params) -> set[int]:
    logits = torch.zeros(1, V)
    sampler_row = row(grammar, stop_ids=stop_ids, **params)
    masked = Sampler(V)._adjust(logits, [sampler_row])
    return set(torch.nonzero(masked[0] > float("-inf")).flatten().tolist())


@pytest.mark.parametrize("spec, message", [
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1, 2]}, "JSON schema object"),
    ({"regex": ""}, "non-empty string"),
    ({"choice": []}, "at least one"),
    ({"choice": ["a", 1]}, "strings"),
    ({"grammar": ""}, "non-empty string"),
])
@pytest.mark.parametrize("param", [None, "response_format.json_schema"])
def test_malformed_constraints_are_refused_naming_the_field(spec, message, param):
    with pytest.raises(InvalidParam, match=message) as info:
        StructuredOutput(**spec, param=param)
    assert info.value.param == (param or "structured")


@pytest.mark.parametrize("spec, reason", [
    ({"json": {"type": "objectx"}}, "objectx"),
    ({"json": '{"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}'}, "missing"),
    ({"regex": "a(b"}, "unclosed group"),
    ({"grammar": "start: foo"}, "unknown name"),
])
def test_constraints_llguidance_refuses_name_the_field_and_reason(compiler, spec, reason):
    spec = StructuredOutput(**spec, param="structured_outputs")
    compiled = compiler.compile(spec).result(timeout=30)
    assert compiled.template is None and reason in compiled.error
    with pytest.raises(RequestRejected, match=reason) as info:
        compiled.check(spec)
    assert info.value.param == "structured_outputs" and str(info.value).startswith("structured_outputs: invalid")


def test_a_repeated_constraint_is_compiled_once(compiler, compiled_log):
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}}
    first = compiler.compile(StructuredOutput(json=schema))
    first.result(timeout=30)
    count = len(compiled_log)
    again = compiler.compile(StructuredOutput(json=dict(schema), param="other"))  # same text, other field
    assert again is first and len(compiled_log) == count
    kind, seconds, error = next(event for event in compiled_log if event[0] == "json" and event[2] is None)
    assert 0 < seconds < 5


def test_choice_allows_only_prefixes_of_the_choices(compiler, smollm2_tokenizer):
    allowed = allowed_ids(state(compiler, choice=["yes", "no", 'say "hi"']))
    assert allowed and EOS not in allowed
    for token in allowed:
        text = smollm2_tokenizer.token_text(token)
        assert any(choice.startswith(text) for choice in ("yes", "no", 'say "hi"')), text


def test_the_mask_comes_before_greedy_top_k_and_bias(compiler, smollm2_tokenizer):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    digits = state(compiler, regex="[0-9]+")
    allowed = allowed_ids(digits)
    banned_best = int(logits[0].argmax())
    assert banned_best not in allowed  # a random argmax is not a digit token
    best_allowed = max(allowed, key=lambda t: float(logits[0, t]))
    rows = [row(digits, logit_bias={banned_best: 100.0}),
            row(state(compiler, regex="[0-9]+"), temperature=1.0, top_k=1),
            row()]  # unconstrained: untouched by its neighbours' masks
    tokens = Sampler(V)(logits[[0, 0, 2]], rows).token_ids
    assert tokens == [best_allowed, best_allowed, int(logits[2].argmax())]


def test_sampled_tokens_are_always_allowed(compiler):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    allowed = allowed_ids(state(compiler, json=schema))
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1)).expand(300, V)
    rows = [row(state(compiler, json=schema), temperature=1.5, top_p=0.95) for _ in range(300)]  # one matcher each
    tokens = Sampler(V, seed=3)(logits, rows).token_ids
    assert set(tokens) <= allowed and len(set(tokens)) > 1


def test_min_tokens_holds_eos_back_unless_the_grammar_must_end(compiler, smollm2_tokenizer):
    open_ended = state(compiler, regex="(ab)+")
    complete = state(compiler, choice=["ab"])
    for grammar in (open_ended, complete):
        for token in smollm2_tokenizer.encode("ab"):
            grammar.consume(token)
    assert EOS in allowed_ids(open_ended) and len(allowed_ids(open_ended)) > 1
    assert EOS not in allowed_ids(open_ended, min_tokens=5)  # something else is allowed: EOS waits
    assert complete.has_ended and allowed_ids(complete) == {EOS}
    assert allowed_ids(complete, min_tokens=5) == {EOS}  # nothing else is: the grammar wins


def test_a_refused_token_puts_the_state_in_error(compiler, smollm2_tokenizer):
    grammar = state(compiler, regex="[0-9]+")
    grammar.consume(smollm2_tokenizer.encode("x")[0])
    assert grammar.has_ended and grammar.error
