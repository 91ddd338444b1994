"""Fixtures for the engine tests: a tiny random model over the SmolLM2 vocabulary (the real SmolLM2 model
and tokenizer are tests/conftest.py's `smollm2` and `smollm2_tokenizer`). Helpers that build and drive
engines live in engine_helpers.py."""
from __future__ import annotations

import pytest
import torch

from model.config import tiny
from model.loading import LoadedModel, build_model
from model.loading.weights import random_weights


@pytest.fixture(scope="session")
def tiny_loaded(smollm2_tokenizer) -> LoadedModel:
    """A 2-layer random model with the SmolLM2 vocabulary, so the real tokenizer decodes its output."""
    config = tiny("smollm2-135m", vocab_size=49152, max_position=2048)
    model = build_model(config, random_weights(config, seed=0), "tiny")
    return LoadedModel(model, config, smollm2_tokenizer, "tiny", torch.float32, torch.device("cpu"), 0.0)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Run the engine tests on one intra-op thread. With other processes on the machine, two OpenMP
    threads that wait for each other at every matmul made SmolLM2 steps ~8x slower (measured on
    2 cores); one thread never waits. Restored after each module so other test folders are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
