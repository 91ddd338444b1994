"""Health, tokenization and detokenization routes."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.errors import APIError
from service.api.prompts import chat_text
from service.api.schemas_openai import DetokenizeRequest, TokenizeRequest
from service.api.state import EngineDep, StateDep, check_model_name

router = APIRouter(tags=["Server"])


@router.get("/health", summary="200 when ready to serve; 503 while loading, draining, or if the engine died")
async def health(state: StateDep):
    if state.ready:
        return {"status": "ok"}
    return JSONResponse({"status": "unavailable", "reason": state.not_ready_reason()}, status_code=503,
                        headers={"Retry-After": "1"})


@router.post("/tokenize", summary="Text or chat messages -> token ids (vLLM shape; TGI's {inputs} too)")
async def tokenize(body: TokenizeRequest, state: StateDep, engine: EngineDep):
    check_model_name(state, body.model)
    tokenizer = engine.tokenizer
    if body.inputs is not None:  # text-generation-inference: a list of tokens with offsets
        return [{"id": i, "text": body.inputs[start:stop], "start": start, "stop": stop}
                for i, start, stop in tokenizer.encode_with_offsets(body.inputs)]
    if body.messages is not None:
        text = chat_text(body.messages, tokenizer, body.add_generation_prompt)
    elif body.prompt is not None or body.text is not None:
        text = body.prompt if body.prompt is not None else body.text
    else:
        raise APIError(400, "one of prompt (or text), messages or inputs is required", "prompt", "missing")
    tokens = tokenizer.encode(text)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.info().max_model_len}


@router.post("/detokenize", summary="Token ids -> text")
async def detokenize(body: DetokenizeRequest, state: StateDep, engine: EngineDep):
    check_model_name(state, body.model)
    vocab = engine.tokenizer.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens", "invalid_value")
    return {"prompt": engine.tokenizer.decode(body.tokens)}
