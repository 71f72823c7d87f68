"""Reading a GGUF file's metadata: llamaproc's reader against gguf's own GGUFReader.

The file has a real-looking vocabulary (tokens, token types, merges) and one
small tensor: its size is in the arrays, which llamaproc skips by their lengths
and GGUFReader reads element by element.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from common import Result, Settings, interleave, median, paired
from gguf import GGUFReader, GGUFWriter

import llamaproc

#: A mid-size vocabulary: GGUFReader takes a few seconds over it (about 17 s over 152k tokens).
TOKENS = 16_000
MERGES = 32_000


def vocab_file(workdir: Path) -> Path:
    path = workdir / f"vocab-{TOKENS}.gguf"
    if path.exists():
        return path
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(32768)
    writer.add_token_list([f"tok{i}" for i in range(TOKENS)])
    writer.add_token_types([1] * TOKENS)
    writer.add_token_merges([f"a{i} b{i}" for i in range(MERGES)])
    writer.add_chat_template("{{ messages }}")
    writer.add_tensor("t0", np.zeros((3, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


async def gguf_metadata(s: Settings) -> list[Result]:
    """Time to read the metadata of a file with a big vocabulary: read_gguf_info() vs GGUFReader."""
    path = vocab_file(s.workdir)

    async def subject() -> float:
        t0 = time.perf_counter()
        info = llamaproc.read_gguf_info(path)
        dt = time.perf_counter() - t0
        if info.vocab_size != TOKENS:
            raise RuntimeError(f"read_gguf_info() found {info.vocab_size} tokens, expected {TOKENS}")
        return dt * 1000

    async def baseline() -> float:
        t0 = time.perf_counter()
        reader = GGUFReader(path, "r")
        dt = time.perf_counter() - t0
        if len(reader.fields["tokenizer.ggml.tokens"].data) != TOKENS:
            raise RuntimeError("GGUFReader did not read the vocabulary")
        return dt * 1000

    runs = await interleave({"llamaproc": subject, "gguf_reader": baseline}, s.reps(5, 2))
    return [
        Result(
            metric="gguf_metadata", unit="ms",
            subject=median(runs["llamaproc"]), baseline=median(runs["gguf_reader"]),
            compare="ratio", value=paired(runs["llamaproc"], runs["gguf_reader"], "ratio"),
            op="<=", target=0.05,
            subject_label="read_gguf_info()", baseline_label="gguf.GGUFReader",
            samples=runs, note=f"{TOKENS} tokens, {MERGES} merges, {path.stat().st_size >> 10} KiB",
        )
    ]
