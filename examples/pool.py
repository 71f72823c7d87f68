"""Several named models behind one pool: loaded on demand, reused, evicted least-recently-used.

    python examples/pool.py [MODEL.gguf]

The same machinery `llamaproc serve` runs, embedded in a program of your own.
"""

import sys
import tempfile
from pathlib import Path

import anyio

import llamaproc
from llamaproc.testing import write_tiny_model


async def main(path: Path, tmp: Path) -> None:
    config = tmp / "serve.toml"
    config.write_text(
        "max_loaded_models = 1\n"
        f'[models.first]\npath = "{path}"\nparallel = 2\n'
        f'[models.second]\npath = "{path}"\n'
    )
    async with llamaproc.ModelPool(llamaproc.load_config(config)) as pool:
        for name in ("first", "first", "second"):
            async with pool.acquire(name) as model:  # waits for a slot; loads on demand
                result = await model.complete("hello world", max_tokens=8)
                print(f"{name}: pid {model.pid}: {result.text!r}")
        for status in pool.status():
            print(f"{status.name}: {status.phase} loaded={status.loaded} restarts={status.restarts}")
        print(f"loads: {pool.stats.loads}, evictions: {pool.stats.evictions}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else write_tiny_model(Path(tmp) / "tiny.gguf")
        anyio.run(main, path, Path(tmp))
