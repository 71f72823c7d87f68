"""Embed texts and compare them by cosine similarity.

    python examples/embeddings.py [MODEL.gguf]

A model whose GGUF names no pooling type is loaded with mean pooling.
"""

import math
import sys
import tempfile
from pathlib import Path

import anyio

import llamaproc
from llamaproc.testing import write_tiny_model


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def main(path: Path) -> None:
    texts = ["the cat", "the dog", "blue sky"]
    async with await llamaproc.load_model(path, embeddings=True) as model:
        vectors = await model.embed(texts)
    print(f"{len(vectors)} vectors of {len(vectors[0])} floats")
    for i, a in enumerate(texts):
        for j in range(i + 1, len(texts)):
            print(f"cos({a!r}, {texts[j]!r}) = {cosine(vectors[i], vectors[j]):.3f}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else write_tiny_model(Path(tmp) / "tiny.gguf")
        anyio.run(main, path)
