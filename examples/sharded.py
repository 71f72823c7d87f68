"""Split a model over two rpc workers, kill one in the middle of a stream, and watch the stream go on.

    python examples/sharded.py [MODEL.gguf]

Without a model path it writes a tiny random-weight model first (gibberish output). The workers are local
here; on several machines, run `llamaproc worker --host ADDRESS` on each and pass their "host:port" addresses.
"""

import os
import signal
import sys
import tempfile
from pathlib import Path

import anyio

import llamaproc
from llamaproc.testing import write_tiny_model


async def main(path: Path) -> None:
    workers = [await llamaproc.start_worker() for _ in range(2)]
    try:
        async with await llamaproc.load_model(path, workers=workers) as model:
            for shard in model.layout:
                print(f"worker {shard.address} holds layers {shard.layers.start}..{shard.layers.stop - 1}")
            async with model.generate("Once upon a time", max_tokens=120) as stream:
                count = 0
                async for tok in stream:
                    print(tok.text, end="", flush=True)
                    count += 1
                    if count == 40:
                        os.kill(workers[0].pid, signal.SIGKILL)  # a machine dies mid-stream
            print()
            for reshard in stream.reshards:
                print(f"after {reshard.after_tokens} tokens lost {reshard.lost}: resumed in "
                      f"{reshard.seconds * 1000:.0f} ms on {[s.address for s in reshard.layout]}")
            print(f"{count} tokens, none lost or repeated")
    finally:
        for worker in workers:
            await worker.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else write_tiny_model(Path(tmp) / "tiny.gguf", n_layers=8)
        anyio.run(main, path)
