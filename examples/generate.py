"""Stream a completion token by token.

    python examples/generate.py [MODEL.gguf] [PROMPT]

Without a model path it writes a tiny random-weight model first (gibberish output).
"""

import sys
import tempfile
from pathlib import Path

import anyio

import llamaproc
from llamaproc.testing import write_tiny_model


async def main(path: Path, prompt: str) -> None:
    async with await llamaproc.load_model(path) as model:
        print(f"llama-server pid {model.pid} at {model.base_url}")
        async with model.generate(prompt, max_tokens=48) as stream:
            async for tok in stream:
                print(tok.text, end="", flush=True)
        print()
        assert stream.result is not None
        print(f"finish: {stream.result.finish_reason}, usage: {stream.result.usage}")
        print(f"metrics: {model.last_metrics}")


if __name__ == "__main__":
    prompt = sys.argv[2] if len(sys.argv) > 2 else "Once upon a time"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else write_tiny_model(Path(tmp) / "tiny.gguf")
        anyio.run(main, path, prompt)
