"""The families' real chat templates (the copies llama.cpp keeps in models/templates, which `make test` unpacks
from the llama-cpp-python sdist) render exactly as transformers' apply_chat_template renders them, over
system, multi-turn, generation-prompt and tool conversations; both read the same saved tokenizer folder, so
where the template lives (chat_template.jinja, tokenizer_config.json, named templates), the special tokens'
texts and the several EOS ids of generation_config.json are checked on the way."""
from __future__ import annotations

import json

import pytest
import transformers
from jinja2.exceptions import TemplateError

from model.chat_template import ChatTemplateError
from model.tokenizer import tokenizer_from_folder
from tests.server_process import REPO

TEMPLATES = REPO / ".venv" / "llama.cpp" / "models" / "templates"
# family: (template file, special tokens as the family's tokenizer_config.json names them)
LLAMA3 = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
QWEN = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
FAMILIES = {
    "llama-3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", LLAMA3),
    "llama-3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja", LLAMA3),
    "llama-3.3": ("meta-llama-Llama-3.3-70B-Instruct.jinja", LLAMA3),
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", QWEN),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", QWEN),
    "gemma-2": ("google-gemma-2-2b-it.jinja", {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}),
    "phi-3.5": ("microsoft-Phi-3.5-mini-instruct.jinja", {"bos_token": "<s>", "eos_token": "<|endoftext|>"}),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", {"bos_token": "<s>", "eos_token": "</s>"}),
    "smollm3": ("HuggingFaceTB-SmolLM3-3B.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}),
    "granite-3.3": ("ibm-granite-granite-3.3-2B-Instruct.jinja", {"bos_token": "<|end_of_text|>",
                                                                  "eos_token": "<|end_of_text|>"}),
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                   "required": ["city"]}}}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello! Who are you?"}],
    "system": [{"role": "system", "content": "You answer in one short sentence."},
               {"role": "user", "content": "What is 2 + 2?"}],
    "multi-turn": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."},
                   {"role": "user", "content": "And one above 100, in ünïcode words?"}],
    "tool call": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                      "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C, sunny"}],
}


def saved_folder(tmp_path, smollm2_tokenizer, family: str):
    """A tokenizer folder as transformers saves it (the template in chat_template.jinja), with a
    generation_config.json naming two EOS ids."""
    template_file, special = FAMILIES[family]
    assert TEMPLATES.exists(), f"{TEMPLATES} is missing: `make test` unpacks it (the llama-converter target)"
    smollm2_tokenizer.tokenizer.save(str(tmp_path / "tokenizer.json"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), **special)
    hf.chat_template = (TEMPLATES / template_file).read_text()
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return transformers.AutoTokenizer.from_pretrained(tmp_path), tokenizer_from_folder(tmp_path)


def render_both(hf, ours, messages, add_generation_prompt: bool, tools=None):
    """Each side's text, or the type of error each raised (a template may refuse a conversation)."""
    try:
        expected = hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    except TemplateError:
        expected = TemplateError
    try:
        got = ours.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    except ChatTemplateError:
        got = TemplateError
    return got, expected


@pytest.mark.parametrize("family", list(FAMILIES))
def test_templates_render_as_transformers_renders_them(tmp_path, smollm2_tokenizer, family):
    hf, ours = saved_folder(tmp_path, smollm2_tokenizer, family)
    assert (tmp_path / "chat_template.jinja").exists()  # where transformers 4.43+ saves it
    rendered = 0
    for name, messages in CONVERSATIONS.items():
        tools = [WEATHER] if name == "tool call" else None
        for add_generation_prompt in (True, False):
            got, expected = render_both(hf, ours, messages, add_generation_prompt, tools)
            assert got == expected, (name, add_generation_prompt)
            rendered += expected is not TemplateError
    assert rendered >= 4  # a template that refuses everything would agree trivially


def test_the_folder_gives_every_eos_id_and_the_special_tokens_texts(tmp_path, smollm2_tokenizer):
    hf, ours = saved_folder(tmp_path, smollm2_tokenizer, "qwen2.5")
    assert ours.eos_token_id == hf.convert_tokens_to_ids("<|im_end|>") == 2
    assert ours.eos_token_ids == (2, 0)  # the tokenizer's EOS first, then generation_config.json's others
    assert ours.chat.special_tokens["pad_token"] == "<|endoftext|>"


def test_named_templates_pick_tool_use_for_requests_with_tools(tmp_path, smollm2_tokenizer):
    """tokenizer_config.json may hold a list of named templates (Hermes, Command R): "default", and
    "tool_use" for requests that bring tools, as transformers chooses."""
    _, ours = saved_folder(tmp_path, smollm2_tokenizer, "qwen2.5")
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "plain:{{ messages[0].content }}"},
                               {"name": "tool_use", "template": "tools:{{ tools | length }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), tokenizer_from_folder(tmp_path)
    messages = CONVERSATIONS["user"]
    for tools in (None, [WEATHER]):
        got, expected = render_both(hf, ours, messages, True, tools)
        assert got == expected
    assert ours.render_chat(messages, tools=[WEATHER]) == "tools:1"
