"""A request's output constraint, from whichever field of either API asks for one, as the engine's
StructuredOutput; and the compile check that turns a constraint llguidance refuses into a 400.

OpenAI (chat and completions): `response_format` {"type": "json_object"} or {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}; vLLM's `structured_outputs` {"json" | "regex" | "choice" |
"grammar"} and its older spellings `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
TGI: `parameters.grammar` {"type": "json" | "regex", "value"}. At most one of them per request.
"""
from __future__ import annotations

from typing import Any

from service.api.errors import APIError, engine_error
from service.engine.engine import Engine
from service.engine.errors import RequestRejected
from service.engine.request import InvalidParam
from service.engine.structured import StructuredOutput

ANY_OBJECT = {"type": "object"}  # json_object: any JSON object, as OpenAI's JSON mode
VLLM_FORMS = ("json", "regex", "choice", "grammar")


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param, "invalid_value")


def _spec(param: str, **form: Any) -> StructuredOutput:
    try:
        return StructuredOutput(param=param, **form)
    except InvalidParam as exc:
        raise APIError(400, str(exc), exc.param, "invalid_value") from exc


def from_response_format(response_format: dict | None) -> StructuredOutput | None:
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return _spec("response_format", json=ANY_OBJECT)
    if kind == "json_schema":
        config = response_format.get("json_schema")
        if not isinstance(config, dict) or "schema" not in config:
            raise _invalid("response_format.json_schema", "must be an object with a 'schema'")
        # strict or not, the output follows the schema: constrained decoding has no cheaper "loose" mode.
        return _spec("response_format.json_schema.schema", json=config["schema"])
    raise _invalid("response_format.type", f"must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def from_structured_outputs(structured: dict | None, guided: dict[str, Any]) -> StructuredOutput | None:
    """vLLM's `structured_outputs` object, or its older top-level `guided_*` fields."""
    if structured is not None:
        given = {form: structured[form] for form in VLLM_FORMS if structured.get(form) is not None}
        if structured.get("json_object"):
            given["json"] = ANY_OBJECT
        if len(given) != 1:
            raise _invalid("structured_outputs", f"must set exactly one of {', '.join(VLLM_FORMS)}")
        (form, value), = given.items()
        return _spec(f"structured_outputs.{form}", **{form: value})
    given = {form: value for form, value in guided.items() if value is not None}
    if len(given) > 1:
        raise _invalid("guided_" + next(iter(given)), "give only one guided_* field")
    for form, value in given.items():
        return _spec(f"guided_{form}", **{form: value})
    return None


def one_constraint(*specs: StructuredOutput | None) -> StructuredOutput | None:
    """The request's one constraint; two fields asking for one is a 400 naming the second."""
    given = [spec for spec in specs if spec is not None]
    if len(given) > 1:
        raise _invalid(given[1].field.split(".")[0], f"cannot be combined with {given[0].field.split('.')[0]}")
    return given[0] if given else None


def from_openai(body) -> StructuredOutput | None:
    """The constraint of a /v1 request body (schemas_openai.SamplingFields)."""
    guided = {"json": body.guided_json, "regex": body.guided_regex, "choice": body.guided_choice,
              "grammar": body.guided_grammar}
    return one_constraint(from_response_format(body.response_format),
                          from_structured_outputs(body.structured_outputs, guided))


def from_tgi_grammar(grammar: dict | None) -> StructuredOutput | None:
    """TGI's parameters.grammar: {"type": "json", "value": schema} or {"type": "regex", "value": pattern}."""
    if grammar is None:
        return None
    kind, value = grammar.get("type"), grammar.get("value")
    if kind == "json":
        return _spec("parameters.grammar.value", json=value)
    if kind == "regex":
        return _spec("parameters.grammar.value", regex=value)
    raise _invalid("parameters.grammar.type", f"must be 'json' or 'regex', got {kind!r}")


async def check_constraint(engine: Engine, spec: StructuredOutput | None) -> None:
    """Compile the constraint now (off the event loop; cached, so the submit after it finds it ready)
    and answer 400, naming the field and llguidance's reason, if it does not compile."""
    if spec is None:
        return
    try:
        await engine.check_structured(spec)
    except RequestRejected as exc:
        raise engine_error(exc) from exc
