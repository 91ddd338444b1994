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

    It runs the exact float32 model, not the CPU default (int4 in bfloat16): several tests send the
    same prompt twice at once (streamed and not) and compare the answers, which only float32 keeps
    independent of how requests share a batch. The int4 default is served by the other server tests
    (drain, overload, auth, the image's entry point)."""
    with ServerProcess("--max-num-seqs", "32", "--kv-cache-memory", "512MiB", "--quantization", "none",
                       "--dtype", "float32") as proc:
        yield proc
