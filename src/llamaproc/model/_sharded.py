"""A model split by layers over llama.cpp rpc workers, with failover that loses no token.

llama.cpp's RPC backend does the distributed work: ``ggml-rpc-server`` on
each worker, one llama-server (the *coordinator*) started with ``--rpc
A,B --tensor-split wA,wB -ngl all``. What this module adds is around it:

* **planning**: the workers are probed (a real RPC exchange, not a bare
  connect), the split weights come from their free memory (``"capacity"``),
  are equal (``"uniform"``) or given, and the layers each one holds
  (:attr:`ShardedModel.layout`) are read back from the coordinator's log;
* **failover**: when the coordinator exits (a worker died under it) or a
  stream gets no token for ``stall_timeout`` while nothing computes (a worker
  hangs), the coordinator is killed first (an rpc-server serves one client
  at a time: a healthy worker answers no probe while the coordinator holds
  it), every worker is probed with a deadline, the lost ones are evicted and
  a new coordinator starts over the survivors;
* **exact resume**: each stream that was cut rebuilds its context on the new
  coordinator the way an uninterrupted run built it (the prompt prefilled
  once as a batch, then each generated token decoded on its own: one request
  per token with ``n_predict: 0`` and ``cache_prompt``, pinned to a slot),
  then continues. For greedy decoding the tokens are the ones the
  uninterrupted run would have produced; the caller's ``async for`` sees no
  break and no duplicate.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import anyio
import psutil

from ..client import LlamaClient, TokenStream
from ..errors import (
    ClosedError,
    IncompleteStreamError,
    InvalidArgumentError,
    LlamaprocError,
    ServerCrashedError,
    StalledError,
    StartupError,
    TransportError,
    WorkerBusyError,
    WorkersLostError,
    WorkerUnreachableError,
)
from ..process import RpcWorker, ServerProcess, parse_address, probe_worker, start_worker
from ..protocol import (
    MAX_TOKENS,
    STREAM_PATHS,
    TEMPERATURE,
    StreamKind,
    chat_body,
    chat_params,
    completion_body,
    completion_params,
)
from ..types import Completion, Device, Reshard, Shard, Token, Usage
from ._model import Launch, TextModel, _unclosed

__all__ = ["ShardedModel", "load_sharded", "resumable_error"]

_log = logging.getLogger("llamaproc")

#: How long a worker has to answer a probe at load (an unreachable address fails within it).
LOAD_PROBE_TIMEOUT = 3.0
#: ... and after a failure: a worker that does not answer within it is lost.
PROBE_TIMEOUT = 1.0
#: How long the coordinator's log may lag behind its readiness (its output is read by a thread).
_LOG_WAIT = 5.0
#: Coordinators that exit during start-up one recovery starts again before it gives up.
_START_RETRIES = 3
#: What llama-server logs about a worker it could not reach (group 1: ``host:port``).
_REFUSED = re.compile(r"[Ff]ailed to connect to (\S+?)[\s:,]*$", re.M)
#: CPU seconds the model (coordinator and local workers) must use, as a fraction of the half stall
#: timeout, to count as computing rather than hung when no token came.
STALL_CPU_FRACTION = 0.05
#: Reshards a model keeps in :attr:`ShardedModel.reshards` (the oldest are dropped).
MAX_MODEL_RESHARDS = 256
#: Request keys whose effect depends on the whole generation so far: a stream that uses them is not resumed.
_NOT_RESUMABLE = ("grammar", "json_schema", "response_format", "tools", "tool_choice")
#: Keys of a chat request that a native continuation does not take.
_CHAT_ONLY = (
    "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "logprobs", "top_logprobs",
    "n_probs", "chat_template_kwargs", "reasoning_format", "parallel_tool_calls", "model", "n",
    "add_generation_prompt", "chat_template",
)  # fmt: skip

_DEVICE_LINE = re.compile(r"using device (RPC\d+) \(([^)]+)\)")
_KV_TOTAL = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*\d+ cells,\s*(\d+) layers")
_KV_DEVICE = re.compile(r"llama_kv_cache: RPC\d+\[([^\]]+)\] KV buffer size =\s*([\d.]+) MiB")
_N_LAYER = re.compile(r"print_info: n_layer\s*=\s*(\d+)")


class _WorkerLike(Protocol):
    """A started worker (:class:`~llamaproc.RpcWorker`) as a sharded model uses it."""

    @property
    def address(self) -> str: ...

    @property
    def returncode(self) -> int | None: ...

    def cpu_seconds(self) -> float | None: ...


@dataclass
class _Member:
    """One worker of a sharded model."""

    address: str
    worker: _WorkerLike | None  # a started local worker (its CPU time is known), else None
    weight: float  # its given split weight (``"capacity"`` and ``"uniform"`` recompute it)
    devices: list[Device] = field(default_factory=list)


# --- checks and planning ------------------------------------------------------------------------------


def _check_workers(workers: object) -> list[_Member]:
    if isinstance(workers, (str, bytes)) or not isinstance(workers, Sequence):
        raise InvalidArgumentError(
            f"workers must be a list of 'host:port' addresses or started workers, not {workers!r:.80}", param="workers"
        )
    members: list[_Member] = []
    seen: set[str] = set()
    for item in workers:
        if isinstance(item, str):
            host, port = parse_address(item)
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            worker = None
        elif isinstance(getattr(item, "address", None), str) and callable(getattr(item, "cpu_seconds", None)):
            address = item.address
            worker = cast(_WorkerLike, item)
        else:
            raise InvalidArgumentError(
                f"a worker is a 'host:port' address or a started worker, not {item!r:.80}", param="workers"
            )
        if address in seen:
            raise InvalidArgumentError(f"worker {address} is listed twice", param="workers")
        seen.add(address)
        members.append(_Member(address, worker, 1.0))
    if not members:
        raise InvalidArgumentError("workers must name at least one worker", param="workers")
    return members


def _check_split(split: object, n: int) -> list[float] | None:
    """``None`` for ``"capacity"``/``"uniform"``, else the weights (checked)."""
    if split in ("capacity", "uniform"):
        return None
    if isinstance(split, str):
        raise InvalidArgumentError(
            f"split must be 'capacity', 'uniform' or a list of weights, not {split!r:.40}", param="split"
        )
    if not isinstance(split, Sequence) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) for w in split
    ):
        raise InvalidArgumentError(f"split must be 'capacity', 'uniform' or a list of numbers, not {split!r:.80}",
                                   param="split")
    weights = [float(w) for w in split]
    if len(weights) != n:
        raise InvalidArgumentError(f"split has {len(weights)} weights for {n} workers", param="split")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise InvalidArgumentError(f"split weights must be finite and not negative, not {list(split)!r:.80}",
                                   param="split")
    if sum(weights) <= 0:
        raise InvalidArgumentError("split weights must not all be zero", param="split")
    return weights


def _weights(split: object, members: Sequence[_Member]) -> list[float]:
    """The ``--tensor-split`` weights of ``members`` for this split."""
    if split == "capacity":
        weights = [float(sum(d.free for d in m.devices)) for m in members]
    elif split == "uniform":
        weights = [1.0] * len(members)
    else:
        weights = [m.weight for m in members]
    if sum(weights) <= 0:  # no memory reported, or only zero weights left: share equally
        weights = [1.0] * len(members)
    return weights


def plan_layers(n_layer: int, weights: Sequence[float]) -> list[range]:
    """The layers llama.cpp gives each device for ``--tensor-split weights`` with every layer offloaded.

    llama.cpp numbers the repeating layers ``0 .. n_layer - 1`` and the output
    layer ``n_layer``; layer ``i`` goes to the first device whose cumulative
    share exceeds ``i / (n_layer + 1)``. Contiguous, in device order.
    """
    total = sum(weights)
    splits: list[float] = []
    acc = 0.0
    for w in weights:
        acc += w
        splits.append(acc / total)
    n = n_layer + 1
    owner = [min(bisect.bisect_right(splits, i / n), len(weights) - 1) for i in range(n)]
    ranges: list[range] = []
    start = 0
    for device in range(len(weights)):
        stop = start + owner.count(device)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def read_layout(lines: Sequence[str], addresses: Sequence[str], weights: Sequence[float],
                n_layer: int | None) -> tuple[list[Shard], list[str]]:
    """The layout the coordinator reports in its ``-lv 4`` log, and the addresses it did not use.

    The devices it uses come from ``using device RPCk (host:port)``; the
    layers each holds from its KV buffer size (proportional to its layers),
    checked against llama.cpp's own rule (:func:`plan_layers`), which also
    places the output layer. When the two disagree the log wins.
    """
    used: list[str] = []
    kv_total: tuple[float, int] | None = None
    kv: dict[str, float] = {}
    for line in lines:
        if (m := _DEVICE_LINE.search(line)) is not None:
            used.append(m.group(2))
        elif (m := _KV_TOTAL.search(line)) is not None:
            kv_total = (float(m.group(1)), int(m.group(2)))
        elif (m := _KV_DEVICE.search(line)) is not None:
            kv[m.group(1)] = kv.get(m.group(1), 0.0) + float(m.group(2))
        elif n_layer is None and (m := _N_LAYER.search(line)) is not None:
            n_layer = int(m.group(1))
    missing = [a for a in addresses if a not in used]
    if n_layer is None or missing:
        return [], missing
    planned = plan_layers(n_layer, weights)
    if kv_total is not None and kv_total[1] == n_layer and kv_total[0] > 0:
        per_layer = kv_total[0] / n_layer
        counts = [round(kv.get(a, 0.0) / per_layer) for a in addresses]
        expected = [len(r) - (1 if n_layer in r else 0) for r in planned]
        if sum(counts) == n_layer and counts != expected:
            _log.warning("the coordinator's layers per worker %s differ from llama.cpp's rule %s; using its log",
                         counts, expected)
            ranges: list[range] = []
            start = 0
            for i, c in enumerate(counts):
                stop = start + c + (1 if i == len(counts) - 1 else 0)  # the output layer goes last
                ranges.append(range(start, stop))
                start = stop
            planned = ranges
    return [Shard(a, r) for a, r in zip(addresses, planned, strict=True)], []


# --- the model ----------------------------------------------------------------------------------------

#: Workers in use by a sharded model of this process, by address: an rpc-server serves one coordinator.
_in_use: dict[str, weakref.ref[ShardedModel]] = {}
_in_use_lock = threading.Lock()


def _check_free(members: Sequence[_Member], model: ShardedModel | None) -> None:
    """Raise :class:`WorkerBusyError` for a worker another open model of this process uses."""
    for m in members:
        owner = _in_use.get(m.address)
        other = owner() if owner is not None else None
        if other is not None and other is not model and not other.closed:
            raise WorkerBusyError(
                f"worker {m.address} already serves {other.path.name}: an rpc-server serves one model at a time",
                address=m.address,
            )


def _claim(members: Sequence[_Member], model: ShardedModel) -> None:
    with _in_use_lock:
        _check_free(members, model)
        for m in members:
            _in_use[m.address] = weakref.ref(model)


def _release(addresses: Sequence[str], model: ShardedModel) -> None:
    with _in_use_lock:
        for address in addresses:
            owner = _in_use.get(address)
            if owner is not None and owner() in (model, None):
                del _in_use[address]


class ShardedModel(TextModel):
    """A model whose layers are split over rpc workers; made by :func:`~llamaproc.load_model` with ``workers=``.

    It is a :class:`TextModel` like any other (generate, chat, complete,
    embed, tokenize ...), served by one llama-server (the coordinator) that
    runs its layers on the workers. :attr:`layout` says which worker holds
    which layers, :attr:`lost_workers` which were evicted. When a worker dies
    or hangs the model reshards itself onto the survivors and every stream
    continues where it stopped (its ``reshards`` list says when); with fewer
    than ``min_workers`` left, calls raise :class:`WorkersLostError`.
    """

    def __init__(
        self,
        process: ServerProcess,
        client: LlamaClient,
        *,
        launch: Launch,
        api_key: str,
        members: list[_Member],
        layout: list[Shard],
        split: object,
        parallel: int,
        min_workers: int,
        stall_timeout: float,
        max_reshards: int,
    ) -> None:
        super().__init__(process, client, path=launch.path, backend=launch.backend, api_key=api_key)
        self._launch = launch
        self._members = members
        self._layout = layout
        self._split = split
        self.parallel = parallel
        self.min_workers = min_workers
        self.stall_timeout = stall_timeout
        self.max_reshards = max_reshards
        self._epoch = 0
        self._recover_lock = anyio.Lock()
        self._failed: WorkersLostError | None = None
        self._lost: list[str] = []
        self._reported_cpu: dict[str, float] = {}
        self._last_lost: list[str] = []
        self._owned: list[RpcWorker] = []  # local workers it started itself (``workers=N``)
        #: Every recovery of this model so far, oldest first (the last :data:`MAX_MODEL_RESHARDS`).
        self.reshards: list[Reshard] = []
        #: Called with each :class:`Reshard` of the model once its new coordinator serves (an owner's hook:
        #: a daemon updates its worker registry and metrics). Errors are logged, never raised.
        self.on_reshard: list[Callable[[Reshard], object]] = []
        # Streams cut by a recovery rebuild their context one at a time, each on its own slot; new
        # requests wait until they have (or for a stall timeout at most) so that none takes their slot.
        self._resuming: set[int] = set()
        self._generating: set[int] = set()  # streams that have received tokens and not ended
        self._serving = anyio.Event()
        self._serving.set()
        self._next_slot = 0
        # The stall watchdog: a thread (the library runs under asyncio and trio, and owns no task).
        self._activity = 0  # tokens received by any stream
        self._reading = 0  # streams waiting for a token
        self._stop_watch = threading.Event()
        if stall_timeout != math.inf:
            thread = threading.Thread(
                target=_watch, args=(weakref.ref(self), self._stop_watch, stall_timeout),
                name=f"llamaproc-stall-{process.pid}", daemon=True,
            )  # fmt: skip
            thread.start()

    # -- what it is made of ------------------------------------------------------------------------

    @property
    def layout(self) -> list[Shard]:
        """Which worker holds which layers, in pipeline order (empty: every layer on the coordinator)."""
        return list(self._layout)

    @property
    def workers(self) -> list[str]:
        """The addresses of the workers in use."""
        return [m.address for m in self._members]

    @property
    def lost_workers(self) -> list[str]:
        """The addresses evicted so far."""
        return list(self._lost)

    @property
    def owned_workers(self) -> list[RpcWorker]:
        """The local workers it started itself (``workers=N``) and stops when it closes."""
        return list(self._owned)

    @property
    def degraded(self) -> bool:
        """Whether it lost workers and serves on fewer than it started with."""
        return bool(self._lost)

    def __repr__(self) -> str:
        return f"<ShardedModel {self.path.name} pid={self.pid} workers={','.join(self.workers) or '-'}>"

    def report_cpu(self, address: str, seconds: float) -> None:
        """Record a remote worker's CPU seconds (from its heartbeats): growth means it computes, not hangs."""
        self._reported_cpu[address] = seconds

    def progress(self) -> float | None:
        """CPU seconds of the coordinator and of the workers whose CPU time is known; ``None`` once it is gone."""
        cpu = self._process.cpu_seconds()
        if cpu is None:
            return None
        for m in self._members:
            worker_cpu = m.worker.cpu_seconds() if m.worker is not None else self._reported_cpu.get(m.address)
            cpu += worker_cpu or 0.0
        return cpu

    # -- failure and recovery ----------------------------------------------------------------------

    def _check(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise ClosedError("the model is closed")

    async def wait(self) -> int | None:
        """Return once the model is down for good (closed, or too few workers left).

        A coordinator that exits is replaced (a recovery) and the wait goes on.
        """
        while True:
            epoch, process = self._epoch, self._process
            code = await process.wait()
            if self._closed or self._failed is not None:
                return code
            if self._epoch == epoch:
                try:
                    await self._recover(epoch, f"the coordinator exited with code {code}")
                except LlamaprocError:
                    return code

    async def ready(self) -> None:
        """Wait while it recovers (a new coordinator, cut streams rebuilding); raise when it cannot serve.

        A coordinator found dead with no recovery under way is replaced first.
        For relays that send requests to :attr:`base_url` themselves.
        """
        if self._recover_lock.locked():
            async with self._recover_lock:
                pass
        await self._wait_serving()
        self._check()
        if self._process.returncode is not None:
            await self._recover(self._epoch, self.describe_exit())

    async def evict(self, address: str) -> None:
        """Take a worker out of the model now: the coordinator restarts over the others and streams resume."""
        if address not in self.workers:
            raise InvalidArgumentError(f"{address} is not a worker of this model", param="address")
        await self._recover(self._epoch, f"worker {address} was evicted", evict=(address,))

    async def _recover(self, epoch: int, reason: str, *, evict: Sequence[str] = ()) -> None:
        """Replace the coordinator of ``epoch`` with one over the workers that still answer.

        Runs once per failure whoever sees it first; the others wait for it and
        find the epoch moved on. Raises :class:`WorkersLostError` when fewer
        than ``min_workers`` are left, :class:`ClosedError` once closed.
        """
        async with self._recover_lock:
            self._check()
            if self._epoch != epoch:
                return
            started = time.monotonic()
            self._serving = anyio.Event()
            try:
                await self._replace(reason, evict)
            finally:
                self._next_slot = 0
                # Every stream that had tokens is cut and will resume (or end): hold new requests until then.
                self._resuming |= self._generating
                if not self._resuming:
                    self._serving.set()
            seconds = time.monotonic() - started
            _log.info("%s resharded in %.3f s (%s): lost %s, layout %s", self.path.name,
                         seconds, reason, self._lost, self._layout)
            reshard = Reshard(0, list(self._last_lost), self.layout, seconds, 0.0, seconds, 0.0, reason)
            self.reshards.append(reshard)
            del self.reshards[:-MAX_MODEL_RESHARDS]
            for hook in list(self.on_reshard):
                try:
                    hook(reshard)
                except Exception:  # noqa: BLE001 - an observer must not break the recovery
                    _log.exception("an on_reshard hook of %s failed", self.path.name)

    async def _replace(self, reason: str, evict: Sequence[str]) -> None:
        # Kill the coordinator first: a healthy worker answers no probe while it holds the worker.
        old_process, old_client = self._process, self._client
        old_process.kill()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(5.0):
                await old_process.wait()
            await old_client.aclose()
            await old_process.stop()
        lost: list[str] = []
        failed_starts = 0
        while True:
            survivors = await self._probe_members(evict)
            lost += [m.address for m in self._members if m not in survivors]
            if len(survivors) < self.min_workers:
                self._members = survivors
                self._lost += lost
                self._failed = WorkersLostError(
                    f"{self.path.name} lost workers {', '.join(self._lost)} ({reason}); {len(survivors)} left, "
                    f"fewer than min_workers={self.min_workers}",
                    lost=self._lost,
                )
                _release(lost, self)
                raise self._failed
            self._members = survivors
            try:
                process, client, api_key, layout, missing = await _start_coordinator(
                    self._launch, survivors, self._split
                )
            except StartupError as exc:
                # A worker that answered the probe and died as the coordinator connected can make the
                # coordinator exit: probe again without the ones it names, a few times at most.
                failed_starts += 1
                if failed_starts > _START_RETRIES:
                    self._lost += lost
                    _release(lost, self)
                    raise
                evict = tuple(_REFUSED.findall(exc.output or ""))
                _log.info("the new coordinator exited during start-up (%s); probing the workers again",
                          ", ".join(evict) or "no worker named")  # fmt: skip
                continue
            if not missing:
                break
            # A worker that answered the probe was gone by the time the coordinator connected.
            await client.aclose()
            await process.stop()
            evict = tuple(missing)
        self._lost += lost
        _release(lost, self)
        self._finalizer.detach()
        self._process, self._client, self._api_key = process, client, api_key
        self._finalizer = weakref.finalize(
            self, _unclosed, process, f"{self.path.name} (llama-server pid {process.pid})"
        )
        self._hung = None
        self._layout = layout
        self._epoch += 1
        self._last_lost = lost

    async def _probe_members(self, evict: Sequence[str]) -> list[_Member]:
        results: dict[str, list[Device] | None] = {}

        async def probe(m: _Member) -> None:
            if m.address in evict or (m.worker is not None and m.worker.returncode is not None):
                results[m.address] = None
                return
            try:
                results[m.address] = await probe_worker(m.address, timeout=PROBE_TIMEOUT)
            except WorkerUnreachableError as exc:
                _log.info("worker %s is lost: %s", m.address, exc)
                results[m.address] = None

        async with anyio.create_task_group() as tg:
            for m in self._members:
                tg.start_soon(probe, m)
        survivors = []
        for m in self._members:
            devices = results.get(m.address)
            if devices is not None:
                m.devices = devices
                survivors.append(m)
        return survivors

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        """A request that is not streamed: after a failure of the coordinator, recover and send it again."""
        for attempt in range(self.max_reshards + 1):
            epoch = self._epoch
            await self._wait_serving()
            self._check()
            self._reading += 1
            try:
                return await super()._call(getattr(self._client, method.__name__), *args, **kwargs)
            except (ServerCrashedError, TransportError, IncompleteStreamError) as exc:
                if attempt == self.max_reshards or self._closed:
                    raise
                await self._recover(epoch, str(exc).splitlines()[0])
            finally:
                self._reading -= 1
        raise AssertionError("unreachable")

    async def _wait_serving(self) -> None:
        """Wait (a stall timeout at most) while cut streams rebuild their context on a new coordinator."""
        if not self._serving.is_set():
            with anyio.move_on_after(self.stall_timeout if self.stall_timeout != math.inf else 60.0):
                await self._serving.wait()

    def _take_slot(self, token: int) -> int:
        self._resuming.add(token)
        if self._serving.is_set():
            self._serving = anyio.Event()
        slot = self._next_slot % self.parallel
        self._next_slot += 1
        return slot

    def _resumed(self, token: int, *, ended: bool = False) -> None:
        """Stream ``token`` continues on the new coordinator (its slot is busy), or ``ended``."""
        if ended:
            self._generating.discard(token)
        self._resuming.discard(token)
        if not self._resuming and not self._recover_lock.locked():
            self._serving.set()

    # -- generation ----------------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = MAX_TOKENS,
                 temperature: float = TEMPERATURE, stop: str | Sequence[str] | None = None,
                 **params: Any) -> TokenStream:
        """Like :meth:`TextModel.generate`; the stream survives the loss of a worker (see ``stream.reshards``)."""
        params = completion_params(max_tokens, temperature, stop, params)
        self._check()
        return _ResumingStream(self, "native", completion_body(prompt, params))

    def chat(self, messages: Sequence[Mapping[str, Any]], *, max_tokens: int = MAX_TOKENS,
             temperature: float = TEMPERATURE, stop: str | Sequence[str] | None = None,
             **params: Any) -> TokenStream:
        """Like :meth:`TextModel.chat`; the stream survives the loss of a worker (see ``stream.reshards``)."""
        params = chat_params(messages, max_tokens, temperature, stop, params)
        self._check()
        body = chat_body(messages, params)
        if "n_probs" not in body and not body.get("logprobs"):
            body["n_probs"] = 1  # the OpenAI routes give token ids only with their probabilities
        return _ResumingStream(self, "chat", body)

    def _open(self, kind: StreamKind, body: dict[str, Any]) -> TokenStream:
        return TokenStream(self._client, STREAM_PATHS[kind], body, kind)

    # -- for relays: streams sent by someone else -----------------------------------------------------

    def wants_token_ids(self, kind: StreamKind, body: dict[str, Any]) -> bool:
        """Add to ``body`` what a relay needs to resume its stream (token ids); ``False``: not resumable.

        The OpenAI routes report token ids only with their probabilities:
        ``n_probs: 1`` is added unless the request asks for logprobs itself.
        A relay that adds it should remove the probabilities from what it
        passes on when the client did not ask for them.
        """
        if not resumable_request(kind, body):
            return False
        if kind == "native":
            body["return_tokens"] = True
        elif "n_probs" not in body and not body.get("logprobs"):
            body["n_probs"] = 1
        return True

    def continue_stream(
        self, kind: StreamKind, body: dict[str, Any], token_ids: Sequence[int], *, delivered: int,
        base_url: str, reason: str, last_token: float,
    ) -> TokenStream:
        """The rest of a stream that a relay sent to ``base_url`` and lost after ``token_ids``.

        ``delivered`` tokens (``time.monotonic()`` of the last: ``last_token``)
        reached the relay's client. The model recovers if no one has yet (the
        coordinator at ``base_url`` is still the current one), rebuilds the
        stream's context and continues with native tokens (text and id), the
        way a stream of :meth:`generate` does; its ``reshards`` say what
        happened. The body is the request as sent (see :meth:`wants_token_ids`).
        """
        cut = _Cut(list(token_ids), delivered, base_url, reason, last_token)
        return _ResumingStream(self, kind, body, cut=cut)

    async def _prompt_of(self, kind: StreamKind, body: Mapping[str, Any]) -> list[Any]:
        """The prompt of a request as a mixed list (text, then ids) that a continuation extends with ids."""
        if kind != "chat":
            prompt = body["prompt"]
            return [prompt] if isinstance(prompt, str) else list(prompt)
        template = {k: body[k] for k in ("messages", "chat_template_kwargs", "tools") if k in body}
        answer = await self._client.post("/apply-template", template)
        return [answer["prompt"]]

    async def _rebuild(self, slot: int, prompt: list[Any], ids: Sequence[int]) -> None:
        """Build a cut stream's context on slot ``slot`` as the uninterrupted run did.

        The prompt is prefilled once, as one batch; then each generated token
        but the last is decoded on its own (the continuation decodes the last).
        """
        base = {"n_predict": 0, "cache_prompt": True, "id_slot": slot, "stream": False}
        client = self._client
        await client.post("/completion", {**base, "prompt": prompt})
        for i in range(1, len(ids)):
            await client.post("/completion", {**base, "prompt": [*prompt, *ids[:i]]})

    async def close(self) -> None:
        """Stop the coordinator; the workers it used are free for another model (started ones keep running)."""
        self._stop_watch.set()
        with anyio.CancelScope(shield=True):
            try:
                await super().close()
            finally:
                _release([m.address for m in self._members], self)
                owned, self._owned = self._owned, []
                for worker in owned:
                    await worker.close()


def _watch(ref: weakref.ref[ShardedModel], stop: threading.Event, stall_timeout: float) -> None:
    """The stall watchdog: every half stall timeout, is a stream waiting with no token and nothing computing?

    Two halves in a row with streams waiting, no token received and (almost)
    no CPU time used by the coordinator and the workers whose CPU time is
    known make a hang: the coordinator is killed, which makes every stream
    recover (a worker that computes a long prompt keeps its CPU time growing).
    """
    half = stall_timeout / 2
    seen = -1
    silent = False
    cpu: float | None = None
    while not stop.wait(half):
        model = ref()
        if model is None or model.closed:
            return
        if model._reading == 0 or model._activity != seen or model._recover_lock.locked():
            seen, silent, cpu = model._activity, False, model.progress()
            del model
            continue
        before, cpu = cpu, model.progress()
        working = cpu is not None and before is not None and cpu - before >= STALL_CPU_FRACTION * half
        if silent and not working:
            model.kill(f"no token for {stall_timeout:g} s while the coordinator and its workers used no CPU time")
            silent = False
        else:
            silent = not working
        del model


class _Resume:
    """A cut stream waiting to continue: its slot and when the cut was seen."""

    __slots__ = ("slot", "token", "detected", "last_token", "restarted", "replayed", "lost", "reason")

    def __init__(self, slot: int, token: int, last_token: float, detected: float, reason: str) -> None:
        self.slot, self.token, self.last_token, self.detected, self.reason = slot, token, last_token, detected, reason
        self.restarted = self.replayed = detected
        self.lost: list[str] = []


def resumable_request(kind: StreamKind, body: Mapping[str, Any]) -> bool:
    """Whether a stream of this request can continue exactly on another coordinator (see the README)."""
    if any(body.get(k) for k in _NOT_RESUMABLE):
        return False
    if kind != "chat":
        prompt = body.get("prompt")
        if not isinstance(prompt, str) and not (
            isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            return False  # several prompts, or none
    return not body.get("echo") and not body.get("suffix") and body.get("n", 1) == 1


def resumable_error(exc: LlamaprocError) -> bool:
    """Whether a stream's failure (as :meth:`TextModel.explain` tells it) is a cut a recovery can resume from:
    the coordinator died or hung, or the connection to it broke."""
    return isinstance(exc, (ServerCrashedError, TransportError, IncompleteStreamError, StalledError))


_tickets = itertools.count(1)


@dataclass(frozen=True)
class _Cut:
    """A stream another reader sent and lost: what it had received when it was cut."""

    token_ids: list[int]
    delivered: int
    base_url: str
    reason: str
    last_token: float


class _ResumingStream(TokenStream):
    """A stream of a sharded model: survives the loss of a worker without a break or a duplicate token."""

    __slots__ = ("_model", "_kind", "_body", "_ids", "_texts", "_reshards", "_inner", "_result", "_error",
                 "_released", "_closed_by_user", "_done_hook", "_error_hook", "_ticket", "_offset", "_cut")

    def __init__(self, model: ShardedModel, kind: StreamKind, body: dict[str, Any], *,
                 cut: _Cut | None = None) -> None:
        self._model = model
        self._kind = kind
        self._body = body
        self._ids: list[int] = [] if cut is None else list(cut.token_ids)
        self._offset = 0 if cut is None else cut.delivered  # tokens delivered before this object took over
        self._cut = cut
        self._texts: list[str] = []
        self._reshards: list[Reshard] = []
        self._inner: TokenStream | None = None
        self._result: Completion | None = None
        self._error: LlamaprocError | None = None
        self._released = False
        self._closed_by_user = False
        self._done_hook: Callable[[Completion], None] | None = model._finished
        self._error_hook: Any = None
        self._agen = None
        self._ticket = next(_tickets)
        self._error_hook = model.explain

    @property
    def result(self) -> Completion | None:
        return self._result

    @property
    def error(self) -> LlamaprocError | None:
        return self._error

    @property
    def error_hook(self) -> Any:
        return self._error_hook

    @error_hook.setter
    def error_hook(self, hook: Any) -> None:
        self._error_hook = hook

    @property
    def done_hook(self) -> Callable[[Completion], None] | None:
        return self._done_hook

    @done_hook.setter
    def done_hook(self, hook: Callable[[Completion], None] | None) -> None:
        self._done_hook = hook

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def reshards(self) -> list[Reshard]:
        """One :class:`Reshard` per recovery this stream went through (so far)."""
        return list(self._reshards)

    async def aclose(self) -> None:
        self._released = True
        agen = self._agen
        with anyio.CancelScope(shield=True):
            if agen is not None and agen.ag_running:
                self._closed_by_user = True
                if self._inner is not None:
                    await self._inner.aclose()
            elif agen is not None:
                await agen.aclose()
            elif self._inner is not None:
                await self._inner.aclose()

    def _limit(self) -> int | None:
        body = self._body
        if self._kind == "native":
            value = body.get("n_predict")
        else:
            value = body.get("max_tokens", body.get("max_completion_tokens", body.get("n_predict")))
        return None if not isinstance(value, int) or value < 0 else value

    async def _begin(self) -> AsyncGenerator[Token, None]:
        model = self._model
        resume: _Resume | None = None
        prompt: list[Any] | None = None
        last_token = time.monotonic()
        explained = False  # the error to raise has been explained already
        try:
            cut = self._cut
            if cut is not None:
                # Continue a request another reader had sent: recover unless someone already has.
                self._cut = None
                last_token = cut.last_token
                epoch = model._epoch if model.base_url == cut.base_url else -1
                step = await self._recover(epoch, cut.reason, time.monotonic(), last_token)
                if step is False:
                    return
                resume = step
            while True:
                if self._released:
                    raise ClosedError("the stream is closed")
                epoch = model._epoch
                try:
                    if resume is None:
                        await model._wait_serving()
                        model._check()
                        inner = model._open(self._kind, self._body)
                    else:
                        model._check()
                        if prompt is None:
                            prompt = await model._prompt_of(self._kind, self._body)
                        resume.restarted = time.monotonic()
                        model._reading += 1
                        try:
                            await model._rebuild(resume.slot, prompt, self._ids)
                        finally:
                            model._reading -= 1
                        resume.replayed = time.monotonic()
                        inner = self._continuation(prompt, resume.slot)
                    self._inner = inner
                    got = len(self._ids)
                    async with inner:
                        it = inner.__aiter__()
                        while True:
                            model._reading += 1
                            try:
                                token = await it.__anext__()
                            except StopAsyncIteration:
                                break
                            finally:
                                model._reading -= 1
                            model._activity += 1
                            last_token = time.monotonic()
                            if token.id is not None:
                                self._ids.append(token.id)
                            else:
                                self._ids[got:] = inner.token_ids
                            if resume is not None:
                                self._resumed(resume, last_token)
                                resume = None
                            self._texts.append(token.text)
                            model._generating.add(self._ticket)
                            yield token
                    if resume is not None:  # the continuation ended at once (e.g. the limit was reached)
                        self._resumed(resume, time.monotonic())
                        resume = None
                    self._finish(inner.result, got)
                    return
                except LlamaprocError as exc:
                    if self._closed_by_user or self._released:
                        raise ClosedError("the stream was closed") from exc
                    if model._epoch == epoch and not model._recover_lock.locked():
                        exc = await model.explain(exc)
                        if not resumable_error(exc):
                            explained = True
                            raise exc
                    # else: cut by a recovery under way or done (its old client closed): resume
                    if not self._can_resume():
                        explained = True
                        raise IncompleteStreamError(
                            "the stream was cut by the loss of a worker and is not resumed: its output is "
                            "constrained (grammar, json_schema, response_format or tools) or it has several prompts"
                        ) from exc
                    if len(self._reshards) >= model.max_reshards:
                        raise exc
                    if resume is not None:
                        model._resumed(resume.token)
                        resume = None
                    step = await self._recover(epoch, str(exc).splitlines()[0], time.monotonic(), last_token)
                    if step is False:
                        return
                    resume = step
        except LlamaprocError as exc:
            error = exc
            if self._error_hook is not None and not explained and not isinstance(exc, (WorkersLostError, ClosedError)):
                error = await self._error_hook(exc)
            self._error = error
            if error is exc:
                raise
            raise error from exc
        finally:
            model._resumed(self._ticket, ended=True)
            inner_stream = self._inner
            if inner_stream is not None:
                with anyio.CancelScope(shield=True):
                    await inner_stream.aclose()

    async def _recover(
        self, epoch: int, reason: str, detected: float, last_token: float
    ) -> _Resume | None | Literal[False]:
        """After a failure seen at ``detected``: recover the model, then say how to go on.

        A :class:`_Resume` (rebuild the context, continue), ``None`` (nothing
        generated yet: send the request again) or ``False`` (the limit was
        reached: the stream is complete).
        """
        model = self._model
        if epoch >= 0:
            await model._recover(epoch, reason)
        else:
            model._check()
        if not self._ids:
            now = time.monotonic()
            self._reshards.append(Reshard(self._offset, list(model._last_lost), model.layout, now - detected,
                                          detected - last_token, now - detected, 0.0, reason))
            return None
        limit = self._limit()
        if limit is not None and len(self._ids) >= limit:
            self._finish(None, len(self._ids))
            return False
        return _Resume(model._take_slot(self._ticket), self._ticket, last_token, detected, reason)

    def _resumed(self, resume: _Resume, now: float) -> None:
        self._model._resumed(resume.token)
        self._reshards.append(Reshard(
            after_tokens=self._offset + len(self._texts),
            lost=list(self._model._last_lost),
            layout=self._model.layout,
            seconds=now - resume.detected,
            detect_seconds=resume.detected - resume.last_token,
            restart_seconds=resume.restarted - resume.detected,
            replay_seconds=resume.replayed - resume.restarted,
            reason=resume.reason,
        ))  # fmt: skip

    def _can_resume(self) -> bool:
        return resumable_request(self._kind, self._body)

    def _continuation(self, prompt: list[Any], slot: int) -> TokenStream:
        """The native request that continues after the tokens so far, on slot ``slot``."""
        if self._kind == "native":
            params = {k: v for k, v in self._body.items() if k not in ("prompt", "n_predict")}
        else:
            params = {k: v for k, v in self._body.items() if k not in _CHAT_ONLY and k not in ("prompt", "n_predict")}
        limit = self._limit()
        remaining = -1 if limit is None else limit - len(self._ids)
        body = {**params, "prompt": [*prompt, *self._ids], "n_predict": remaining, "stream": True,
                "return_tokens": True, "cache_prompt": True, "id_slot": slot}
        return TokenStream(self._model._client, STREAM_PATHS["native"], body, "native")

    def _finish(self, last: Completion | None, before: int) -> None:
        """Keep the summary: the text and ids of every piece, the usage and timings of the last one."""
        generated = len(self._ids)
        usage = last.usage if last is not None else Usage()
        # A continuation's prompt is the original one plus the tokens generated before it.
        prompt_tokens = max(usage.prompt_tokens - before, 0)
        finish = last.finish_reason if last is not None else "limit"
        if self._kind != "native" and (self._reshards or last is None):
            finish = {"limit": "length", "eos": "stop", "word": "stop"}.get(finish or "", finish)
        self._result = Completion(
            text="".join(self._texts),
            finish_reason=finish,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=generated,
                        total_tokens=prompt_tokens + generated),
            timings=last.timings if last is not None else None,
            token_ids=list(self._ids),
        )
        if self._done_hook is not None:
            self._done_hook(self._result)


async def _start_coordinator(
    launch: Launch, members: Sequence[_Member], split: object
) -> tuple[ServerProcess, LlamaClient, str, list[Shard], list[str]]:
    """Start llama-server over ``members`` (every layer on the coordinator when there is none)."""
    addresses = [m.address for m in members]
    if members:
        weights = _weights(split, members)
        extra = ["--rpc", ",".join(addresses), "--device", ",".join(f"RPC{i}" for i in range(len(members))),
                 "--n-gpu-layers", "999", "--tensor-split", ",".join(f"{w:g}" for w in weights),
                 "--fit", "off", "-lv", "4"]  # fmt: skip
    else:
        weights, extra = [], ["--n-gpu-layers", "0", "--fit", "off"]
    # Without a backtrace (gdb) a coordinator whose worker died exits at once instead of after ~1 s.
    process, client, api_key = await launch.start(extra, {"GGML_NO_BACKTRACE": "1"})
    if not members:
        return process, client, api_key, [], []
    # Ready may be seen on its socket before the output thread has read the log up to there.
    with anyio.move_on_after(_LOG_WAIT):
        while not any("listening on" in line for line in process.output.lines()[-40:]):
            await anyio.sleep(0.005)
    layout, missing = read_layout(process.output.lines(), addresses, weights, None)
    if not layout and not missing:
        await client.aclose()
        await process.stop()
        raise WorkerUnreachableError(f"could not read the layer layout from llama-server's log:\n"
                                     f"{process.output.summary()}")
    return process, client, api_key, layout, missing


async def load_sharded(
    launch: Launch,
    *,
    workers: object,
    split: object,
    min_workers: object,
    stall_timeout: object,
    max_reshards: object,
    parallel: int,
    threads: int | None = None,
) -> ShardedModel:
    """:func:`~llamaproc.load_model` with ``workers=``: probe the workers, start the coordinator, read its layout.

    ``workers`` as an int starts that many local workers that the model owns (and stops when it closes).
    """
    if isinstance(workers, int) and not isinstance(workers, bool):
        if workers < 1:
            raise InvalidArgumentError(f"workers must be at least 1, not {workers}", param="workers")
        _check_split(split, workers)
        owned: list[RpcWorker] = []
        # Workers on this machine share its cores: each gets its part (ggml's threads spin while they wait,
        # so more threads than cores slow everything down).
        per_worker = threads if threads is not None else max(1, (psutil.cpu_count(logical=False) or 1) // workers)
        try:
            for _ in range(workers):
                owned.append(await start_worker(threads=per_worker, binary=launch.backend.binary))
            model = await load_sharded(
                launch, workers=owned, split=split, min_workers=min_workers, stall_timeout=stall_timeout,
                max_reshards=max_reshards, parallel=parallel, threads=threads,
            )  # fmt: skip
        except BaseException:
            with anyio.CancelScope(shield=True):
                for started in owned:
                    await started.close()
            raise
        model._owned = owned
        return model
    members = _check_workers(workers)
    weights = _check_split(split, len(members))
    if weights is not None:
        for m, w in zip(members, weights, strict=True):
            m.weight = w
    if not isinstance(min_workers, int) or isinstance(min_workers, bool) or not 0 <= min_workers <= len(members):
        raise InvalidArgumentError(
            f"min_workers must be an int from 0 to the number of workers ({len(members)}), not {min_workers!r:.40}",
            param="min_workers",
        )
    if not isinstance(max_reshards, int) or isinstance(max_reshards, bool) or max_reshards < 0:
        raise InvalidArgumentError(f"max_reshards must be an int >= 0, not {max_reshards!r:.40}", param="max_reshards")
    if (
        not isinstance(stall_timeout, (int, float)) or isinstance(stall_timeout, bool) or not stall_timeout > 0
        or math.isnan(stall_timeout)
    ):
        raise InvalidArgumentError(f"stall_timeout must be a number of seconds > 0, not {stall_timeout!r:.40}",
                                   param="stall_timeout")
    if any(a in ("--n-gpu-layers", "-ngl", "--rpc", "--tensor-split", "-ts") for a in launch.argv):
        raise InvalidArgumentError(
            "gpu_layers, --rpc and --tensor-split cannot be given with workers: a sharded model puts every layer "
            "on its workers", param="workers"
        )
    _check_free(members, None)

    errors: dict[str, WorkerUnreachableError] = {}

    async def probe(m: _Member) -> None:
        try:
            m.devices = await probe_worker(m.address, timeout=LOAD_PROBE_TIMEOUT)
        except WorkerUnreachableError as exc:
            errors[m.address] = exc

    async with anyio.create_task_group() as tg:
        for m in members:
            tg.start_soon(probe, m)
    if errors:
        first = next(iter(errors.values()))
        lines = "\n".join(f"  {a}: {e}" for a, e in errors.items())
        raise WorkerUnreachableError(f"{len(errors)} of {len(members)} workers did not answer:\n{lines}",
                                     address=first.address) from first
    process, client, api_key, layout, missing = await _start_coordinator(launch, members, split)
    if missing:
        await client.aclose()
        await process.stop()
        raise WorkerUnreachableError(f"llama-server could not use workers {', '.join(missing)}",
                                     address=missing[0])
    model = ShardedModel(
        process, client, launch=launch, api_key=api_key, members=members, layout=layout, split=split,
        parallel=parallel, min_workers=min_workers, stall_timeout=float(stall_timeout), max_reshards=max_reshards,
    )  # fmt: skip
    _claim(members, model)
    return model
