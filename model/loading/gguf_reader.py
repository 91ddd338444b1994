"""The GGUF container: its metadata as Python values and its tensors as views of the memory-mapped file.

Why our own parser and not gguf-py's GGUFReader: that reader keeps a NumPy view for every part of every
metadata value, so a vocabulary of 49,152 tokens and 48,900 merges costs ~160 MB of objects (SmolLM2's
file, which is 94 MB in all), held for as long as the tensors are read. Here a string array is a list of str
and a number array one NumPy read. Dequantizing stays with gguf-py (gguf_file.py).

Layout (GGUF v2 and v3, little-endian): magic, version, tensor count, metadata count; the metadata (key,
type, value); the tensor infos (name, dimensions innermost first, type, offset into the data); the data,
aligned to general.alignment (32 bytes unless the file says otherwise).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this parser understands (the message says where it stopped)."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # innermost first, as GGUF lists them
    data: np.ndarray  # uint8 (rows, bytes per row): a view of the mapped file, nothing is read yet


class GGUFFile:
    """One GGUF file, parsed at construction; `fields` maps keys to values, `tensors` lists the tensors."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._at = 0
        magic, version = self._bytes(4), self._scalar("<I")
        if magic != b"GGUF" or version not in (2, 3):
            raise GGUFFormatError(f"not a little-endian GGUF v2/v3 file (magic {magic!r}, version {version})")
        tensor_count, field_count = self._scalar("<Q"), self._scalar("<Q")
        self.fields: dict[str, object] = {}
        for _ in range(field_count):
            key = self._string()
            self.fields[key] = self._value(self._scalar("<I"))
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = int(self.fields.get("general.alignment", _DEFAULT_ALIGNMENT))
        start = -(-self._at // alignment) * alignment
        file = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors = [self._tensor(file, start, *info) for info in infos]

    def release(self) -> None:
        """Drop the mapped file's pages from this process (they stay in the OS's page cache), so tensors
        already read count towards the resident set no longer; reading one again maps its pages back.
        All of them, not a tensor's range: the kernel maps pages around each fault too, and tensors are
        read in the model's order, not the file's."""
        self._map.madvise(mmap.MADV_DONTNEED)

    def _tensor(self, file: np.ndarray, start: int, name: str, shape: tuple[int, ...], kind: int,
                offset: int) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"tensor {name!r}: unknown type {kind}") from None
        row_bytes = shape[0] // block * block_bytes
        rows = int(np.prod(shape[1:], dtype=np.int64))
        begin = start + offset
        if shape[0] % block or begin + rows * row_bytes > len(file):
            raise GGUFFormatError(f"tensor {name!r}: its data does not fit the file")
        return GGUFTensor(name, kind, shape, file[begin:begin + rows * row_bytes].reshape(rows, row_bytes))

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        dims = self._scalar("<I")
        shape = tuple(self._scalar("<Q") for _ in range(dims))
        return name, shape, self._scalar("<I"), self._scalar("<Q")

    def _value(self, kind: int):
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._scalar("<I"), self._scalar("<Q")
            if item == _STRING:
                return [self._string() for _ in range(count)]
            if item in _SCALARS and item != 7:  # numbers: one read
                dtype = np.dtype(_SCALARS[item])
                values = np.frombuffer(self._bytes(count * dtype.itemsize), dtype=dtype)
                return values.tolist()
            return [self._value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise GGUFFormatError(f"unknown metadata type {kind} at byte {self._at}")
        return self._scalar(_SCALARS[kind])

    def _string(self) -> str:
        return self._bytes(self._scalar("<Q")).decode("utf-8", errors="replace")

    def _scalar(self, fmt: str):
        (value,) = struct.unpack(fmt, self._bytes(struct.calcsize(fmt)))
        return value

    def _bytes(self, n: int) -> bytes:
        if self._at + n > len(self._map):
            raise GGUFFormatError(f"the file ends inside its header (at byte {self._at})")
        value = self._map[self._at:self._at + n]
        self._at += n
        return value
