"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from model.tokenizer import TextTokenizer
from service.api.constraints import check_constraint, from_openai, one_constraint
from service.api.errors import APIError
from service.api.generation import Choice, Generation, checked_params
from service.api.prompts import chat_text, prompt_ids
from service.api.schemas_openai import ChatCompletionRequest, CompletionRequest
from service.api.sse import sse_response
from service.api.state import EngineDep, StateDep, check_model_name
from service.api.streaming import ChunkFormat, openai_stream
from service.api.tool_parser import ToolCallParser
from service.api.tools import ToolUse, tool_use

router = APIRouter(tags=["OpenAI-compatible"])


def _completion_logprobs(choice: Choice, tokenizer: TextTokenizer, offset: int) -> dict:
    tokens = [tokenizer.token_text(t) for t in choice.token_ids]
    offsets, position = [], offset
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {"tokens": tokens, "token_logprobs": choice.logprobs,
            "top_logprobs": [{tokenizer.token_text(t): lp for t, lp in top} for top in choice.top_logprobs],
            "text_offset": offsets}


def _chat_logprobs(choice: Choice, tokenizer: TextTokenizer) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        raw = tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [dict(entry(t, lp), top_logprobs=[entry(i, v) for i, v in top])
                        for t, lp, top in zip(choice.token_ids, choice.logprobs, choice.top_logprobs)]}


@router.get("/v1/models", summary="The model this server serves")
async def models(state: StateDep):
    return {"object": "list", "data": [{"id": state.settings.served_model_name, "object": "model",
                                        "created": int(time.time()), "owned_by": "kvserve",
                                        "max_model_len": state.info and state.info.max_model_len,
                                        "architecture": state.info and state.info.architecture}]}


@router.post("/v1/completions", summary="Text completion (OpenAI API)")
async def completions(body: CompletionRequest, request: Request, state: StateDep, engine: EngineDep):
    check_model_name(state, body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix", "unsupported")
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of must equal n (kvserve returns every sample)", "best_of", "unsupported")
    tokenizer = engine.tokenizer
    prompts = prompt_ids(body.prompt, tokenizer)
    constraint = from_openai(body)
    await check_constraint(engine, constraint)
    params = checked_params(lambda: body.sampling_params(body.max_tokens, body.logprobs, constraint))
    gen = Generation(engine, prompts, params, state.settings.request_timeout, body.priority)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.settings.served_model_name}
    echoes = [tokenizer.decode(p) if body.echo else "" for p in prompts]
    if body.stream:
        return sse_response(openai_stream(gen, head, _completion_chunks(body, echoes, tokenizer)))
    choices = await gen.collect(request)
    return dict(head, usage=gen.usage(), choices=[{
        "index": c.index, "text": echoes[c.index // body.n] + c.text, "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
        "logprobs": _completion_logprobs(c, tokenizer, len(echoes[c.index // body.n]))
        if body.logprobs is not None else None} for c in choices])


def _completion_chunks(body: CompletionRequest, echoes: list[str], tokenizer: TextTokenizer) -> ChunkFormat:
    def render(piece: Choice) -> list[dict]:
        return [{"index": piece.index, "text": piece.text, "finish_reason": piece.finish_reason,
                 "logprobs": _completion_logprobs(piece, tokenizer, 0) if body.logprobs is not None else None}]

    return ChunkFormat(render, wants_logprobs=body.logprobs is not None, include_usage=body.include_usage,
                       lead=lambda index: echoes[index // body.n])


@router.post("/v1/chat/completions", summary="Chat completion with the model's chat template (OpenAI API)")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep, engine: EngineDep):
    check_model_name(state, body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs", "invalid_value")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    use = tool_use(body)
    constraint = one_constraint(from_openai(body), use and use.constraint())
    await check_constraint(engine, constraint)
    params = checked_params(lambda: body.sampling_params(max_tokens, logprobs, constraint))
    prompt = engine.tokenizer.encode(chat_text(body.messages, engine.tokenizer, body.add_generation_prompt, use))
    gen = Generation(engine, [prompt], params, state.settings.request_timeout, body.priority)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": state.settings.served_model_name}
    if body.stream:
        return sse_response(openai_stream(gen, dict(head, object="chat.completion.chunk"),
                                          _chat_chunks(body, engine.tokenizer, use)))
    choices = await gen.collect(request)
    return dict(head, object="chat.completion", usage=gen.usage(), choices=[dict(
        _assistant_message(c, use), index=c.index,
        logprobs=_chat_logprobs(c, engine.tokenizer) if body.logprobs else None,
        stop_reason=c.stop_reason) for c in choices])


def _assistant_message(choice: Choice, use: ToolUse | None) -> dict:
    """A whole choice's message and finish_reason: with tools, its calls read out of the text."""
    if use is None:
        return {"message": {"role": "assistant", "content": choice.text}, "finish_reason": choice.finish_reason}
    parser = ToolCallParser()
    parser.feed(choice.text, final=True)
    message = {"role": "assistant", "content": parser.content or None}
    if parser.calls:
        message["tool_calls"] = [call.as_openai() for call in parser.calls]
    return {"message": message, "finish_reason": _tools_finish_reason(parser, choice.finish_reason)}


def _tools_finish_reason(parser: ToolCallParser, reason: str | None) -> str | None:
    # A grammar that ends after its calls finishes as "stop"; OpenAI calls that "tool_calls".
    return "tool_calls" if reason == "stop" and parser.finish_reason_override else reason


def _chat_chunks(body: ChatCompletionRequest, tokenizer: TextTokenizer, use: ToolUse | None) -> ChunkFormat:
    parsers = [ToolCallParser() for _ in range(body.n)] if use is not None else []

    def render(piece: Choice) -> list[dict]:
        deltas, finish = [{"content": piece.text} if piece.text else {}], piece.finish_reason
        if parsers:
            parser = parsers[piece.index]
            deltas = parser.feed(piece.text, final=finish is not None).openai()
            finish = _tools_finish_reason(parser, finish)
            if not deltas and (finish is not None or body.logprobs):
                deltas = [{}]  # nothing to show (text held back: maybe a call's start), but an end or logprobs
        # The piece's end and logprobs go with its last delta.
        return [{"index": piece.index, "delta": delta, "finish_reason": finish if last else None,
                 "logprobs": _chat_logprobs(piece, tokenizer) if body.logprobs and last else None}
                for delta, last in zip(deltas, [False] * (len(deltas) - 1) + [True])]

    # Each choice opens with the assistant's role, before any token is generated.
    roles = [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
              "finish_reason": None} for index in range(body.n)]
    return ChunkFormat(render, wants_logprobs=body.logprobs, include_usage=body.include_usage, opening=roles)
