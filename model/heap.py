"""trim_heap: glibc's malloc_trim(0), which hands the free pages of every malloc arena back to the OS.

glibc keeps freed blocks below its (growing) mmap threshold mapped for reuse, so a process that freed a
large working set (a model's float32 weights while loading, a long prefill's activations) stays that
large. Elsewhere (musl, macOS) there is no malloc_trim and this does nothing.
"""
from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
