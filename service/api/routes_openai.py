"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from model.tokenizer import ChatTemplateError, TextTokenizer
from service.api.errors import APIError
from service.api.generation import Choice, Generation, checked_params
from service.api.schemas_openai import ChatCompletionRequest, CompletionRequest
from service.api.sse import sse_event, sse_response
from service.api.state import EngineDep, StateDep, check_model_name

router = APIRouter(tags=["OpenAI-compatible"])


def prompt_ids(prompt, tokenizer: TextTokenizer) -> list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of lists of ids -> id lists."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]


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
                                        "max_model_len": state.info and state.info.max_model_len}]}


@router.post("/v1/completions", summary="Text completion (OpenAI API)")
async def completions(body: CompletionRequest, request: Request, state: StateDep, engine: EngineDep):
    check_model_name(state, body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix", "unsupported")
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of must equal n (kvserve returns every sample)", "best_of", "unsupported")
    tokenizer = engine.tokenizer
    prompts = prompt_ids(body.prompt, tokenizer)
    params = checked_params(lambda: body.sampling_params(body.max_tokens, body.logprobs))
    gen = Generation(engine, prompts, params, state.settings.request_timeout, body.priority)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.settings.served_model_name}
    echoes = [tokenizer.decode(p) if body.echo else "" for p in prompts]
    if body.stream:
        return sse_response(_stream_completion(gen, head, body, echoes, tokenizer))
    choices = await gen.collect(request)
    return dict(head, usage=gen.usage(), choices=[{
        "index": c.index, "text": echoes[c.index // body.n] + c.text, "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
        "logprobs": _completion_logprobs(c, tokenizer, len(echoes[c.index // body.n]))
        if body.logprobs is not None else None} for c in choices])


def _error_event(error: str) -> str:
    return sse_event({"error": {"message": f"generation failed: {error}", "type": "internal_error",
                                "param": None, "code": "generation_error"}})


async def _stream_completion(gen: Generation, head: dict, body: CompletionRequest, echoes, tokenizer):
    started = set()
    async for index, out in gen.outputs():
        if out.error:
            yield _error_event(out.error)
            continue
        text = out.new_text
        if index not in started:
            started.add(index)
            text = echoes[index // body.n] + text
        if not text and not out.finished and body.logprobs is None:
            continue  # text held back (incomplete character or possible stop string)
        choice = Choice(index, token_ids=out.new_token_ids, logprobs=out.logprobs or [],
                        top_logprobs=out.top_logprobs or [])
        yield sse_event(dict(head, choices=[{
            "index": index, "text": text, "finish_reason": out.finish_reason,
            "logprobs": _completion_logprobs(choice, tokenizer, 0) if body.logprobs is not None else None}]))
    if body.include_usage:
        yield sse_event(dict(head, choices=[], usage=gen.usage()))
    yield sse_event("[DONE]")


def _chat_prompt(body: ChatCompletionRequest, tokenizer: TextTokenizer) -> list[int]:
    if body.tools:
        raise APIError(400, "tools are not supported by this model", "tools", "unsupported")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format type 'text' is supported", "response_format", "unsupported")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.render_chat(messages, add_generation_prompt=body.add_generation_prompt)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), "messages", "invalid_value") from exc
    return tokenizer.encode(text)


@router.post("/v1/chat/completions", summary="Chat completion with the model's chat template (OpenAI API)")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep, engine: EngineDep):
    check_model_name(state, body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs", "invalid_value")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = checked_params(lambda: body.sampling_params(max_tokens, logprobs))
    gen = Generation(engine, [_chat_prompt(body, engine.tokenizer)], params, state.settings.request_timeout,
                     body.priority)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": state.settings.served_model_name}
    if body.stream:
        return sse_response(_stream_chat(gen, dict(head, object="chat.completion.chunk"), body, engine.tokenizer))
    choices = await gen.collect(request)
    return dict(head, object="chat.completion", usage=gen.usage(), choices=[{
        "index": c.index, "message": {"role": "assistant", "content": c.text},
        "logprobs": _chat_logprobs(c, engine.tokenizer) if body.logprobs else None,
        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in choices])


async def _stream_chat(gen: Generation, head: dict, body: ChatCompletionRequest, tokenizer: TextTokenizer):
    for index in range(body.n):
        yield sse_event(dict(head, choices=[{"index": index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]))
    async for index, out in gen.outputs():
        if out.error:
            yield _error_event(out.error)
            continue
        if not out.new_text and not out.finished and not body.logprobs:
            continue
        choice = Choice(index, token_ids=out.new_token_ids, logprobs=out.logprobs or [],
                        top_logprobs=out.top_logprobs or [])
        delta = {"content": out.new_text} if out.new_text else {}
        yield sse_event(dict(head, choices=[{
            "index": index, "delta": delta, "finish_reason": out.finish_reason,
            "logprobs": _chat_logprobs(choice, tokenizer) if body.logprobs else None}]))
    if body.include_usage:
        yield sse_event(dict(head, choices=[], usage=gen.usage()))
    yield sse_event("[DONE]")
