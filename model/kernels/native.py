"""The CPU kernels in model/kernels/cpu/ (quantized matmul, paged attention, the glue between them): built on
this machine, loaded
as torch ops (torch.ops.kvserve.*).

Why built here: they are compiled with -march=native for this CPU's vector units (AVX-512 VNNI where it has
them), so nothing prebuilt is shipped or downloaded. `make install` and the Docker build run `python -m
model.kernels.native` once; the library lands in the environment (sys.prefix), in a folder named by a hash of
the sources, torch's version and the CPU's flags, so a changed source, torch or CPU builds a new one instead
of loading one that does not fit. Where no compiler or no writable folder is at hand, `load()` says why in
one line and the model runs torch's own kernels instead (model/quantization/int4.py).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE_DIR = Path(__file__).parent / "cpu"
SOURCES = ("qmatmul.cpp", "attention.cpp", "rotary_attention.cpp", "fused.cpp")
LIBRARY = "kvserve_cpu_kernels.so"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


# -ffp-contract=off: GCC would otherwise fuse a * b + c into one rounding where it sees fit, and may fuse
# the same line of a kernel in one template instantiation and not another (seen here: a trial attention
# kernel with one instantiation per number of heads walked together rounded the softmax totals 1 ulp apart),
# so a token's bits would depend on which one ran it. The vector code spells out its fused multiply-adds.
CODEGEN_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-fopenmp")


def build_key() -> str:
    digest = hashlib.sha256(" ".join(CODEGEN_FLAGS).encode())
    for name in sorted(SOURCE_DIR.iterdir()):
        digest.update(name.name.encode() + name.read_bytes())
    digest.update(torch.__version__.encode() + _cpu_flags().encode())
    return digest.hexdigest()[:16]


def library_path() -> Path:
    root = Path(os.environ.get("KVSERVE_KERNEL_DIR", Path(sys.prefix) / "kvserve-kernels"))
    return root / build_key() / LIBRARY


def compile_command(output: Path) -> list[str]:
    from torch.utils import cpp_extension
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    # -fopenmp for at::parallel_for's inline OpenMP regions; its libgomp.so.1 is torch's own once loaded.
    return ["g++", *CODEGEN_FLAGS, abi, *includes, *[str(SOURCE_DIR / s) for s in SOURCES], *libs, "-lc10",
            "-ltorch_cpu", "-o", str(output)]


def build(path: Path | None = None) -> Path:
    """Compile the kernels (about a minute on 2 cores) unless this build exists; returns the library."""
    path = path or library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    result = subprocess.run(compile_command(partial), capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"compiling the CPU kernels failed: {result.stderr.strip()[-2000:]}")
    partial.replace(path)  # atomic: a concurrent loader never sees half a library
    return path


VECTOR_UNITS = ("avx512f", "avx512bw", "avx512dq", "avx512_vnni")


def cpu_supported() -> bool:
    """Whether this CPU has the AVX-512 units the kernels are written for. Their portable C++ path is ~40x
    slower (measured: a 960x576 batch-1 matmul 564 us against 13 us), slower than torch's own int4 kernel,
    so elsewhere torch's kernels run."""
    flags = set(_cpu_flags().split())
    return all(unit in flags for unit in VECTOR_UNITS)


@cache
def load() -> bool:
    """True once torch.ops.kvserve.* exist (building them first if needed); False, with one log line, if
    they cannot be built here or this CPU lacks the units they need. KVSERVE_NATIVE_KERNELS=0 turns them off."""
    if os.environ.get("KVSERVE_NATIVE_KERNELS", "1") == "0":
        log.info("native CPU kernels off (KVSERVE_NATIVE_KERNELS=0): torch's kernels run instead")
        return False
    if not cpu_supported():
        log.warning("this CPU lacks %s: torch's kernels run instead of the native ones (slower, and rounding "
                    "differently by batch size)", "/".join(VECTOR_UNITS))
        return False
    try:
        path = library_path()
        if not path.exists():
            log.info("building the native CPU kernels for this machine (once, about a minute) in %s", path.parent)
        torch.ops.load_library(str(build(path)))
        return True
    except (OSError, RuntimeError) as error:
        log.warning("native CPU kernels unavailable (%s); torch's kernels run instead, slower and with "
                    "batch-dependent rounding", str(error).splitlines()[0])
        return False


if __name__ == "__main__":
    print(build())
