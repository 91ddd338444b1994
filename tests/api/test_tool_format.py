"""The tool-call format without a server: the grammar (compiled by llguidance over SmolLM2's tokenizer)
forces a call once "<tool_call>" begins and refuses text where calls are required; the parser reads the
same calls and content however the text is split into pieces; the tools reach the prompt."""
from __future__ import annotations

import json
import types

import llguidance
import pytest

from service.api.schemas_openai import ChatMessage, ToolDef
from service.api.tool_parser import ToolCallParser
from service.api.tools import ToolUse, call_grammar, template_inputs
from service.engine.structured.compiler import llguidance_tokenizer

WEATHER = ToolDef.model_validate({"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
TIME = ToolDef.model_validate({"type": "function", "function": {"name": "get_time"}})
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TWO_CALLS = 'Let me look.\n' + CALL + '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def matcher(tokenizer):
    ll_tokenizer = llguidance_tokenizer(tokenizer, 49152)

    def make(free_text_first: bool, parallel: bool = True) -> llguidance.LLMatcher:
        grammar = llguidance.LLMatcher.grammar_from_lark(call_grammar([WEATHER, TIME], free_text_first, parallel))
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher
    return make


def accepts(matcher: llguidance.LLMatcher, tokenizer, text: str) -> bool:
    """The grammar takes text as a whole output (text, then EOS)."""
    matcher.consume_tokens(tokenizer.encode(text))
    return not matcher.is_error() and matcher.is_accepting()


def test_auto_takes_text_or_calls(matcher, tokenizer):
    assert accepts(matcher(True), tokenizer, "It is sunny in Paris, I think.")
    assert accepts(matcher(True), tokenizer, TWO_CALLS)
    assert accepts(matcher(True), tokenizer, CALL)


@pytest.mark.parametrize("text", ["Sure. <tool_call>\nI will not", "<tool_call>\n" + '{"name": "delete_all"',
                                  '<tool_call>\n{"name": "get_weather", "arguments": {"town": "x"}}',
                                  CALL + " and some text after it"])
def test_a_call_once_begun_must_be_valid(matcher, tokenizer, text):
    assert not accepts(matcher(True), tokenizer, text)


def test_required_refuses_text_and_one_call_means_one(matcher, tokenizer):
    assert not accepts(matcher(False), tokenizer, "It is sunny.")
    assert accepts(matcher(False), tokenizer, TWO_CALLS.removeprefix("Let me look.\n"))
    assert accepts(matcher(False, parallel=False), tokenizer, CALL)
    assert not accepts(matcher(False, parallel=False), tokenizer, TWO_CALLS.removeprefix("Let me look.\n"))


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 8, 1000])
def test_the_parser_reads_the_same_whatever_the_pieces(piece):
    whole = ToolCallParser()
    whole.feed(TWO_CALLS, final=True)
    assert whole.content == "Let me look." and whole.finish_reason_override == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == [("get_weather", {"city": "Paris"}),
                                                                       ("get_time", {})]
    parser, arguments, names = ToolCallParser(), {}, []
    for start in range(0, len(TWO_CALLS), piece):
        deltas = parser.feed(TWO_CALLS[start:start + piece]).openai()
        assert all(set(delta) in ({"content"}, {"tool_calls"}) for delta in deltas), deltas
        for call in [call for delta in deltas for call in delta.get("tool_calls", [])]:
            names += [call["function"]["name"]] if "name" in call["function"] else []
            arguments[call["index"]] = arguments.get(call["index"], "") + call["function"]["arguments"]
    parser.feed("", final=True)
    assert parser.content == whole.content and names == ["get_weather", "get_time"]
    assert [arguments[0], arguments[1]] == [c.arguments for c in whole.calls]


def test_the_parser_keeps_what_a_cut_left():
    cut = ToolCallParser()
    cut.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', final=True)
    assert cut.calls[0].arguments == '{"city": "Pa' and cut.finish_reason_override is None
    before_name = ToolCallParser()
    before_name.feed('Well <tool_call>\n{"na', final=True)
    assert before_name.content.endswith('<tool_call>\n{"na') and not before_name.calls
    text_only = ToolCallParser()
    text_only.feed("a < b, and <tool_", final=True)  # held back as a possible "<tool_call>", then released
    assert text_only.content == "a < b, and <tool_" and text_only.finish_reason_override is None


def test_tools_reach_the_prompt(tokenizer):
    use = ToolUse([WEATHER, TIME], "auto", [WEATHER, TIME], True)
    messages = [ChatMessage(role="user", content="Weather?"),
                ChatMessage.model_validate({"role": "assistant", "tool_calls": [
                    {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}),
                ChatMessage(role="tool", tool_call_id="c1", content="rain")]
    rendered, extra = template_inputs(messages, use, tokenizer)  # SmolLM2's template has no tools section
    assert extra == {} and rendered[0]["role"] == "system" and '"name": "get_weather"' in rendered[0]["content"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' == rendered[2]["content"]
    assert rendered[3] == {"role": "tool", "content": "<tool_response>\nrain\n</tool_response>"}
    native = types.SimpleNamespace(tools_template="{% for tool in tools %}{{ tool }}{% endfor %}")
    rendered, extra = template_inputs(messages, use, native)
    assert [tool["function"]["name"] for tool in extra["tools"]] == ["get_weather", "get_time"]
    assert rendered[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert rendered[2]["tool_call_id"] == "c1"
