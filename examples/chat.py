"""A short chat, streamed, with two concurrent conversations on two slots.

    python examples/chat.py [MODEL.gguf]
"""

import sys
import tempfile
from pathlib import Path

import anyio

import llamaproc
from llamaproc.testing import write_tiny_model


async def reply(model: llamaproc.TextModel, question: str) -> str:
    pieces = []
    async with model.chat([{"role": "user", "content": question}], max_tokens=24) as stream:
        async for tok in stream:
            pieces.append(tok.text)
    return "".join(pieces)


async def main(path: Path) -> None:
    async with await llamaproc.load_model(path, parallel=2) as model:
        answers: dict[str, str] = {}

        async def ask(question: str) -> None:
            answers[question] = await reply(model, question)

        async with anyio.create_task_group() as tg:  # both run at once, one slot each
            for question in ("What is a llama?", "Say hi."):
                tg.start_soon(ask, question)
        for question, answer in answers.items():
            print(f"user: {question}\nassistant: {answer}\n")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else write_tiny_model(Path(tmp) / "tiny.gguf")
        anyio.run(main, path)
