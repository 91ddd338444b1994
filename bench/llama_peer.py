"""llama.cpp's C++ llama-server as a bench/peers.py peer: built once from the llama-cpp-python sdist, started
with parallel slots and continuous batching."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.server_process import ServerProcess, free_port

LLAMA_CPP_PYTHON = "0.3.36"
NAME = "llama-server"
# -march=native but no AMX: GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes of the 64-byte
# tile config, so the stores that fill ggml's config are dropped as dead and its AMX matmul dies at
# ldtilecfg (SIGSEGV) or the first tile op (SIGILL); seen on a KVM Intel Xeon with AMX, while an AMD EPYC
# (no AMX) never builds that path. AVX-512, VNNI and BF16 stay; without AMX the flags change nothing.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BUILD = "build-native-noamx"  # not build/: one made before this fix has the crashing AMX path


def binary(cache: Path) -> Path:
    """Download the sdist and build the llama-server target once; later runs reuse the binary."""
    source = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    built = source / BUILD / "bin" / "llama-server"
    if built.exists():
        return built
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)], check=True)
    with tarfile.open(sdist) as archive:
        archive.extractall(cache, filter="data")
    print("building llama-server (about 7 minutes on 2 cores)...", file=sys.stderr, flush=True)
    subprocess.run(["cmake", "-S", str(source), "-B", str(source / BUILD), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={NO_AMX}",
                    f"-DCMAKE_CXX_FLAGS={NO_AMX}", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_CURL=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(source / BUILD), "--target", "llama-server",
                    f"-j{os.cpu_count()}"], check=True, stdout=subprocess.DEVNULL)
    return built


def prepare(cache: Path, gguf: Path) -> None:
    binary(cache)


def server(cache: Path, gguf: Path, slots: int, seq_len: int, threads: int) -> tuple[ServerProcess, str]:
    """Each slot gets context / slots tokens, so the context is slots x seq_len (a slot holds one request:
    its prompt and its output, seq_len tokens at most). Returns the server (not started) and its flags."""
    port = free_port()
    flags = ["-np", str(slots), "-c", str(seq_len * slots), "-t", str(threads), "-tb", str(threads), "-cb"]
    process = ServerProcess(command=[str(binary(cache)), "-m", str(gguf), "--host", "127.0.0.1", "--port",
                                     str(port), *flags, "--no-webui"])
    process.port, process.url = port, f"http://127.0.0.1:{port}"
    note = (f"llama-server (llama-cpp-python {LLAMA_CPP_PYTHON} sdist): `{' '.join(flags)}` "
            f"({seq_len * slots} tokens of float16 KV cache)")
    return process, note
