"""A GGUF metadata reader that skips array contents.

gguf's own GGUFReader materialises every array element; the metadata of a
150k-token vocabulary took ~17 s to read with it. This reader walks the
header, the key/value section (scalars and strings read, arrays skipped by
their lengths) and the tensor-info section (for the parameter count),
reading the file sequentially in bounded chunks. The format's constants
(magic, versions, value types) come from the ``gguf`` package.

Every problem with the file (truncated, bad magic, unsupported version,
impossible counts or lengths) raises :class:`ValueError`; the caller turns
it into :class:`~llamaproc.ModelFileError`. No allocation is sized by a count
read from the file.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from typing import IO, Any, NamedTuple

__all__ = ["GGUFArray", "GGUFMetadata", "read_metadata"]

_CHUNK = 1 << 20
#: Longest key the format allows.
_MAX_KEY = 65535
#: String values longer than this are skipped (kept as None): no real metadata string comes close.
_MAX_STRING = 16 << 20
#: Bounds no real file comes near, so that a corrupt header fails at once instead of walking the file.
_MAX_KV = 1 << 20
_MAX_TENSORS = 1 << 24
_MAX_DIMS = 16
_MAX_NESTING = 8


class GGUFArray(NamedTuple):
    """An array value, not read: its element type (a ``GGUFValueType``) and length."""

    item_type: int
    length: int


@dataclass
class GGUFMetadata:
    """The key/value pairs of a GGUF file (arrays as :class:`GGUFArray`) and its tensor totals."""

    version: int
    fields: dict[str, Any] = field(default_factory=dict)
    tensor_count: int = 0
    parameter_count: int = 0


class _Reader:
    """Sequential reads over a file, keeping only the unread part of the current chunk."""

    def __init__(self, f: IO[bytes], size: int, endian: str, *, offset: int) -> None:
        self.f = f  # positioned at ``offset``
        self.size = size
        self.buf = b""
        self.pos = 0  # index into buf
        self.offset = offset  # file offset of buf[0]
        self.u32 = struct.Struct(endian + "I").unpack_from
        self.u64 = struct.Struct(endian + "Q").unpack_from
        self.endian = endian

    @property
    def remaining(self) -> int:
        return self.size - self.offset - self.pos

    def need(self, n: int) -> None:
        """Make ``buf[pos:pos + n]`` available."""
        if self.pos + n <= len(self.buf):
            return
        if n > self.remaining:
            raise ValueError(f"truncated at offset {self.offset + self.pos}: {n} bytes needed, {self.remaining} left")
        rest = self.buf[self.pos :]
        more = self.f.read(max(n - len(rest), _CHUNK))
        self.offset += self.pos
        self.buf = rest + more
        self.pos = 0
        if len(self.buf) < n:
            raise ValueError(f"truncated at offset {self.offset}")

    def skip(self, n: int) -> None:
        if n > self.remaining:
            raise ValueError(f"truncated at offset {self.offset + self.pos}: {n} bytes to skip, {self.remaining} left")
        if self.pos + n <= len(self.buf):
            self.pos += n
            return
        target = self.offset + self.pos + n
        self.f.seek(target)
        self.buf, self.pos, self.offset = b"", 0, target

    def uint32(self) -> int:
        self.need(4)
        (value,) = self.u32(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def uint64(self) -> int:
        self.need(8)
        (value,) = self.u64(self.buf, self.pos)
        self.pos += 8
        return int(value)

    def raw_string(self, limit: int) -> bytes | None:
        """A length-prefixed string; None (and skipped) when longer than ``limit``."""
        n = self.uint64()
        if n > limit:
            self.skip(n)
            return None
        self.need(n)
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def skip_strings(self, count: int) -> None:
        """Skip ``count`` length-prefixed strings: only their lengths are read."""
        if count * 8 > self.remaining:
            raise ValueError(f"an array of {count} strings cannot fit in the {self.remaining} bytes left")
        u64 = self.u64
        buf, pos = self.buf, self.pos
        end = len(buf)
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8)
                buf, pos = self.buf, self.pos
                end = len(buf)
            pos += 8 + u64(buf, pos)[0]
            if pos > end:
                self.pos = end
                self.skip(pos - end)
                buf, pos = self.buf, self.pos
                end = len(buf)
        self.pos = pos


def _scalar_formats() -> dict[int, str]:
    from gguf import GGUFValueType as T

    return {
        T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i",
        T.FLOAT32: "f", T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d",
    }


def read_metadata(path: str | os.PathLike[str]) -> GGUFMetadata:
    """Read the metadata of the GGUF file at ``path``.

    Raises :class:`OSError` when the file cannot be opened or read and
    :class:`ValueError` when it is not a well-formed GGUF file.
    """
    from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

    formats = _scalar_formats()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8 or struct.unpack_from("<I", head)[0] != GGUF_MAGIC:
            raise ValueError("not a GGUF file (bad magic)")
        (version,) = struct.unpack_from("<I", head, 4)
        endian = "<"
        if version & 0xFFFF == 0:  # written on a big-endian machine: the version reads byte-swapped
            endian = ">"
            (version,) = struct.unpack_from(">I", head, 4)
        if version not in READER_SUPPORTED_VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported")
        r = _Reader(f, size, endian, offset=8)
        tensor_count = r.uint64()
        kv_count = r.uint64()
        if kv_count > _MAX_KV or kv_count * 12 > r.remaining:
            raise ValueError(f"impossible key/value count {kv_count}")
        if tensor_count > _MAX_TENSORS or tensor_count * 24 > r.remaining:
            raise ValueError(f"impossible tensor count {tensor_count}")
        structs = {t: struct.Struct(endian + fmt) for t, fmt in formats.items()}

        def value(vtype: int, depth: int) -> Any:
            fmt = structs.get(vtype)
            if fmt is not None:
                r.need(fmt.size)
                (v,) = fmt.unpack_from(r.buf, r.pos)
                r.pos += fmt.size
                return v
            if vtype == GGUFValueType.STRING:
                raw = r.raw_string(_MAX_STRING)
                return None if raw is None else raw.decode("utf-8", "replace")
            if vtype == GGUFValueType.ARRAY:
                item_type = r.uint32()
                count = r.uint64()
                skip_array(item_type, count, depth + 1)
                return GGUFArray(GGUFValueType(item_type), count)
            raise ValueError(f"unknown value type {vtype}")

        def skip_array(item_type: int, count: int, depth: int) -> None:
            if depth > _MAX_NESTING:
                raise ValueError("arrays nested too deep")
            fmt = structs.get(item_type)
            if fmt is not None:
                r.skip(count * fmt.size)
            elif item_type == GGUFValueType.STRING:
                r.skip_strings(count)
            elif item_type == GGUFValueType.ARRAY:
                if count * 12 > r.remaining:
                    raise ValueError(f"an array of {count} arrays cannot fit in the file")
                for _ in range(count):
                    inner_type = r.uint32()
                    skip_array(inner_type, r.uint64(), depth + 1)
            else:
                raise ValueError(f"unknown array element type {item_type}")

        meta = GGUFMetadata(version=version, tensor_count=tensor_count)
        for _ in range(kv_count):
            raw_key = r.raw_string(_MAX_KEY)
            if raw_key is None:
                raise ValueError("a key longer than the format allows")
            key = raw_key.decode("utf-8", "replace")
            if key in meta.fields:
                raise ValueError(f"duplicate key {key!r}")
            meta.fields[key] = value(r.uint32(), 0)
        parameters = 0
        data_end = 0  # where the last tensor's data ends, from the start of the data section
        for _ in range(tensor_count):
            r.raw_string(_MAX_KEY)  # the tensor's name
            n_dims = r.uint32()
            if n_dims > _MAX_DIMS:
                raise ValueError(f"a tensor with {n_dims} dimensions")
            r.need(8 * n_dims + 12)
            dims = struct.unpack_from(f"{endian}{n_dims}Q", r.buf, r.pos)
            r.pos += 8 * n_dims
            n_elements = math.prod(dims)
            parameters += n_elements
            tensor_type = r.uint32()
            data_offset = r.uint64()
            try:
                block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
            except (ValueError, KeyError):
                continue  # a type this gguf package does not know: its size is unknown
            data_end = max(data_end, data_offset + n_elements // block_size * type_size)
        meta.parameter_count = parameters
        alignment = meta.fields.get("general.alignment")
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
            alignment = GGUF_DEFAULT_ALIGNMENT
        position = r.offset + r.pos
        data_start = -(-position // alignment) * alignment
        if tensor_count and data_start + data_end > size:
            raise ValueError(
                f"the tensor data ends at byte {data_start + data_end} but the file has {size} bytes (truncated?)"
            )
        return meta
