"""Shared fixtures for the model tests."""
from __future__ import annotations

import pytest

from model.loading import LoadedModel, load_model


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF), loaded once: it takes ~12 s."""
    return load_model("smollm2")
