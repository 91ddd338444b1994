"""model/loading/gguf_reader.py against gguf-py's own GGUFReader: the same metadata and tensor bytes."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from model.loading.gguf_reader import GGUFFile, GGUFFormatError
from model.loading.loader import smollm2_path
from tests.model.writers import encode


def assert_same_as_gguf_py(path) -> GGUFFile:
    ours, theirs = GGUFFile(path), GGUFReader(path)
    assert list(ours.fields) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key, value in ours.fields.items():
        assert value == theirs.fields[key].contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert mine.tensor_type == int(reference.tensor_type), mine.name
        assert mine.shape == tuple(int(n) for n in reference.shape), mine.name
        assert np.array_equal(mine.data.reshape(-1), np.asarray(reference.data).view(np.uint8).reshape(-1)), mine.name
    return ours


def test_smollm2_file_reads_as_gguf_py_reads_it():
    ours = assert_same_as_gguf_py(smollm2_path())
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152 and len(ours.tensors) == 272


def test_every_metadata_type_and_a_custom_alignment(tmp_path):
    path = tmp_path / "kinds.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_custom_alignment(64)
    for name, kind, value in [("u8", GGUFValueType.UINT8, 200), ("i8", GGUFValueType.INT8, -5),
                              ("u16", GGUFValueType.UINT16, 60000), ("i16", GGUFValueType.INT16, -300),
                              ("u32", GGUFValueType.UINT32, 4_000_000_000), ("i32", GGUFValueType.INT32, -7),
                              ("f32", GGUFValueType.FLOAT32, 0.5), ("u64", GGUFValueType.UINT64, 2**40),
                              ("i64", GGUFValueType.INT64, -(2**40)), ("f64", GGUFValueType.FLOAT64, 1e-300),
                              ("yes", GGUFValueType.BOOL, True), ("text", GGUFValueType.STRING, "héllo\n")]:
        writer.add_key_value(f"test.{name}", value, kind)
    writer.add_array("test.strings", ["a", "", "日本語"])
    writer.add_array("test.floats", [1.5, -2.25])
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.bools", [True, False])
    rng = np.random.default_rng(0)
    for qtype in ("F32", "F16", "Q8_0", "Q4_1"):
        data, raw = encode(rng.standard_normal((3, 256)).astype(np.float32), qtype)
        writer.add_tensor(f"t.{qtype}", data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = assert_same_as_gguf_py(path)
    assert ours.fields["test.text"] == "héllo\n" and ours.fields["test.i64"] == -(2**40)
    assert [t.tensor_type for t in ours.tensors] == [Q.F32, Q.F16, Q.Q8_0, Q.Q4_1]


def file_pages_resident_kb(path) -> int:
    """Resident KB of this process's mappings of path (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                inside = line.rstrip().endswith(str(path))
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_release_drops_the_pages_read():
    path = smollm2_path()
    reader = GGUFFile(path)
    embedding = reader.tensors[0]
    checksum = int(embedding.data.sum(dtype=np.uint64))  # touches every page of the 30 MB table
    assert file_pages_resident_kb(path) > embedding.data.nbytes // 1024
    reader.release()
    assert file_pages_resident_kb(path) < 1024
    assert int(embedding.data.sum(dtype=np.uint64)) == checksum  # read again, the same bytes


@pytest.mark.parametrize("cut", [3, 24, 1000, -1000])
def test_a_truncated_file_is_a_format_error(tmp_path, cut):
    data = smollm2_path().read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(GGUFFormatError, match="ends inside its header|does not fit the file|magic"):
        GGUFFile(path)
