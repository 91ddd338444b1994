"""The Triton paged decode kernel equals the torch backend: on CPU through Triton's interpreter, and
on a CUDA device where there is one. The cases run in a child process because Triton reads
TRITON_INTERPRET when it first builds the kernel."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.model.triton_interpreter_cases import CASES, tolerance

ROOT = Path(__file__).resolve().parents[2]


def run_cases(**env: str) -> dict[str, float]:
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_interpreter_cases.py"))],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return {name: float(diff) for name, diff in (line.split() for line in result.stdout.splitlines())}


def test_kernel_matches_torch_backend_in_the_interpreter():
    reported = run_cases(TRITON_INTERPRET="1")
    assert set(reported) == set(CASES)  # every case ran; each exits non-zero beyond its tolerance
    assert all(diff <= tolerance(name) for name, diff in reported.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_matches_torch_backend_on_cuda():
    reported = run_cases(TRITON_INTERPRET="0")
    assert set(reported) == set(CASES)
    assert all(diff <= tolerance(name) for name, diff in reported.items())
