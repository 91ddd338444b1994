"""Fixtures shared by every test folder."""
from __future__ import annotations

import pytest

from model.loading import LoadedModel, load_model, smollm2_path
from model.loading.gguf_file import open_gguf
from model.tokenizer import TextTokenizer, tokenizer_from_gguf
from tests.server_process import ServerProcess


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) in float32, loaded once for every test
    folder: it takes ~12 s."""
    return load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> TextTokenizer:
    """The real SmolLM2 tokenizer alone (no weights), read from the GGUF file's metadata."""
    path = smollm2_path()
    return tokenizer_from_gguf(open_gguf(path), path)


@pytest.fixture(scope="session")
def server():
    """One real kvserve process with the default model (SmolLM2), shared by the end-to-end tests that
    need no special flags. Tests must leave it healthy and idle.

    It runs the CPU defaults (int4 on the native kernels): several tests send the same prompt twice at
    once (streamed and not) and compare the answers, which the default path keeps independent of how
    requests share a batch (tests/engine/test_default_determinism.py)."""
    with ServerProcess("--max-num-seqs", "32", "--kv-cache-memory", "512MiB") as proc:
        yield proc
