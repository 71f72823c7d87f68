"""The GGUF metadata reader: the same values as gguf's GGUFReader, fast, and safe on damaged files."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter

import llamaproc
from llamaproc.backend._gguf import GGUFArray, read_metadata
from llamaproc.testing import write_tiny_model

# -- reference: what GGUFReader says ------------------------------------------------------------------


def reference(path: Path) -> tuple[dict[str, Any], int, int]:
    """Every key of the file as GGUFReader reads it (arrays as GGUFArray), the tensor count and parameters."""
    reader = GGUFReader(path, "r")
    fields: dict[str, Any] = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):  # the header, which GGUFReader lists as fields too
            fields[name] = f.parts[f.data[0]].tolist()[0]
        elif f.types[0] == GGUFValueType.ARRAY:
            # parts: key length, key, value type, element type, length, ...; data indexes the leaves.
            length = int(f.parts[4][0])
            if f.types[1] != GGUFValueType.ARRAY:
                assert length == len(f.data)
            fields[name] = GGUFArray(f.types[1], length)
        elif f.types[0] == GGUFValueType.STRING:
            fields[name] = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        else:
            fields[name] = f.parts[f.data[0]].tolist()[0]
    return fields, len(reader.tensors), sum(int(t.n_elements) for t in reader.tensors)


def write_gguf(path: Path, fill: Callable[[GGUFWriter], None], *, endian: GGUFEndian = GGUFEndian.LITTLE,
               tensors: int = 1) -> Path:
    w = GGUFWriter(str(path), "llama", endianess=endian)
    fill(w)
    for i in range(tensors):
        w.add_tensor(f"t{i}", np.zeros((3, 4 + i), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def every_type(w: GGUFWriter) -> None:
    w.add_uint8("x.u8", 200)
    w.add_int8("x.i8", -100)
    w.add_uint16("x.u16", 60000)
    w.add_int16("x.i16", -30000)
    w.add_uint32("x.u32", 4_000_000_000)
    w.add_int32("x.i32", -2_000_000_000)
    w.add_float32("x.f32", 1.5)
    w.add_uint64("x.u64", 2**63 + 5)
    w.add_int64("x.i64", -(2**62))
    w.add_float64("x.f64", 3.141592653589793)
    w.add_bool("x.true", True)
    w.add_bool("x.false", False)
    w.add_string("x.str", "grüße 🦙")
    w.add_string("x.empty", "")
    w.add_array("x.ints", [1, 2, 3])
    w.add_array("x.floats", [0.5, 1.5])
    w.add_array("x.strs", ["a", "", "ccc"])
    w.add_array("x.bools", [True, False])
    w.add_array("x.nested", [[1, 2], [3]])
    w.add_array("x.nested_strs", [["a", "b"], ["c"]])


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real-size vocabulary: 152k tokens and 300k merges."""
    tokens = [f"tok{i}" for i in range(152_000)]

    def fill(w: GGUFWriter) -> None:
        w.add_context_length(32768)
        w.add_token_list(tokens)
        w.add_token_types([1] * len(tokens))
        w.add_token_merges([f"a{i} b{i}" for i in range(300_000)])
        w.add_chat_template("{{ messages }}")

    return write_gguf(tmp_path_factory.mktemp("gguf") / "big-vocab.gguf", fill)


VARIANTS: dict[str, Callable[[Path], Path]] = {
    "tiny": lambda d: write_tiny_model(d / "tiny.gguf"),
    "tiny-1-layer-512": lambda d: write_tiny_model(d / "t1.gguf", n_layers=1, context_length=512),
    "tiny-mean-pooling": lambda d: write_tiny_model(d / "tm.gguf", pooling="mean", seed=3),
    "tiny-wide": lambda d: write_tiny_model(d / "tw.gguf", n_embd=128, n_ff=256, n_head=8),
    "every-type": lambda d: write_gguf(d / "types.gguf", every_type, tensors=3),
    "every-type-big-endian": lambda d: write_gguf(d / "be.gguf", every_type, endian=GGUFEndian.BIG),
    "no-tensors": lambda d: write_gguf(d / "none.gguf", lambda w: w.add_name("empty"), tensors=0),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_values_as_gguf_reader(tmp_path: Path, variant: str) -> None:
    path = VARIANTS[variant](tmp_path)
    fields, tensor_count, parameters = reference(path)
    meta = read_metadata(path)
    assert fields.pop("GGUF.version") == meta.version == 3
    assert fields.pop("GGUF.tensor_count") == meta.tensor_count == tensor_count
    assert fields.pop("GGUF.kv_count") == len(meta.fields)
    assert meta.fields == fields
    assert list(meta.fields) == list(fields)  # in file order
    assert meta.parameter_count == parameters


def test_read_gguf_info_of_the_tiny_model(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "tiny.gguf", pooling="mean")
    info = llamaproc.read_gguf_info(path)
    fields, _, parameters = reference(path)
    assert info.architecture == "llama" and info.name == "llamaproc-tiny"
    assert info.file_type == "ALL_F32"
    assert info.size_bytes == path.stat().st_size
    assert info.context_length == 2048 and info.embedding_length == 64 and info.block_count == 2
    assert info.head_count == info.head_count_kv == 4
    assert info.pooling_type == "mean"
    assert info.vocab_size == fields["tokenizer.ggml.tokens"].length > 256
    assert info.parameter_count == parameters == 143296  # what llama-server reports as n_params
    assert info.chat_template == fields["tokenizer.chat_template"]


def test_big_vocabulary_is_read_in_bounded_memory(big_vocab: Path) -> None:
    """The arrays are skipped by their lengths, not read into memory (GGUFReader makes an array per element).

    How much faster that is than GGUFReader: bench/ (``gguf_metadata``).
    """
    size = big_vocab.stat().st_size
    assert size > 8 << 20
    tracemalloc.start()
    try:
        info = llamaproc.read_gguf_info(big_vocab)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.vocab_size == 152_000
    assert info.context_length == 32768
    assert info.chat_template == "{{ messages }}"
    assert info.parameter_count == 12
    assert peak < 8 << 20, f"{peak} bytes allocated to read a file of {size} bytes"
    meta = read_metadata(big_vocab)
    assert meta.fields["tokenizer.ggml.merges"] == GGUFArray(GGUFValueType.STRING, 300_000)
    assert meta.fields["tokenizer.ggml.token_type"] == GGUFArray(GGUFValueType.INT32, 152_000)


# -- lenient fields -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fill", "expected"),
    [
        (lambda w: w.add_string("llama.context_length", "big"), {"context_length": None}),
        (lambda w: w.add_float32("llama.context_length", 4096.5), {"context_length": None}),
        (lambda w: w.add_bool("llama.block_count", True), {"block_count": None}),
        (lambda w: w.add_uint32("general.name", 7), {"name": None}),
        (lambda w: w.add_array("llama.attention.head_count", [4, 8]), {"head_count": None, "head_count_kv": None}),
        (lambda w: w.add_array("tokenizer.ggml.tokens", [1, 2]), {"vocab_size": None}),
        (lambda w: w.add_string("tokenizer.ggml.tokens", "abc"), {"vocab_size": None}),
        (lambda w: w.add_uint32("general.file_type", 9999), {"file_type": "9999"}),
        (lambda w: w.add_uint32("llama.pooling_type", 77), {"pooling_type": "77"}),
        (lambda w: w.add_array("tokenizer.chat_template", ["x"]), {"chat_template": None}),
    ],
    ids=["ctx-string", "ctx-float", "blocks-bool", "name-int", "heads-array", "tokens-ints", "tokens-string",
         "file-type-unknown", "pooling-unknown", "template-array"],
)
def test_unexpected_types_read_as_none(tmp_path: Path, fill: Callable[[GGUFWriter], None],
                                       expected: dict[str, Any]) -> None:
    info = llamaproc.read_gguf_info(write_gguf(tmp_path / "odd.gguf", fill))
    assert info.architecture == "llama"
    for key, value in expected.items():
        assert getattr(info, key) == value, key


# -- damaged files -------------------------------------------------------------------------------------

U32, U64 = struct.Struct("<I"), struct.Struct("<Q")


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return U64.pack(len(raw)) + raw


def header(kv: int, tensors: int = 0, version: int = 3) -> bytes:
    return b"GGUF" + U32.pack(version) + U64.pack(tensors) + U64.pack(kv)


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gguf_string(key) + U32.pack(vtype) + payload


ARCH = kv("general.architecture", GGUFValueType.STRING, gguf_string("llama"))
DAMAGED: dict[str, bytes] = {
    "empty": b"",
    "text": b"this is not a model\n" * 10,
    "magic-only": b"GGUF",
    "version-1": header(0, version=1),
    "version-99": header(0, version=99),
    "header-cut": header(1)[:20],
    "kv-count-huge": header(2**40) + b"\0" * 64,
    "tensor-count-huge": header(0, tensors=2**40) + b"\0" * 64,
    "key-length-huge": header(1) + U64.pack(2**60) + b"x" * 64,
    "key-too-long": header(1) + gguf_string("k" * 70_000) + U32.pack(0) + b"\0",
    "string-length-huge": header(1) + kv("a", GGUFValueType.STRING, U64.pack(2**62)),
    "array-count-huge": header(1) + kv("a", GGUFValueType.ARRAY, U32.pack(GGUFValueType.UINT8) + U64.pack(2**62)),
    "string-array-count-huge": header(1)
    + kv("a", GGUFValueType.ARRAY, U32.pack(GGUFValueType.STRING) + U64.pack(2**50)),
    "string-array-element-huge": header(1)
    + kv("a", GGUFValueType.ARRAY, U32.pack(GGUFValueType.STRING) + U64.pack(2) + gguf_string("x") + U64.pack(2**61)),
    "nested-array-count-huge": header(1)
    + kv("a", GGUFValueType.ARRAY, U32.pack(GGUFValueType.ARRAY) + U64.pack(2**40)),
    "arrays-nested-too-deep": header(1)
    + kv("a", GGUFValueType.ARRAY, (U32.pack(GGUFValueType.ARRAY) + U64.pack(1)) * 50 + U32.pack(0) + U64.pack(0)),
    "unknown-value-type": header(1) + kv("a", 99, b"\0" * 8),
    "unknown-array-type": header(1) + kv("a", GGUFValueType.ARRAY, U32.pack(99) + U64.pack(1) + b"\0" * 8),
    "duplicate-key": header(2) + ARCH + ARCH,
    "tensor-dims-huge": header(1, tensors=1) + ARCH + gguf_string("t") + U32.pack(10_000) + b"\0" * 64,
    "tensor-data-missing": header(1, tensors=1) + ARCH + gguf_string("t") + U32.pack(1) + U64.pack(1000)
    + U32.pack(0) + U64.pack(0),
}


def test_hand_written_file_with_its_tensor_data_reads(tmp_path: Path) -> None:
    """The hand-written layout above is right: with its tensor data present, the file reads."""
    head = header(1, tensors=1) + ARCH + gguf_string("t") + U32.pack(1) + U64.pack(1000) + U32.pack(0) + U64.pack(0)
    data_start = -(-len(head) // 32) * 32
    path = tmp_path / "whole.gguf"
    path.write_bytes(head + b"\0" * (data_start - len(head)) + b"\0" * 4000)
    info = llamaproc.read_gguf_info(path)
    assert info.architecture == "llama" and info.parameter_count == 1000
    assert reference(path)[2] == 1000
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(llamaproc.ModelFileError, match="truncated"):
        llamaproc.read_gguf_info(path)


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_files_raise_model_file_error_without_big_allocations(tmp_path: Path, name: str) -> None:
    """Impossible counts and lengths are refused, never used to size an allocation."""
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(DAMAGED[name])
    tracemalloc.start()
    try:
        with pytest.raises(llamaproc.ModelFileError, match="not a readable GGUF file"):
            llamaproc.read_gguf_info(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated"


def test_every_truncation_of_a_model_raises_model_file_error(tmp_path: Path) -> None:
    data = write_tiny_model(tmp_path / "tiny.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    lengths = sorted({*range(0, 400, 7), *range(400, 20_000, 997), len(data) - 1, len(data) // 2})
    for n in lengths:
        cut.write_bytes(data[:n])
        with pytest.raises(llamaproc.ModelFileError):
            llamaproc.read_gguf_info(cut)
    cut.write_bytes(data)
    assert llamaproc.read_gguf_info(cut).vocab_size is not None


def test_not_files(tmp_path: Path) -> None:
    with pytest.raises(llamaproc.ModelFileError, match="not found"):
        llamaproc.read_gguf_info(tmp_path / "missing.gguf")
    with pytest.raises(llamaproc.ModelFileError, match="not a readable GGUF file"):
        llamaproc.read_gguf_info(tmp_path)


def test_discover_skips_damaged_files_and_lists_odd_ones(tmp_path: Path) -> None:
    for name, data in DAMAGED.items():
        (tmp_path / f"{name}.gguf").write_bytes(data)
    odd = write_gguf(tmp_path / "odd-ctx.gguf", lambda w: w.add_float32("llama.context_length", 4096.5))
    good = write_tiny_model(tmp_path / "tiny.gguf")
    found = llamaproc.discover(tmp_path)
    assert [Path(i.path) for i in found] == [odd, good]
    assert found[0].context_length is None
