"""What a request's prompt becomes: completion prompts -> token id lists, chat messages -> prompt text."""
from __future__ import annotations

from model.tokenizer import ChatTemplateError, TextTokenizer
from service.api.errors import APIError
from service.api.schemas_openai import ChatMessage
from service.api.tools import ToolUse, template_inputs


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


def chat_text(messages: list[ChatMessage], tokenizer: TextTokenizer, add_generation_prompt: bool,
              use: ToolUse | None = None) -> str:
    """The messages (and the tools they may call) through the model's chat template; one the template
    refuses is a 400 on "messages"."""
    rendered, extra = template_inputs(messages, use, tokenizer)
    try:
        return tokenizer.render_chat(rendered, add_generation_prompt=add_generation_prompt, **extra)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), "messages", "invalid_value") from exc
