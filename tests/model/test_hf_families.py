"""Model families from Hugging Face folders against transformers' own implementation (the referee, a
test-only dependency), on tiny random checkpoints (families.py); and a family or RoPE scaling kvserve does
not run fails at load in one line."""
from __future__ import annotations

import json

import pytest
import transformers

from model.loading import load_model
from model.loading.hf_folder import GEMMA3_TEXT_DEFAULTS
from model.loading.weights import LoadError
from tests.model.families import FAMILIES, assert_runs_like, checkpoint


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_and_decode_match_transformers(tmp_path_factory, smollm2_tokenizer, family):
    reference, folder = checkpoint(tmp_path_factory, smollm2_tokenizer, family)
    loaded = load_model(str(folder))
    assert loaded.config.architecture == reference.config.get_text_config().model_type
    assert_runs_like(loaded, reference)


@pytest.mark.parametrize(("change", "words"), [
    ({"rope_scaling": {"rope_type": "mrope", "factor": 2.0}}, ["'mrope'", "supported: linear, llama3, yarn, dynamic"]),
    ({"model_type": "gemma4"}, ["unsupported model_type 'gemma4'", "qwen3"]),
])
def test_an_unsupported_family_or_scaling_fails_in_one_line(tmp_path_factory, smollm2_tokenizer, change, words):
    _, folder = checkpoint(tmp_path_factory, smollm2_tokenizer, "llama3")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(LoadError) as error:
        load_model(str(folder))
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_gemma3_defaults_are_transformers_own():
    """Published Gemma 3 configs leave fields at Gemma3TextConfig's defaults out of text_config; kvserve fills
    them in from its own table, which must be transformers' defaults."""
    defaults = transformers.Gemma3TextConfig()
    assert {name: getattr(defaults, name) for name in GEMMA3_TEXT_DEFAULTS} == GEMMA3_TEXT_DEFAULTS
