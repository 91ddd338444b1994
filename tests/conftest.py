"""Fixtures shared by every test folder."""
from __future__ import annotations

import pytest

from tests.server_process import ServerProcess


@pytest.fixture(scope="session")
def server():
    """One real kvserve process with the default model (SmolLM2), shared by the end-to-end tests that
    need no special flags. Tests must leave it healthy and idle."""
    with ServerProcess("--max-num-seqs", "32", "--kv-cache-memory", "512MiB") as proc:
        yield proc
