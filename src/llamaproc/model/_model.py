"""The :class:`TextModel` facade and :func:`load_model`.

A TextModel owns one llama-server process (from the process layer) and one
client (from the client layer). It is safe for concurrent callers: each call
is its own HTTP request and llama-server schedules them onto its ``parallel``
slots, queueing the rest.
"""

from __future__ import annotations

import logging
import os
import secrets
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from ..backend import Backend, find_backend, read_gguf_info
from ..client import DEFAULT_TIMEOUT, LlamaClient, TokenStream
from ..errors import (
    ClosedError,
    IncompleteStreamError,
    InvalidArgumentError,
    LlamaprocError,
    ModelFileError,
    ServerCrashedError,
    ServerError,
    ServerHungError,
    TransportError,
)
from ..process import ServerProcess
from ..protocol import MAX_TOKENS, TEMPERATURE, chat_params, check_inputs, check_int, check_prompt, completion_params
from ..types import Completion, GGUFInfo, Health, ModelInfo, RequestMetrics, Shard

__all__ = ["TextModel", "load_model"]

_log = logging.getLogger("llamaproc")

#: How long a request's failure waits for the child's exit status when the connection was cut (the cut is seen first).
_EXIT_WAIT = 0.5


class TextModel:
    """A loaded model, served by its own llama-server child.

    Made by :func:`load_model`. ``async with model:`` closes it on exit. It is
    also an :class:`~llamaproc.runtime.Endpoint`, the protocol the supervisor,
    the pool and the daemon use: ``base_url`` and ``api_key`` say where and how
    to send requests, ``health()``, ``progress()``, ``wait()``, ``explain()``,
    ``kill()`` and ``close()`` watch and stop it.
    """

    def __init__(
        self,
        process: ServerProcess,
        client: LlamaClient,
        *,
        path: Path,
        backend: Backend,
        api_key: str | None = None,
    ) -> None:
        self._process = process
        self._client = client
        self.path = path
        self.backend = backend
        self._api_key = api_key
        self._hung: str | None = None
        self._closed = False
        self._gguf: GGUFInfo | None = None
        #: The last error any call on this model raised (kept after it was raised).
        self.last_error: LlamaprocError | None = None
        #: Metrics of the last request that finished.
        self.last_metrics: RequestMetrics | None = None
        # Kills the server of a model dropped without close(); holds the process, not this object.
        self._finalizer = weakref.finalize(self, _unclosed, process, f"{path.name} (llama-server pid {process.pid})")

    # -- identity -----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The llama-server child's pid."""
        return self._process.pid

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the child."""
        return self._process.base_url

    @property
    def returncode(self) -> int | None:
        """The child's exit status once it has exited, else ``None``."""
        return self._process.returncode

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def api_key(self) -> str | None:
        """The key the child wants (``Authorization: Bearer KEY``): random, made at load, known to this process only."""
        return self._api_key

    @property
    def layout(self) -> list[Shard]:
        """Which worker holds which layers: empty for a model served by one process (see :class:`ShardedModel`)."""
        return []

    @property
    def output(self) -> str:
        """The child's output so far (bounded: its first and last lines)."""
        return self._process.output.text()

    def __repr__(self) -> str:
        return f"<TextModel {self.path.name} pid={self.pid} url={self._process.base_url if self._process.port else '-'}>"

    async def __aenter__(self) -> TextModel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the endpoint: health, failures ---------------------------------------------------------

    async def health(self) -> Health:
        """``GET /health`` of the child (``status="loading"`` while it loads); raises when it does not answer."""
        self._check()
        return await self._client.health()

    def progress(self) -> float | None:
        """The child's CPU seconds so far (``None`` once it is gone): growth means it is working."""
        return self._process.cpu_seconds()

    async def wait(self) -> int | None:
        """Return once the child has exited (its exit status); does not stop it."""
        return await self._process.wait()

    def kill(self, reason: str) -> None:
        """SIGKILL the child because it hangs; the errors of the requests it cut then say ``reason``."""
        if self._hung is None:
            self._hung = reason
        self._process.kill()

    def describe_exit(self) -> str:
        """``llama-server pid N exited with code C: <last lines>``, or the hang that got it killed."""
        tail = [line for line in self._process.output.text().splitlines() if line.strip()][-5:]
        what = str(self._crashed().args[0])
        return what + ((": " + " | ".join(tail)) if tail else "")

    async def explain(self, error: LlamaprocError) -> LlamaprocError:
        """What a failed call means: :class:`ServerCrashedError` (or :class:`ServerHungError`) when the
        child is what died, :class:`ClosedError` when :meth:`close` cut it short, else ``error`` itself.
        Also kept as :attr:`last_error`."""
        if isinstance(error, ServerError) and self._closed:
            closed = ClosedError("the model was closed during the call")
            closed.__cause__ = error
            error = closed
        elif isinstance(error, ServerError):
            if isinstance(error, (TransportError, IncompleteStreamError)) or self._hung is not None:
                # A cut connection (or a kill for a hang) is seen before the exit status: give the
                # kernel a moment. (An error answer came from a live server: no need to wait for that.)
                with anyio.move_on_after(_EXIT_WAIT):
                    while self._process.returncode is None:
                        await anyio.sleep(0.01)
            if self._process.returncode is not None:
                crashed = self._crashed()
                crashed.__cause__ = error
                error = crashed
        self.last_error = error
        return error

    def _check(self) -> None:
        if self._closed:
            raise ClosedError("the model is closed")
        if self._process.returncode is not None:
            self.last_error = error = self._crashed()
            raise error

    def _crashed(self) -> ServerCrashedError:
        code = self._process.returncode
        output = self._process.output.summary()
        if self._hung is not None:
            return ServerHungError(
                f"llama-server (pid {self.pid}) stopped answering and was killed: {self._hung}",
                reason=self._hung, returncode=code, output=output, pid=self.pid,
            )  # fmt: skip
        return ServerCrashedError(
            f"llama-server (pid {self.pid}) exited with code {code}", returncode=code, output=output, pid=self.pid
        )

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        self._check()
        try:
            return await method(*args, **kwargs)
        except InvalidArgumentError:
            raise  # the call's own mistake, not a failure of the model
        except LlamaprocError as exc:
            error = await self.explain(exc)
            if error is exc:
                raise
            raise error from exc

    def _stream(self, stream: TokenStream) -> TokenStream:
        stream.error_hook = self.explain
        stream.done_hook = self._finished
        return stream

    def _finished(self, result: Completion) -> None:
        if result.metrics is not None:
            self.last_metrics = result.metrics

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = MAX_TOKENS,
        temperature: float = TEMPERATURE,
        stop: str | Sequence[str] | None = None,
        **params: Any,
    ) -> TokenStream:
        """Stream the continuation of ``prompt`` (native ``/completion``), greedy by default.

        ``prompt`` is a string or a sequence of token ids; ``max_tokens=-1``
        generates until the model stops or the context is full. Returns an
        async iterator of :class:`Token` (``.text``, ``.id``); use ``async
        with model.generate(...) as stream:`` so that ``break`` frees the slot
        at once. ``stream.result`` has usage and timings at the end. Other
        llama-server sampling options (``top_k``, ``seed``, ``grammar`` ...)
        pass through as keywords. Bad arguments raise
        :class:`InvalidArgumentError` here, before anything is sent.
        """
        params = completion_params(max_tokens, temperature, stop, params)
        self._check()
        return self._stream(self._client.stream_completion(prompt, **params))

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int = MAX_TOKENS,
        temperature: float = TEMPERATURE,
        stop: str | Sequence[str] | None = None,
        **params: Any,
    ) -> TokenStream:
        """Stream a chat reply (``/v1/chat/completions``, the model's chat template), greedy by default.

        ``messages`` is a sequence of mappings (``{"role": ..., "content": ...}``).
        """
        params = chat_params(messages, max_tokens, temperature, stop, params)
        self._check()
        return self._stream(self._client.stream_chat(messages, **params))

    async def complete(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = MAX_TOKENS,
        temperature: float = TEMPERATURE,
        stop: str | Sequence[str] | None = None,
        **params: Any,
    ) -> Completion:
        """Like :meth:`generate`, but waits for the whole text."""
        params = completion_params(max_tokens, temperature, stop, params)
        prompt = check_prompt(prompt)
        result: Completion = await self._call(self._client.completion, prompt, **params)
        self._finished(result)
        return result

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One embedding vector per text (the model must be loaded with ``embeddings=True``)."""
        texts = check_inputs(texts)
        result: list[list[float]] = await self._call(self._client.embeddings, texts)
        return result

    async def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        result: list[int] = await self._call(self._client.tokenize, text, add_special=add_special)
        return result

    async def detokenize(self, tokens: Sequence[int]) -> str:
        result: str = await self._call(self._client.detokenize, tokens)
        return result

    # -- introspection --------------------------------------------------------------------------

    async def info(self) -> ModelInfo:
        """The GGUF metadata of the model file and the server's ``/props``."""
        props: dict[str, Any] = await self._call(self._client.props)
        if self._gguf is None:
            self._gguf = await anyio.to_thread.run_sync(read_gguf_info, self.path, abandon_on_cancel=True)
        return ModelInfo(
            gguf=self._gguf,
            props=props,
            pid=self.pid,
            base_url=self.base_url,
            binary=str(self.backend.binary),
            flavour=self.backend.flavour,
        )

    async def server_metrics(self) -> dict[str, float]:
        """llama-server's Prometheus counters (``/metrics``), by sample name."""
        result: dict[str, float] = await self._call(self._client.metrics)
        return result

    async def slots(self) -> list[dict[str, Any]]:
        """llama-server's slots (``/slots``): which are busy, their context, ..."""
        result: list[dict[str, Any]] = await self._call(self._client.slots)
        return result

    # -- shutdown -------------------------------------------------------------------------------

    async def close(self) -> None:
        """End open streams, then stop the child (SIGTERM → grace → SIGKILL).

        Idempotent and shielded from cancellation: when it returns (or is
        cancelled) the child is gone, even when closing the client failed.
        """
        with anyio.CancelScope(shield=True):
            self._closed = True
            self._finalizer.detach()
            try:
                await self._client.aclose()
            finally:
                await self._process.stop()


def _unclosed(process: ServerProcess, what: str, _warn: Callable[..., None] = warnings.warn) -> None:
    """Kill the server of a TextModel dropped without close() (its weakref.finalize callback).

    Runs when the model is collected, or at interpreter exit for one still
    alive then; never for a closed model. As with an unclosed file, a
    ResourceWarning says so (shown with ``-W default`` or ``python -X dev``).
    """
    process.kill_and_reap()
    _warn(f"unclosed TextModel {what}: its server was killed; use 'async with' or close()",
          ResourceWarning)


async def load_model(
    path: str | os.PathLike[str],
    *,
    binary: str | os.PathLike[str] | None = None,
    parallel: int = 1,
    ctx_size: int | None = None,
    gpu_layers: int | None = None,
    threads: int | None = None,
    embeddings: bool = False,
    pooling: str | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    devices: str | None = "0",
    startup_timeout: float = 60.0,
    grace: float = 5.0,
    log_output: bool | logging.Logger = False,
    request_timeout: float | None = None,
    workers: Sequence[Any] | int | None = None,
    split: str | Sequence[float] = "capacity",
    min_workers: int = 1,
    stall_timeout: float = 10.0,
    max_reshards: int = 3,
) -> TextModel:
    """Start llama-server for the GGUF at ``path``; return when it answers ``/health``.

    ``parallel`` is the number of slots (concurrent requests served at once);
    ``ctx_size`` the total context (shared by the slots); ``gpu_layers`` the
    layers to offload (``-ngl``); ``embeddings`` enables ``embed()`` (with
    mean pooling when the file names no pooling type, unless ``pooling`` is
    given). ``args`` are extra llama-server arguments and ``env`` extra
    environment variables. ``devices`` sets ``HIP_VISIBLE_DEVICES`` (``None``
    leaves it alone). ``log_output`` forwards the server's output to the
    ``llamaproc.server`` logger (or the logger given). ``request_timeout`` is
    the read timeout of each request, default 600 s. An argument of the wrong
    type or value raises :class:`InvalidArgumentError` before anything starts.

    ``workers`` splits the model by layers over rpc workers (``"host:port"``
    addresses and/or :class:`RpcWorker` objects from :func:`start_worker`, or
    a number of local workers to start, owned by the model):
    the result is a sharded model (see :class:`ShardedModel`) with ``split``
    (``"capacity"``: by each worker's free memory, ``"uniform"``, or one
    weight per worker), ``min_workers``, ``stall_timeout`` and
    ``max_reshards`` for its failover.
    """
    check_int("parallel", parallel, minimum=1)
    check_int("ctx_size", ctx_size, minimum=0, optional=True)
    check_int("gpu_layers", gpu_layers, optional=True)
    check_int("threads", threads, optional=True)
    if pooling is not None and not isinstance(pooling, str):
        raise InvalidArgumentError(f"pooling must be a string such as 'mean' or None, not {pooling!r}")
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence) or not all(isinstance(a, str) for a in args):
        raise InvalidArgumentError(f"args must be a sequence of strings such as ['--threads', '4'], not {args!r:.60}")
    if env is not None and (
        not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise InvalidArgumentError(f"env must be a mapping of strings to strings, not {env!r:.80}")
    model_path = Path(path).expanduser()
    if not model_path.is_file():
        what = "is not a file" if model_path.exists() else "not found"
        raise ModelFileError(f"model file {what}: {model_path}")
    backend = find_backend(binary)
    argv: list[str] = ["--model", str(model_path), "--parallel", str(parallel), "--metrics", "--slots"]
    if ctx_size is not None:
        argv += ["--ctx-size", str(ctx_size)]
    if gpu_layers is not None:
        argv += ["--n-gpu-layers", str(gpu_layers)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    if embeddings:
        argv.append("--embeddings")
        if pooling is None:
            pooling = await anyio.to_thread.run_sync(_pooling_for, model_path, abandon_on_cancel=True)
    if pooling is not None:
        argv += ["--pooling", pooling]
    argv += list(args)
    logger: logging.Logger | None
    if log_output is True:
        logger = logging.getLogger("llamaproc.server")
    elif isinstance(log_output, logging.Logger):
        logger = log_output
    else:
        logger = None
    timeout = DEFAULT_TIMEOUT if request_timeout is None else DEFAULT_TIMEOUT.__class__(
        connect=5.0, read=request_timeout, write=30.0, pool=None
    )
    launch = Launch(
        path=model_path, backend=backend, argv=argv, env=dict(env or {}), devices=devices,
        startup_timeout=startup_timeout, grace=grace, logger=logger, timeout=timeout,
    )  # fmt: skip
    if workers is not None:
        from ._sharded import load_sharded

        return await load_sharded(
            launch, workers=workers, split=split, min_workers=min_workers, stall_timeout=stall_timeout,
            max_reshards=max_reshards, parallel=parallel, threads=threads,
        )  # fmt: skip
    process, client, api_key = await launch.start()
    return TextModel(process, client, path=model_path, backend=backend, api_key=api_key)


@dataclass(frozen=True, slots=True)
class Launch:
    """How to start a model's llama-server: everything :func:`load_model` decided, kept to start it again."""

    path: Path
    backend: Backend
    argv: list[str]
    env: dict[str, str]
    devices: str | None
    startup_timeout: float
    grace: float
    logger: logging.Logger | None
    timeout: httpx.Timeout

    async def start(
        self, extra_argv: Sequence[str] = (), extra_env: Mapping[str, str] | None = None
    ) -> tuple[ServerProcess, LlamaClient, str]:
        """Start one llama-server; return it with a client that holds its key."""
        # The child answers only to this process: a random key, passed in the environment (not on the
        # command line, which every local user can read), that nobody else knows.
        api_key = secrets.token_urlsafe(24)
        process = await ServerProcess.start(
            self.backend.binary,
            [*self.argv, *extra_argv],
            env={**self.backend.env, **self.env, **(extra_env or {}), "LLAMA_API_KEY": api_key},
            devices=self.devices,
            startup_timeout=self.startup_timeout,
            grace=self.grace,
            logger=self.logger,
        )
        client = LlamaClient(process.base_url, timeout=self.timeout, api_key=api_key)
        _log.debug("loaded %s: pid %d at %s", self.path, process.pid, process.base_url)
        return process, client, api_key


def _pooling_for(path: Path) -> str | None:
    """Mean pooling for a file that names no pooling type (most generative models)."""
    try:
        info = read_gguf_info(path)
    except ModelFileError:
        return None  # let llama-server report what is wrong with the file
    return "mean" if info.pooling_type in (None, "none", "unspecified") else None
