"""`kvserve bench` without matplotlib (the `bench` extra, which `make serve` does not install): one line
that says how to install it, before any request is sent."""
from __future__ import annotations

import subprocess
import sys

from clients.bench.plots import MISSING
from tests.server_process import REPO, free_port

# As in a venv without the extra: `import matplotlib` raises ImportError, the rest of the command is real.
WITHOUT_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; from service.cli import main; main(sys.argv[1:])"


def test_bench_without_matplotlib_says_how_to_install_it():
    no_server = f"http://127.0.0.1:{free_port()}"  # reaching it would fail with a connection error instead
    result = subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB, "bench", "--url", no_server,
                             "--num-prompts", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == MISSING
    assert "pip install 'kvserve[bench]'" in MISSING
