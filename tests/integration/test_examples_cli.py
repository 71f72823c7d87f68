"""The examples and the CLI run end to end against the real llama-server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import llamaproc

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def _run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example: Path, backend: llamaproc.Backend, tiny_model: Path) -> None:
    done = _run(example, tiny_model)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the example printed nothing"


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"generate.py", "chat.py", "embeddings.py", "service_lifespan.py"} <= names


def test_cli_run_streams_the_greedy_completion(backend: llamaproc.Backend, tiny_model: Path) -> None:
    done = _run("-m", "llamaproc", "run", tiny_model, "hello world", "--max-tokens", "12")
    assert done.returncode == 0, done.stderr

    async def expected() -> str:
        async with await llamaproc.load_model(tiny_model) as model:
            return (await model.complete("hello world", max_tokens=12)).text

    import anyio

    assert done.stdout.rstrip("\n") == anyio.run(expected)


def test_cli_demo(backend: llamaproc.Backend) -> None:
    done = _run("-m", "llamaproc", "demo")
    assert done.returncode == 0, done.stderr
    assert "generate('hello world')" in done.stdout
    assert "2 vectors of 64 floats" in done.stdout
    assert "exited with code 0" in done.stdout


def test_cli_reports_a_bad_model_without_a_traceback(tmp_path: Path, backend: llamaproc.Backend) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_text("this is not a model\n")
    done = _run("-m", "llamaproc", "run", bad, "hi")
    assert done.returncode == 1
    assert "StartupError" in done.stderr and "invalid magic" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_discover(tmp_path: Path, tiny_model: Path) -> None:
    from llamaproc.testing import write_tiny_model

    write_tiny_model(tmp_path / "a.gguf")
    done = _run("-m", "llamaproc", "discover", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "a.gguf" in done.stdout and "llama" in done.stdout and "ALL_F32" in done.stdout
