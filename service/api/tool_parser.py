"""Reading tool calls out of generated text, piece by piece as it streams or all at once.

One parser serves both: the non-streamed answer feeds it the whole text, so the two always agree. It
turns text into events: content, the start of a call (its id and name, once the name is complete) and
pieces of the call's arguments (JSON text, sent as generated). Text that may be the start of
"<tool_call>", and whitespace that may precede one, is held back until the next piece decides it.
The grammar makes every call complete and valid; a call cut by max_tokens keeps what it got.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from service.api.tools import CLOSE, OPEN

# A call's text up to its arguments' first character, as the grammar writes it (name first).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')
_TAIL = re.compile(r"\s*\}\s*" + re.escape(CLOSE))


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Delta:
    """What one piece of text added, in order: ("content", text), ("start", call index, call) and
    ("arguments", call index, text)."""
    events: list[tuple] = field(default_factory=list)

    def openai(self) -> list[dict]:
        """As chat-completion chunk deltas, OpenAI's way: a call's id and name alone in one delta (with
        arguments ""), then its arguments in pieces; content never shares a delta with a call."""
        deltas: list[dict] = []
        current: dict = {}
        for event in self.events:
            if event[0] == "content":
                if "tool_calls" in current:
                    deltas, current = deltas + [current], {}
                current["content"] = current.get("content", "") + event[1]
            elif event[0] == "start":
                _, index, call = event
                deltas += [current] if current else []
                deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
                current = {}
            else:
                _, index, text = event
                if "content" in current:
                    deltas, current = deltas + [current], {}
                calls = current.setdefault("tool_calls", [])
                if calls and calls[-1]["index"] == index:
                    calls[-1]["function"]["arguments"] += text
                else:
                    calls.append({"index": index, "function": {"arguments": text}})
        return deltas + ([current] if current else [])


class ToolCallParser:
    def __init__(self):
        self.calls: list[ParsedCall] = []
        self.content = ""
        self._pending = ""  # text not yet turned into events
        self._in_call = False  # between "<tool_call>" and "</tool_call>"
        self._depth = 0  # JSON nesting inside the current call's arguments
        self._in_string = self._escaped = self._arguments_closed = False

    def feed(self, text: str, final: bool = False) -> Delta:
        delta = Delta()
        self._pending += text
        while self._step(delta, final):
            pass
        if final:
            if self._in_call and (not self.calls or self.calls[-1].complete):
                self._add_content(delta, OPEN + self._pending)  # a call cut before its name: keep it as text
            self._pending = ""
        return delta

    @property
    def finish_reason_override(self) -> str | None:
        """"tool_calls" when the output made calls and finished every one of them."""
        return "tool_calls" if self.calls and all(call.complete for call in self.calls) else None

    def _step(self, delta: Delta, final: bool) -> bool:
        """Consume what can be decided of the pending text; True if it should be called again."""
        if not self._in_call:
            return self._text(delta, final)
        if not self.calls or self.calls[-1].complete:
            return self._head(delta)
        return self._arguments(delta)

    def _text(self, delta: Delta, final: bool) -> bool:
        at = self._pending.find(OPEN)
        if at >= 0:
            self._add_content(delta, self._pending[:at].rstrip())
            self._pending, self._in_call = self._pending[at + len(OPEN):], True
            return True
        keep = 0 if final else _held_back(self._pending)
        self._add_content(delta, self._pending[:len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep:]
        return False

    def _head(self, delta: Delta) -> bool:
        match = _HEAD.match(self._pending)
        if match is None:
            return False
        call = ParsedCall(f"call_{uuid.uuid4().hex[:24]}", json.loads(match.group(1)))
        self.calls.append(call)
        delta.events.append(("start", len(self.calls) - 1, call))
        self._pending = self._pending[match.end():]
        self._depth, self._in_string, self._escaped, self._arguments_closed = 0, False, False, False
        return True

    def _arguments(self, delta: Delta) -> bool:
        call = self.calls[-1]
        if not self._arguments_closed:
            end = self._scan_arguments()
            piece, self._pending = self._pending[:end], self._pending[end:]
            if piece:
                call.arguments += piece
                delta.events.append(("arguments", len(self.calls) - 1, piece))
            self._arguments_closed = self._depth == 0 and bool(call.arguments.strip())
            if not self._arguments_closed:
                return False
        tail = _TAIL.match(self._pending)
        if tail is None:
            return False
        call.complete, self._in_call = True, False
        self._pending = self._pending[tail.end():]
        return True

    def _scan_arguments(self) -> int:
        """How much of the pending text belongs to the arguments: up to where their JSON value closes."""
        for i, char in enumerate(self._pending):
            if self._in_string:
                self._escaped, self._in_string = (False, True) if self._escaped else (char == "\\", char != '"')
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return len(self._pending)

    def _add_content(self, delta: Delta, text: str) -> None:
        if text:
            delta.events.append(("content", text))
            self.content += text


def _held_back(text: str) -> int:
    """Characters at the end of text to hold: a possible start of "<tool_call>" and the whitespace before."""
    keep = next((n for n in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-n:])), 0)
    return keep + len(text[:len(text) - keep]) - len(text[:len(text) - keep].rstrip())
