"""StructuredOutput: what a request's output must match (plain Python; llguidance is not imported here).

Exactly one of four forms, as the APIs name them:
  json     a JSON schema, as a dict or as JSON text. `{}` is any JSON value, `{"type": "object"}` any
           object (OpenAI's json_object). Properties come out in the schema's order.
  regex    a regular expression (Rust regex syntax) the whole output must match.
  choice   a list of strings; the output is exactly one of them.
  grammar  a Lark grammar in llguidance's dialect (it may embed `%json {...}` schemas).

`param` is the request field the API wants named if the constraint is refused (e.g.
"response_format.json_schema.schema"); the engine uses "structured" when it is None. A malformed form
(two forms set, a schema that is not a JSON object, an empty choice list) raises InvalidParam here, at
construction; whether llguidance accepts the content is decided when it is compiled (see compiler.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from service.engine.validation import InvalidParam

KINDS = ("json", "regex", "choice", "grammar")
DEFAULT_PARAM = "structured"


@dataclass(frozen=True)
class StructuredOutput:
    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    param: str | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise InvalidParam(self.field, f"must set exactly one of {', '.join(KINDS)}, got "
                                           f"{', '.join(given) or 'none'}")
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))  # frozen: no list to mutate later
        _CHECKS[given[0]](self)

    @property
    def field(self) -> str:
        """The field errors name."""
        return self.param or DEFAULT_PARAM

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) is not None)

    @property
    def source(self) -> str:
        """The constraint as one text (the compile cache's key with the kind): a schema as JSON in its own
        key order, which is also the order its properties are generated in."""
        value = getattr(self, self.kind)
        if self.kind == "json":
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if self.kind == "choice":
            return json.dumps(list(value), ensure_ascii=False)
        return value


def _check_json(spec: StructuredOutput) -> None:
    schema = spec.json
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidParam(spec.field, f"is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise InvalidParam(spec.field, f"must be a JSON schema object, got {type(schema).__name__}")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise InvalidParam(spec.field, f"is not JSON-serialisable: {exc}") from exc


def _check_text(kind: str):
    def check(spec: StructuredOutput) -> None:
        value = getattr(spec, kind)
        if not isinstance(value, str) or not value:
            raise InvalidParam(spec.field, "must be a non-empty string")
    return check


def _check_choice(spec: StructuredOutput) -> None:
    if not spec.choice:
        raise InvalidParam(spec.field, "must list at least one string")
    bad = next((c for c in spec.choice if not isinstance(c, str)), None)
    if bad is not None:
        raise InvalidParam(spec.field, f"must list strings, got {bad!r}")


_CHECKS = {"json": _check_json, "regex": _check_text("regex"), "choice": _check_choice,
           "grammar": _check_text("grammar")}
