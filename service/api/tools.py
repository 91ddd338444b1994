"""Tool calling on /v1/chat/completions: the tools in the prompt, and the grammar their calls must follow.

kvserve's tool-call format is the one Qwen 2.5/3 and Hermes models are trained on, one block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template with its own tools section (it reads `tools`) renders the tools and earlier calls itself.
Any other template (SmolLM2's among them) gets DEFAULT_INSTRUCTIONS and the tools in the system message,
earlier calls as such blocks in the assistant's text, and tool answers in <tool_response> tags.

tool_choice picks the constraint: "none" renders no tools and constrains nothing; "required" or a named
function constrains the whole output to calls of those functions, arguments following each one's
`parameters` schema; "auto" lets the model write text, and once it writes "<tool_call>" the grammar takes
over (a lazy lexeme in llguidance's Lark), so a call, once begun, is valid. Several calls follow each
other directly ("</tool_call><tool_call>"); parallel_tool_calls=false allows one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from model.tokenizer import TextTokenizer
from service.api.errors import APIError
from service.api.schemas_openai import ChatCompletionRequest, ChatMessage, ToolDef
from service.engine.structured import StructuredOutput
from service.engine.structured.compiler import JSON_OPTIONS

OPEN, CLOSE = "<tool_call>", "</tool_call>"
DEFAULT_INSTRUCTIONS = (
    "You can call functions to answer. They are described here as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, write one block per call, with the arguments as a JSON object:\n"
    f'{OPEN}\n{{"name": "<function name>", "arguments": {{<arguments>}}}}\n{CLOSE}\n')
WHEN = {"auto": "If no function is needed, answer in plain text.",
        "required": "Answer by calling at least one of the functions."}


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers and how it lets the model use them."""
    tools: list[ToolDef]
    choice: str  # "auto", "required" or "named"
    callable: list[ToolDef]  # the functions a call may name (one, for a named choice)
    parallel: bool

    def constraint(self) -> StructuredOutput:
        return StructuredOutput(grammar=call_grammar(self.callable, self.choice == "auto", self.parallel),
                                param="tools")


def tool_use(body: ChatCompletionRequest) -> ToolUse | None:
    """The request's ToolUse, or None when no tool may be called; refuses a choice that cannot be met."""
    choice = body.tool_choice or "auto"
    if not body.tools:
        if choice not in ("none", "auto"):
            raise APIError(400, "tool_choice requires tools", "tool_choice", "invalid_value")
        return None
    names = [tool.function.name for tool in body.tools]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise APIError(400, f"tools: two functions are named {duplicate!r}", "tools", "invalid_value")
    if choice == "none":
        return None
    if isinstance(choice, str):
        return ToolUse(body.tools, choice, body.tools, body.parallel_tool_calls)
    named = [tool for tool in body.tools if tool.function.name == choice.function.name]
    if not named:
        raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools "
                            f"({', '.join(names)})", "tool_choice", "invalid_value")
    return ToolUse(body.tools, "named", named, body.parallel_tool_calls)


def call_grammar(functions: list[ToolDef], free_text_first: bool, parallel: bool) -> str:
    """The Lark grammar of the output: calls of `functions`, after free text when free_text_first."""
    if free_text_first:  # text, or text up to the first "<tool_call>" (a lazy lexeme: it ends there), then calls
        start = ["start: TEXT | head calls", "TEXT: /(.|\\n)*/", f"head[lazy]: /(.|\\n)*{OPEN}/"]
    else:
        start = [f"start: {json.dumps(OPEN)} calls"]
    alternatives = " | ".join(f"f{i}" for i in range(len(functions)))
    # Blocks follow each other with no newline between: offered "\n" after a call, SmolLM2 always takes it
    # and then, with only "<tool_call>" or EOS allowed, calls again until max_tokens; without it, it ends.
    rules = [f"calls: body ({json.dumps(OPEN)} body)*" if parallel else "calls: body",
             f"body: {json.dumps(chr(10))} ({alternatives}) {json.dumps(chr(10) + CLOSE)}"]
    rules += [f"f{i}: %json {json.dumps(_call_schema(tool), ensure_ascii=False)}" for i, tool in enumerate(functions)]
    return "\n".join(start + rules) + "\n"


def _call_schema(tool: ToolDef) -> dict:
    """One call of `tool` as JSON: its name, then arguments that follow its parameters schema."""
    return {"type": "object", "x-guidance": JSON_OPTIONS, "additionalProperties": False,
            "properties": {"name": {"const": tool.function.name}, "arguments": tool.function.parameters},
            "required": ["name", "arguments"]}


def template_inputs(messages: list[ChatMessage], use: ToolUse | None,
                    tokenizer: TextTokenizer) -> tuple[list[dict], dict]:
    """The messages as the chat template takes them, and the extra variables it renders with."""
    native = "tools" in (tokenizer.tools_template or "")
    messages = [_message(m, native) for m in messages]
    if use is None:
        return messages, {}
    if native:
        return messages, {"tools": [tool.model_dump(exclude_none=True) for tool in use.tools]}
    listed = "\n".join(json.dumps(tool.model_dump(exclude_none=True), ensure_ascii=False) for tool in use.tools)
    block = DEFAULT_INSTRUCTIONS.replace("{tools}", listed)
    block += WHEN.get(use.choice, WHEN["required"])
    if messages and messages[0]["role"] in ("system", "developer"):
        messages[0] = dict(messages[0], content=f"{messages[0]['content']}\n\n{block}")
    else:
        messages.insert(0, {"role": "system", "content": block})
    return messages, {}


def _message(message: ChatMessage, native: bool) -> dict:
    """One message for the template: earlier calls and tool answers in the form the template expects."""
    out = {"role": message.role, "content": message.text()}
    calls = [(call.id, call.function.name, _arguments(call.function.arguments))
             for call in message.tool_calls or []]
    if native:
        if calls:
            out["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                                 for i, n, a in calls]
        if message.tool_call_id is not None:
            out["tool_call_id"] = message.tool_call_id
        return out
    blocks = [f"{OPEN}\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n{CLOSE}" for _, n, a in calls]
    if blocks:
        out["content"] = "\n".join(([out["content"]] if out["content"] else []) + ["".join(blocks)])
    if message.role == "tool":
        out["content"] = f"<tool_response>\n{out['content']}\n</tool_response>"
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise APIError(400, f"a tool call's arguments must be JSON text: {exc}", "messages", "invalid_value") from exc
