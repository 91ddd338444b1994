"""Native routes, compatible with text-generation-inference: /generate, /generate_stream, POST /, /info."""
from __future__ import annotations

from fastapi import APIRouter, Request

from model.tokenizer import TextTokenizer
from service import VERSION
from service.api.constraints import check_constraint, from_tgi_grammar
from service.api.errors import APIError
from service.api.generation import Choice, Generation, checked_params
from service.api.schemas_tgi import GenerateRequest
from service.api.sse import sse_event, sse_response
from service.api.state import EngineDep, StateDep
from service.engine import RequestOutput

router = APIRouter(tags=["Native (text-generation-inference compatible)"])


def _finish_reason(reason: str | None, stop_reason) -> str | None:
    if reason == "stop":
        return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"
    return reason


def _token(tokenizer: TextTokenizer, token_id: int, logprob: float | None, text: str | None = None) -> dict:
    return {"id": token_id, "text": tokenizer.token_text(token_id) if text is None else text,
            "logprob": logprob, "special": token_id in tokenizer.special_ids.values()}


def _prompt(body: GenerateRequest, tokenizer: TextTokenizer) -> list[int]:
    ids = tokenizer.encode(body.inputs)
    if body.parameters.truncate:
        ids = ids[-body.parameters.truncate:]
    return ids


def _details(body: GenerateRequest, choice: Choice, prompt: list[int], tokenizer: TextTokenizer) -> dict:
    p = body.parameters
    details = {"finish_reason": _finish_reason(choice.finish_reason, choice.stop_reason),
               "generated_tokens": len(choice.token_ids), "seed": p.seed,
               "prefill": [_token(tokenizer, t, None) for t in prompt] if p.decoder_input_details else [],
               "tokens": [_token(tokenizer, t, lp) for t, lp in zip(choice.token_ids, choice.logprobs)]}
    if p.top_n_tokens:
        details["top_tokens"] = [[_token(tokenizer, t, lp) for t, lp in top] for top in choice.top_logprobs]
    return details


async def _start(body: GenerateRequest, state, engine) -> tuple[list[int], Generation]:
    """The request's prompt ids and its generation, once its grammar (if any) has compiled."""
    prompt = _prompt(body, engine.tokenizer)
    constraint = from_tgi_grammar(body.parameters.grammar)
    await check_constraint(engine, constraint)
    params = checked_params(lambda: body.parameters.sampling_params(constraint))
    return prompt, Generation(engine, [prompt], params, state.settings.request_timeout)


@router.post("/generate", summary="Generate text (text-generation-inference API)")
async def generate(body: GenerateRequest, request: Request, state: StateDep, engine: EngineDep):
    prompt, gen = await _start(body, state, engine)
    choice = (await gen.collect(request))[0]
    text = (body.inputs if body.parameters.return_full_text else "") + choice.text
    response = {"generated_text": text}
    if body.parameters.details:
        response["details"] = _details(body, choice, prompt, engine.tokenizer)
    return response


@router.post("/generate_stream", summary="Generate text as server-sent token events")
async def generate_stream(body: GenerateRequest, state: StateDep, engine: EngineDep):
    _, gen = await _start(body, state, engine)
    return sse_response(_token_events(gen, body, engine.tokenizer))


async def _token_events(gen: Generation, body: GenerateRequest, tokenizer: TextTokenizer):
    text = body.inputs if body.parameters.return_full_text else ""
    count = 0
    async for _, out in gen.outputs():
        if out.error:
            yield sse_event({"error": f"generation failed: {out.error}", "error_type": "generation"})
            return
        text += out.new_text
        count += len(out.new_token_ids)
        yield sse_event(_stream_event(out, tokenizer, text, count, body))


def _stream_event(out: RequestOutput, tokenizer: TextTokenizer, text: str, count: int, body: GenerateRequest) -> dict:
    token_id = out.new_token_ids[0] if out.new_token_ids else tokenizer.eos_token_id or 0
    logprob = out.logprobs[0] if out.logprobs else None
    event = {"index": count, "token": _token(tokenizer, token_id, logprob, out.new_text),
             "generated_text": None, "details": None}
    if out.top_logprobs and body.parameters.top_n_tokens:
        event["top_tokens"] = [_token(tokenizer, t, lp) for t, lp in out.top_logprobs[0]]
    if out.finished:
        event["generated_text"] = text
        event["details"] = {"finish_reason": _finish_reason(out.finish_reason, out.stop_reason),
                            "generated_tokens": out.num_output_tokens, "seed": body.parameters.seed}
    return event


@router.post("/", summary="Generate, streamed or not by the body's `stream` field (TGI's root route)")
async def root(body: GenerateRequest, request: Request, state: StateDep, engine: EngineDep):
    if body.stream:
        return await generate_stream(body, state, engine)
    # text-generation-inference answers a list here (one item per input); its clients read item 0.
    return [await generate(body, request, state, engine)]


@router.get("/info", summary="Model and server limits (text-generation-inference API)")
async def info(state: StateDep):
    info = state.info
    if info is None:
        raise APIError(503, state.not_ready_reason(), None, "unavailable")
    settings = state.settings
    return {"model_id": settings.served_model_name, "model_sha": None, "model_pipeline_tag": "text-generation",
            "model_dtype": info.dtype, "model_device_type": info.device, "model_architecture": info.architecture,
            "max_concurrent_requests": settings.max_num_seqs + settings.max_queue, "max_best_of": 1,
            "max_stop_sequences": 16, "max_input_tokens": info.max_model_len - 1,
            "max_total_tokens": info.max_model_len, "max_batch_total_tokens": info.kv_cache_tokens,
            "max_client_batch_size": 1, "validation_workers": 1, "router": "kvserve", "version": VERSION,
            "sha": None, "docker_label": None}
