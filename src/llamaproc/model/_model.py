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
import threading
import time
import warnings
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
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
from ..ledger import Lease, Ledger, Priority, parse_duration
from ..process import ServerProcess
from ..protocol import MAX_TOKENS, TEMPERATURE, chat_params, check_inputs, check_int, check_prompt, completion_params
from ..types import Completion, GGUFInfo, Health, ModelInfo, Placement, RequestMetrics, Shard, Token
from ._placement import choose, measured_memory

__all__ = ["TextModel", "load_model"]

_log = logging.getLogger("llamaproc")

#: How long a request's failure waits for the child's exit status when the connection was cut (the cut is seen first).
_EXIT_WAIT = 0.5
#: How long the load waits for llama-server's buffer sizes to reach the output buffer after /health answers.
_LOG_WAIT = 2.0
#: How often a call waiting for a preempted model to drain looks again (seconds).
_DRAIN_POLL = 0.05


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
        #: Where the model runs and the memory its lease holds (models loaded with a ledger), else ``None``.
        self.placement: Placement | None = None
        self._managed: _Managed | None = None

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

    @property
    def loaded(self) -> bool:
        """False while a model loaded with a ledger is unloaded (preempted, idle, lease lost) until its next call."""
        return self._managed is None or self._managed.unloaded is None

    def _check(self) -> None:
        if self._closed:
            raise ClosedError("the model is closed")
        if self._managed is not None and self._managed.unloaded is not None:
            raise ClosedError(
                f"the model is unloaded ({self._managed.unloaded}): an awaited call such as complete() reloads it"
            )
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
        unloaded = None if self._managed is None else self._managed.unloaded
        if unloaded is not None:  # the ledger's unload killed it (a call past the preemption grace, a lost lease)
            return ServerCrashedError(
                f"llama-server (pid {self.pid}) was stopped: the model was unloaded during the call ({unloaded})",
                returncode=code, output=output, pid=self.pid,
            )  # fmt: skip
        return ServerCrashedError(
            f"llama-server (pid {self.pid}) exited with code {code}", returncode=code, output=output, pid=self.pid
        )

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        if self._managed is not None:
            await self._managed.enter(self)
            try:
                return await self._call_now(getattr(self._client, method.__name__), *args, **kwargs)
            finally:
                self._managed.leave()
        return await self._call_now(method, *args, **kwargs)

    async def _call_now(self, method: Any, *args: Any, **kwargs: Any) -> Any:
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
        if self._managed is not None:
            check_prompt(prompt)
            return _ManagedStream(self, lambda client: client.stream_completion(prompt, **params))
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
        if self._managed is not None:
            return _ManagedStream(self, lambda client: client.stream_chat(messages, **params))
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
                try:
                    await self._process.stop()
                finally:
                    if self._managed is not None:
                        await self._managed.close()


class _ManagedStream(TokenStream):
    """A stream of a model loaded through a ledger.

    The request is made on first use, after the model is reloaded if it was
    unloaded (preempted, idle, lease lost), and the stream counts as a call in
    flight until it ends: a preempted model unloads only after it.
    """

    __slots__ = ("_model", "_make", "_inner", "_hooks")

    def __init__(self, model: TextModel, make: Callable[[LlamaClient], TokenStream]) -> None:
        self._model = model
        self._make = make
        self._inner: TokenStream | None = None
        self._hooks: dict[str, Any] = {}
        self._agen = None

    @property
    def result(self) -> Completion | None:
        return None if self._inner is None else self._inner.result

    @property
    def error(self) -> LlamaprocError | None:
        return None if self._inner is None else self._inner.error

    @property
    def error_hook(self) -> Any:
        return self._hooks.get("error_hook", self._model.explain)

    @error_hook.setter
    def error_hook(self, hook: Any) -> None:
        self._hooks["error_hook"] = hook

    @property
    def done_hook(self) -> Callable[[Completion], None] | None:
        return self._hooks.get("done_hook", self._model._finished)  # type: ignore[no-any-return]

    @done_hook.setter
    def done_hook(self, hook: Callable[[Completion], None] | None) -> None:
        self._hooks["done_hook"] = hook

    @property
    def token_ids(self) -> list[int]:
        return [] if self._inner is None else self._inner.token_ids

    async def _begin(self) -> AsyncGenerator[Token, None]:
        model = self._model
        managed = model._managed
        assert managed is not None
        await managed.enter(model)
        try:
            model._check()
            inner = self._inner = self._make(model._client)
            inner.error_hook = self.error_hook
            inner.done_hook = self.done_hook
            async with inner:
                async for token in inner:
                    yield token
        finally:
            managed.leave()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._inner is not None:
                await self._inner.aclose()
            agen = self._agen
            if agen is not None and not agen.ag_running:
                await agen.aclose()


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
    ledger: Ledger | None = None,
    priority: Priority = "normal",
    device: str = "cpu",
    lease_timeout: float | None = None,
    preempt_grace: float = 30.0,
    idle_unload: str | float | None = None,
    fit: bool = False,
    min_ctx_size: int = 1024,
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

    ``ledger`` (from :func:`open_ledger`) makes the model hold a memory lease
    while it is loaded, shared with every process that uses the same ledger.
    The model's estimate (:func:`llamaproc.backend.estimate_memory`: weights,
    KV cache for ``ctx_size``, compute margin) is leased on ``device`` at
    ``priority`` before the server starts, holder the file name, waiting up to
    ``lease_timeout`` seconds (default: ``startup_timeout``; then
    :class:`LeaseTimeoutError`); once loaded the lease is resized to the
    buffers llama-server reports (it runs at log verbosity 4 to print them).
    ``model.placement`` says what was loaded. ``fit=True``: when the estimate
    exceeds the memory free on the device, fewer GPU layers (on a GPU
    device), then half the context at a time (not below ``min_ctx_size``); the
    first that fits is loaded, ``placement.reason`` says what was reduced, and
    :class:`InsufficientMemoryError` says when nothing fits.

    Such a model may be unloaded and reloaded behind its callers: when a
    waiter of higher priority asks for the memory (in-flight calls finish
    first, for ``preempt_grace`` seconds at most), when the lease is lost
    (the server is stopped at once), and after ``idle_unload`` (seconds or
    ``"5m"``) without calls. The next call (``complete``, ``embed``, a stream
    of ``generate``/``chat`` when it starts ...) takes a new lease and restarts
    the server; calls during the reload wait for it; a stream counts as a call
    in flight until it ends. A call the unload cuts (past the grace, or when
    the lease is lost) fails with :class:`ServerCrashedError` saying that
    the model was unloaded, and why. No background task does this: the
    ledger's renewal thread calls a listener in the event loop, which kills an
    idle server (a signal, safe from any thread) and gives the lease back with
    :meth:`Lease.release_nowait`; a busy one is unloaded when its last call
    ends, or by a timer thread after the grace; the idle deadline is a timer
    thread too, and is also checked on each call.
    """
    check_int("parallel", parallel, minimum=1)
    check_int("ctx_size", ctx_size, minimum=0, optional=True)
    check_int("gpu_layers", gpu_layers, optional=True)
    check_int("threads", threads, optional=True)
    check_int("min_ctx_size", min_ctx_size, minimum=1)
    idle_seconds = _check_managed(ledger, workers, idle_unload, preempt_grace, lease_timeout)
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
    placement: Placement | None = None
    if ledger is not None:
        free = await _free_memory(ledger, device) if fit else None
        estimate, reason = await anyio.to_thread.run_sync(
            lambda: choose(model_path, ctx_size=ctx_size, gpu_layers=gpu_layers, device=device, free=free,
                           min_ctx_size=min_ctx_size),
            abandon_on_cancel=True,
        )  # fmt: skip
        ctx_size, gpu_layers = estimate.ctx_size, estimate.gpu_layers
        placement = Placement(
            device=device, ctx_size=estimate.ctx_size, gpu_layers=estimate.gpu_layers, memory=estimate.total,
            reason=reason,
        )  # fmt: skip
        argv += ["--log-verbosity", "4"]  # the buffer sizes the lease is corrected with
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
    if ledger is None or placement is None:
        process, client, api_key = await launch.start()
        return TextModel(process, client, path=model_path, backend=backend, api_key=api_key)
    managed = _Managed(
        ledger, launch, placement, priority=priority, holder=model_path.name,
        lease_timeout=startup_timeout if lease_timeout is None else lease_timeout,
        preempt_grace=preempt_grace, idle_unload=idle_seconds,
    )  # fmt: skip
    lease, process, client, api_key = await managed.load()
    model = TextModel(process, client, path=model_path, backend=backend, api_key=api_key)
    model._managed = managed
    managed.attach(model, lease)
    return model


def _check_managed(
    ledger: Ledger | None, workers: object, idle_unload: object, preempt_grace: object, lease_timeout: object
) -> float | None:
    if ledger is not None and not isinstance(ledger, Ledger):
        raise InvalidArgumentError(f"ledger must be a Ledger from open_ledger(), not {ledger!r}", param="ledger")
    if ledger is not None and workers is not None:
        raise InvalidArgumentError("a model split over rpc workers cannot be loaded through a ledger", param="ledger")
    for name, value in (("preempt_grace", preempt_grace), ("lease_timeout", lease_timeout)):
        if value is None and name == "lease_timeout":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise InvalidArgumentError(f"{name} must be seconds >= 0, not {value!r}", param=name)
    if idle_unload is None:
        return None
    if ledger is None:
        raise InvalidArgumentError("idle_unload needs a ledger (load_model(..., ledger=...))", param="idle_unload")
    if isinstance(idle_unload, bool) or not isinstance(idle_unload, (str, int, float)):
        raise InvalidArgumentError(f"idle_unload must be seconds or a duration like '5m', not {idle_unload!r}")
    return parse_duration(idle_unload)


async def _free_memory(ledger: Ledger, device: str) -> int:
    """Bytes not leased on ``device`` now."""
    capacities = await ledger.capacity()
    name = device if device in capacities else f"{ledger.host}/{device}"
    if name not in capacities:
        known = ", ".join(sorted(capacities)) or "none"
        raise InvalidArgumentError(f"the ledger has no device {device!r} (devices: {known})", param="device")
    held = sum(lease.memory for lease in await ledger.leases(device))
    return max(0, capacities[name] - held)


class _Managed:
    """The lease and the unload/reload life of a model loaded through a ledger.

    State shared with the timer threads and the ledger's listener is under
    ``_lock``: the calls in flight, whether (and why) the server is unloaded,
    a preemption waiting for the calls to end, and the current timer.
    """

    def __init__(
        self, ledger: Ledger, launch: Launch, placement: Placement, *, priority: Priority, holder: str,
        lease_timeout: float, preempt_grace: float, idle_unload: float | None,
    ) -> None:  # fmt: skip
        self.ledger = ledger
        self.launch = launch
        self.placement = placement
        self.priority = priority
        self.holder = holder
        self.lease_timeout = lease_timeout
        self.preempt_grace = preempt_grace
        self.idle_unload = idle_unload
        self.lease: Lease | None = None
        self.model: weakref.ref[TextModel] | None = None
        self.unloaded: str | None = None  # why, while unloaded
        self.reloads = 0
        self._lock = threading.Lock()
        self._in_flight = 0
        self._draining = False
        self._timer: threading.Timer | None = None
        self._last_used = time.monotonic()
        self._reloading = anyio.Lock()

    async def load(self) -> tuple[Lease, ServerProcess, LlamaClient, str]:
        """Take the lease, start the server, correct the lease with what the server reports."""
        lease = await self.ledger.lease(
            self.placement.memory, device=self.placement.device, priority=self.priority, holder=self.holder,
            timeout=self.lease_timeout,
        )  # fmt: skip
        try:
            process, client, api_key = await self.launch.start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await lease.release()
            raise
        try:
            await self._correct(lease, process)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await client.aclose()
                await process.stop()
                await lease.release()
            raise
        return lease, process, client, api_key

    async def _correct(self, lease: Lease, process: ServerProcess) -> None:
        with anyio.move_on_after(_LOG_WAIT):
            while not any(mark in process.output.text() for mark in ("model loaded", "listening on")):
                await anyio.sleep(0.02)
        measured = measured_memory(process.output.lines(), self.placement.device)
        if measured is not None and measured > 0 and measured != lease.memory:
            if await lease.resize(measured):
                _log.debug("%s: lease corrected from %d to %d bytes", self.holder, self.placement.memory, measured)
            else:
                _log.warning("%s uses %d bytes, more than its lease of %d; no room to grow it",
                             self.holder, measured, lease.memory)  # fmt: skip
        self.placement = Placement(
            device=self.placement.device, ctx_size=self.placement.ctx_size, gpu_layers=self.placement.gpu_layers,
            memory=lease.memory, reason=self.placement.reason,
        )  # fmt: skip

    def attach(self, model: TextModel, lease: Lease) -> None:
        """In the event loop: the model runs under ``lease`` now."""
        self.model = weakref.ref(model)
        model.placement = self.placement
        self.lease = lease
        with self._lock:
            self.unloaded = None
            self._draining = False
            self._last_used = time.monotonic()
        lease.add_listener(lambda: self._on_lease(lease))
        with self._lock:
            self._arm_idle_timer()

    # -- calls ------------------------------------------------------------------------------------

    async def enter(self, model: TextModel) -> None:
        """Before a call: reload when unloaded (or wait for a preempted model to drain); count the call."""
        while True:
            if model._closed:
                raise ClosedError("the model is closed")
            with self._lock:
                self._cancel_timer()
                idle = self.idle_unload is not None and time.monotonic() - self._last_used >= self.idle_unload
                if self.unloaded is None and self._in_flight == 0 and idle:
                    self._unload_now(model, "idle")
                if self.unloaded is None and not self._draining:
                    self._in_flight += 1
                    return
                draining = self._draining
            if draining:
                await anyio.sleep(_DRAIN_POLL)
            else:
                await self._reload(model)

    def leave(self) -> None:
        """After a call: unload a preempted model once its last call ended; arm the idle timer."""
        model = self.model() if self.model is not None else None
        with self._lock:
            self._in_flight -= 1
            self._last_used = time.monotonic()
            if self._in_flight == 0 and model is not None:
                if self._draining:
                    self._unload_now(model, "preempted by a waiter of higher priority")
                else:
                    self._arm_idle_timer()

    async def _reload(self, model: TextModel) -> None:
        async with self._reloading:
            if self.unloaded is None or model._closed:
                return
            old_process, old_client = model._process, model._client
            with anyio.CancelScope(shield=True):
                await old_client.aclose()
                await old_process.stop()
                if self.lease is not None:
                    await self.lease.release()
            lease, process, client, api_key = await self.load()
            if model._closed:  # closed while loading
                with anyio.CancelScope(shield=True):
                    await client.aclose()
                    await process.stop()
                    await lease.release()
                raise ClosedError("the model was closed during its reload")
            model._finalizer.detach()  # the old server is stopped
            model._process, model._client, model._api_key, model._hung = process, client, api_key, None
            model._finalizer = weakref.finalize(
                model, _unclosed, process, f"{model.path.name} (llama-server pid {process.pid})"
            )
            self.reloads += 1
            _log.debug("reloaded %s: pid %d", model.path.name, process.pid)
            self.attach(model, lease)

    # -- unloading (any thread) -------------------------------------------------------------------

    def _on_lease(self, lease: Lease) -> None:
        """The ledger's listener, in the event loop: the lease is lost, or a waiter asks for it."""
        model = self.model() if self.model is not None else None
        if model is None or lease is not self.lease or model._closed:
            return
        with self._lock:
            if self.unloaded is not None:
                return
            if lease.lost:
                self._unload_now(model, "its lease was lost")
            elif self._in_flight == 0:
                self._unload_now(model, "preempted by a waiter of higher priority")
            elif not self._draining:
                self._draining = True
                self._start_timer(self.preempt_grace, self._grace_over)

    def _unload_now(self, model: TextModel, reason: str) -> None:
        """Under ``_lock``, from any thread: kill the server and give the lease back without waiting."""
        self._cancel_timer()
        self.unloaded = reason
        self._draining = False
        model._process.kill()
        if self.lease is not None:
            self.lease.release_nowait()
        _log.debug("unloaded %s: %s", model.path.name, reason)

    def _start_timer(self, delay: float, action: Callable[[threading.Timer], None]) -> None:
        self._cancel_timer()
        timer: threading.Timer

        def fire() -> None:
            action(timer)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm_idle_timer(self) -> None:
        if self.idle_unload is not None and self.unloaded is None and self._in_flight == 0:
            self._start_timer(self.idle_unload, self._idle_over)

    def _idle_over(self, timer: threading.Timer) -> None:
        model = self.model() if self.model is not None else None
        with self._lock:
            if timer is self._timer and model is not None and not model._closed and self._in_flight == 0:
                if self.unloaded is None:
                    self._unload_now(model, "idle")

    def _grace_over(self, timer: threading.Timer) -> None:
        model = self.model() if self.model is not None else None
        with self._lock:
            if timer is self._timer and model is not None and not model._closed and self._draining:
                self._unload_now(model, f"preempted; calls still running after the grace of {self.preempt_grace} s")

    async def close(self) -> None:
        """After the server stopped: stop the timer and release the lease (shielded)."""
        with self._lock:
            self._cancel_timer()
        if self.lease is not None:
            with anyio.CancelScope(shield=True):
                await self.lease.release()


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
