"""Tool calling on /v1/chat/completions against the session server, with the real `openai` client:
`required` with three tools always yields calls whose arguments validate, a named function and
parallel_tool_calls=false are obeyed, streamed and whole answers agree (and the stream helpers assemble
them), `auto` and `none`, and a history with earlier calls and tool answers."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow
MODEL = "smollm2"


def function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


TOOLS = [
    function("get_weather", "The current weather in a city.",
             {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
             ["city", "unit"]),
    # Bounded, as every string here: sampled, a small model can spell an unbounded one until max_tokens.
    function("get_time", "The time in a timezone.",
             {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]{1,14}/[A-Z][a-z_]{1,14}$"}}, ["timezone"]),
    function("add", "Add two integers.", {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                          "b": {"type": "integer", "minimum": -999, "maximum": 999}}, ["a", "b"]),
]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTIONS = ["What is the weather in Paris?", "What time is it in Tokyo?", "What is 12 plus 30?",
             "Is it raining in Berlin, and what time is it there?"]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        yield client


def ask(client, question: str, **options):
    options = {"temperature": 0, "max_tokens": 160, **options}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          tools=TOOLS, **options)


def calls_of(choice, cut_allowed: bool = False) -> list[tuple[str, dict]]:
    """The choice's calls as (name, arguments), each checked against its function's parameters. With
    cut_allowed, a sampled answer that went on calling until max_tokens keeps its complete calls."""
    calls = []
    made = choice.message.tool_calls or []
    if cut_allowed and choice.finish_reason == "length":
        made = made[:-1] if made and not _is_json(made[-1].function.arguments) else made
    else:
        assert choice.finish_reason == "tool_calls", (choice.finish_reason, choice.message)
    for call in made:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, PARAMETERS[call.function.name])
        calls.append((call.function.name, arguments))
    assert calls
    return calls


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("question", QUESTIONS)
def test_required_always_yields_valid_calls(client, question):
    completion = ask(client, question, tool_choice="required", temperature=1.0, seed=9, n=3)
    for choice in completion.choices:
        calls_of(choice, cut_allowed=True)
    greedy = ask(client, question, tool_choice="required").choices[0]
    calls_of(greedy)


def test_a_named_function_is_the_one_called(client):
    completion = ask(client, "What is the weather in Rome?", tool_choice={"type": "function",
                                                                          "function": {"name": "add"}}, n=2,
                     temperature=0.8, seed=2)
    for choice in completion.choices:
        assert {name for name, _ in calls_of(choice, cut_allowed=True)} == {"add"}


def test_parallel_tool_calls_false_allows_one_call(client):
    completion = ask(client, QUESTIONS[3], tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                     seed=4, n=3)
    assert all(len(calls_of(choice)) == 1 for choice in completion.choices)


def test_streamed_calls_agree_with_the_whole_answer(client):
    whole = calls_of(ask(client, QUESTIONS[0], tool_choice="required").choices[0])
    chunks = list(ask(client, QUESTIONS[0], tool_choice="required", stream=True))
    deltas = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    first = deltas[0]  # OpenAI's shape: the id and name come first, the arguments after, in pieces
    assert first.id and first.function.name == whole[0][0] and first.function.arguments == ""
    assert all(delta.id is None and delta.function.name is None for delta in deltas[1:] if delta.index == 0)
    arguments = "".join(d.function.arguments for d in deltas if d.index == 0)
    assert json.loads(arguments) == whole[0][1] and len([d for d in deltas if d.index == 0]) > 2
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                        tools=TOOLS, tool_choice="required", max_tokens=160, temperature=0) as stream:
        assembled = stream.get_final_completion().choices[0]
    assert calls_of(assembled) == whole


def test_auto_answers_in_text_or_in_valid_calls(client):
    for question in ["Tell me a joke.", *QUESTIONS]:
        choice = ask(client, question).choices[0]
        if choice.message.tool_calls:
            calls_of(choice)
        else:
            assert choice.finish_reason in ("stop", "length") and choice.message.content


def test_none_calls_nothing(client):
    choice = ask(client, QUESTIONS[0], tool_choice="none", max_tokens=24).choices[0]
    assert not choice.message.tool_calls and choice.message.content
    assert choice.finish_reason in ("stop", "length")


def test_a_history_with_calls_and_tool_answers(client):
    messages = [{"role": "user", "content": QUESTIONS[0]},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'}]
    completion = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                                max_tokens=32, temperature=0)
    assert completion.choices[0].message.content and completion.usage.prompt_tokens > 100
