"""One line naming the machine a benchmark ran on, for the result files: CPU, vector units, cores, torch."""
from __future__ import annotations

import os
import platform

import torch


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{cpu} ({simd}), {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), Python {platform.python_version()}")
