"""Keep one model's llama-server running: load it, watch it, restart it.

A :class:`Supervisor` owns the llama-server child of one configured model
(:class:`~llamaproc.ModelConfig`). It reports a :class:`Phase`::

    Pending ──start()──▶ Loading ──▶ Serving
                            ▲           │ exit, or /health stops answering
                            └─ backoff ◀┘
                                  │ too many restarts in the window
                                  ▼
                                Failed   (until start(reset=True) or stop())

* A crash is seen at once (a Linux pidfd wakes the watcher the moment the
  child exits; elsewhere ``returncode`` is polled every 50 ms), and a child
  whose ``/health`` fails ``health_failures`` probes in a row is killed and
  treated as crashed.
* A failed load counts like a crash. Restarts wait ``restart_backoff``,
  doubled for every restart still inside ``restart_window``, up to
  ``restart_backoff_max``; a crash that would make more than
  ``max_restarts`` restarts within ``restart_window`` marks the model Failed.
* :meth:`Supervisor.ready` waits while the model is loading, returns the
  :class:`~llamaproc.TextModel` once it serves, and raises
  :class:`~llamaproc.ModelUnavailableError` with the last error when it is
  Failed or when the load it waited for failed.
* Every delay and window is measured on the event loop's clock
  (:func:`anyio.current_time`), so that it can be driven by a virtual clock
  (``trio.testing.MockClock``) in tests.

Run it with ``async with Supervisor(name, config) as sup:`` (it starts
loading at once), or call :meth:`Supervisor.run` in a task group of your own
(as :class:`~llamaproc.ModelPool` does) and :meth:`Supervisor.start`.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, Literal, Self
from urllib.parse import urlsplit

import anyio
import anyio.abc
from typing_extensions import TypeVar

from ..errors import InvalidArgumentError, LlamaprocError, ModelUnavailableError, ShuttingDownError, UsageError
from ..model import TextModel, load_model
from ..types import Shard
from ._config import ModelConfig
from ._endpoint import Endpoint, Loader
from ._status import Condition, Phase

__all__ = ["E", "Supervisor", "backoff_delay"]

_log = logging.getLogger("llamaproc.supervisor")

#: How long a crashed model's client stays open for its requests to see the crash.
_RETIRE_DELAY = 1.0

#: The kind of endpoint a supervisor (and a pool) hands out: a TextModel unless its loader makes another.
E = TypeVar("E", bound=Endpoint, default=TextModel)


#: Condition types a supervisor keeps, in this order (a sharded model's supervisor adds ``Degraded``).
CONDITION_TYPES = ("Loaded", "Ready", "Crashed", "Failed")


def _now() -> datetime:
    return datetime.now(UTC)


class _Unloaded(ModelUnavailableError):
    """ready() was called, or was waiting, while the model is not wanted (stopped or never started)."""


class Supervisor(Generic[E]):
    """Load one model, keep it serving, restart it when it crashes.

    What it supervises is an :class:`~llamaproc.runtime.Endpoint` (a
    :class:`~llamaproc.TextModel` with the default loader). ``loader`` is called as ``loader(config.path, binary=..., parallel=...,
    ctx_size=..., gpu_layers=..., threads=..., embeddings=..., args=...,
    env=...)`` (default :func:`llamaproc.load_model`), plus ``grace=`` when
    the config has a ``restart_grace_period``. ``health_interval``
    seconds between ``/health`` probes (``None`` disables probing), each
    allowed ``health_timeout`` seconds; ``health_failures`` failed probes in
    a row count as a crash. ``on_change(supervisor, event)`` is called on
    every state change, ``event`` one of ``"loading"``, ``"serving"``,
    ``"crashed"``, ``"load_failed"``, ``"restarting"``, ``"failed"``,
    ``"stopped"``.
    """

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        *,
        loader: Loader = load_model,
        restart_backoff: float = 0.5,
        restart_backoff_max: float = 30.0,
        max_restarts: int = 5,
        restart_window: float = 60.0,
        health_interval: float | None = 1.0,
        health_timeout: float | None = None,
        health_failures: int = 3,
        on_change: Callable[[Supervisor[Any], str], None] | None = None,
    ) -> None:
        if restart_backoff <= 0 or restart_backoff_max < restart_backoff:
            raise InvalidArgumentError("need 0 < restart_backoff <= restart_backoff_max", param="restart_backoff")
        if max_restarts < 0 or restart_window <= 0 or health_failures < 1:
            raise InvalidArgumentError("need max_restarts >= 0, restart_window > 0 and health_failures >= 1")
        self.name = name
        self.config = config
        self._loader = loader
        self.restart_backoff = restart_backoff
        self.restart_backoff_max = restart_backoff_max
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.health_interval = health_interval
        self.health_timeout = health_timeout if health_timeout is not None else max(2.0, health_interval or 0.0)
        self.health_failures = health_failures
        self._on_change = on_change

        self._phase = Phase.PENDING
        self._want = False
        self._model: E | None = None
        #: Times (the event loop's clock) of the restarts inside the current window.
        self._restart_times: collections.deque[float] = collections.deque()
        self._restarts = 0
        self._loads = 0
        self._load_failures = 0
        self._last_error: str | None = None
        self._retry_at: float | None = None
        #: True while backing off after a failed load (not after a crash).
        self._load_backoff = False
        self._stopping = 0
        self._running = False
        self._closed = False
        self._cycle_scope: anyio.CancelScope | None = None
        self._changed: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._retirements: anyio.abc.TaskGroup
        now = _now()
        self._conditions: dict[str, Condition] = {
            "Loaded": Condition(type="Loaded", status="False", reason="NotLoaded",
                                message="not loaded yet", last_transition_time=now),
            "Ready": Condition(type="Ready", status="False", reason="NotLoaded",
                               message="not loaded yet", last_transition_time=now),
            "Crashed": Condition(type="Crashed", status="False", reason="NoCrash",
                                 message="no crash seen", last_transition_time=now),
            "Failed": Condition(type="Failed", status="False", reason="NoFailure",
                                message="", last_transition_time=now),
        }  # fmt: skip
        self._condition_types: tuple[str, ...] = CONDITION_TYPES
        if config.sharded:
            self._condition_types += ("Degraded",)
            self._conditions["Degraded"] = Condition(type="Degraded", status="False", reason="AllWorkers",
                                                     message="no worker lost", last_transition_time=now)

    # -- state --------------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def conditions(self) -> list[Condition]:
        """Copies of the conditions (types ``Loaded``, ``Ready``, ``Crashed``, ``Failed``, and ``Degraded``
        for a sharded model: true while it serves on fewer workers than it was loaded with)."""
        if "Degraded" in self._conditions:
            lost = self.lost_workers or []
            if lost:
                self._condition("Degraded", "True", "WorkersLost", f"serving without lost workers {', '.join(lost)}")
            else:
                self._condition("Degraded", "False", "AllWorkers", "no worker lost")
        return [self._conditions[t].model_copy() for t in self._condition_types]

    @property
    def layout(self) -> list[Shard]:
        """The serving model's layout: which worker holds which layers (empty when not sharded or not serving)."""
        model = self.model
        layout = getattr(model, "layout", None) if model is not None else None
        return list(layout) if isinstance(layout, list) else []

    @property
    def lost_workers(self) -> list[str] | None:
        """The workers the serving sharded model lost (``[]`` when not serving); ``None`` for a model not sharded."""
        if not self.config.sharded:
            return None
        model = self.model
        lost = getattr(model, "lost_workers", None) if model is not None else None
        return [str(a) for a in lost] if isinstance(lost, list) else []

    @property
    def stopping(self) -> bool:
        """True while :meth:`stop` waits for the child to be gone."""
        return self._stopping > 0

    @property
    def backing_off(self) -> bool:
        """True while it waits to retry a load that failed (:meth:`ready` then fails at once)."""
        return self._load_backoff

    async def changed(self) -> None:
        """Return at its next change of state (phase, model, conditions)."""
        await self._event().wait()

    @property
    def wanted(self) -> bool:
        """Whether the model should be loaded: :meth:`start` was called and :meth:`stop` not since."""
        return self._want

    @property
    def active(self) -> bool:
        """Wanted and not Failed: a process is running, starting, or about to be restarted."""
        return self._want and self._phase is not Phase.FAILED

    @property
    def model(self) -> E | None:
        """The serving model, or ``None`` unless the phase is Serving."""
        return self._model if self._phase is Phase.SERVING else None

    @property
    def pid(self) -> int | None:
        return self._model.pid if self._model is not None else None

    @property
    def port(self) -> int | None:
        if self._model is None:
            return None
        try:
            return urlsplit(self._model.base_url).port
        except (LlamaprocError, ValueError):
            return None

    @property
    def restarts(self) -> int:
        """Restarts since the supervisor was made (after crashes and failed loads)."""
        return self._restarts

    @property
    def loads(self) -> int:
        """Successful loads, restarts included."""
        return self._loads

    @property
    def last_error(self) -> str | None:
        """What went wrong last (a crash or a failed load), kept after recovery."""
        return self._last_error

    def __repr__(self) -> str:
        return f"<Supervisor {self.name} {self._phase} pid={self.pid} restarts={self._restarts}>"

    # -- notifications --------------------------------------------------------------------------

    def _event(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _notify(self, event: str | None = None) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        if event is not None and self._on_change is not None:
            try:
                self._on_change(self, event)
            except Exception:  # noqa: BLE001 - a broken observer must not kill the supervisor
                _log.exception("on_change callback of %s failed", self.name)

    def _condition(self, type_: str, status: Literal["True", "False", "Unknown"], reason: str, message: str) -> None:
        old = self._conditions[type_]
        when = old.last_transition_time if old.status == status else _now()
        self._conditions[type_] = Condition(
            type=type_, status=status, reason=reason, message=message, last_transition_time=when
        )

    # -- control --------------------------------------------------------------------------------

    def start(self, *, reset: bool = False) -> None:
        """Ask for the model to be loaded (and kept loaded). Returns at once.

        A Failed model stays Failed unless ``reset`` is true, which also
        forgets the restart history of the current window.
        """
        if self._closed:
            raise ShuttingDownError(f"the supervisor of model {self.name!r} is closed")
        if reset and self._phase is Phase.FAILED:
            self._restart_times.clear()
            self._phase = Phase.PENDING
            self._condition("Failed", "False", "Reset", "reset by an explicit load")
            self._notify("loading")
        self._want = True
        self._notify()

    async def stop(self) -> None:
        """Unload: stop the child (SIGTERM → grace → SIGKILL) and go back to Pending.

        Also clears Failed. Shielded from cancellation: when it returns the
        child is gone. Idempotent. While the child stops the phase is already
        Pending, with the ``Ready`` condition's reason ``Unloading``.
        """
        with anyio.CancelScope(shield=True):
            self._want = False
            self._stopping += 1
            try:
                await self._stop()
            finally:
                self._stopping -= 1

    async def _stop(self) -> None:
        was = self._phase
        if was is Phase.FAILED:
            self._restart_times.clear()
        if was is not Phase.PENDING or self._model is not None:
            # Not Serving any more from this moment: nothing new may be sent to the child.
            self._phase = Phase.PENDING
            self._load_backoff = False
            self._condition("Ready", "False", "Unloading", "unloading")
            self._notify()
        scope = self._cycle_scope
        if scope is not None:
            scope.cancel()
            while self._cycle_scope is scope:
                await self._event().wait()
        await self._close_model()
        if was is not Phase.PENDING or self._phase is not Phase.PENDING:
            self._phase = Phase.PENDING
            self._condition("Loaded", "False", "Unloaded", "unloaded")
            self._condition("Ready", "False", "Unloaded", "unloaded")
            self._condition("Failed", "False", "Unloaded", "unloaded")
            self._notify("stopped")
        self._notify()

    async def ready(self) -> E:
        """Wait until the model serves and return it.

        Raises :class:`ModelUnavailableError` when the model is Failed, when a
        load attempt made while waiting failed, or at once while it backs off
        after a failed load (the supervisor keeps retrying in the background),
        and when it is stopped or not started; :class:`ShuttingDownError` once
        the supervisor is closed. During the backoff after a *crash* it waits
        for the restart.
        """
        failures = self._load_failures
        while True:
            changed = self._event()
            if self._closed:
                raise ShuttingDownError(f"model {self.name!r} is shutting down")
            if self._phase is Phase.SERVING and self._model is not None:
                if self._model.returncode is None:
                    return self._model
                # Died, and the watcher has not run yet: wait for the restart.
            elif self._phase is Phase.FAILED:
                raise ModelUnavailableError(self._failed_message())
            if not self._want:
                raise _Unloaded(f"model {self.name!r} is not loaded")
            if self._load_failures > failures or self._load_backoff:
                retry = ""
                if self._retry_at is not None:
                    retry = f"; retrying in {max(0.0, self._retry_at - anyio.current_time()):.1f} s"
                raise ModelUnavailableError(f"model {self.name!r} could not be loaded: {self._last_error}{retry}")
            await changed.wait()

    def failure(self) -> ModelUnavailableError:
        """The error for a request to this model while it is Failed."""
        return ModelUnavailableError(self._failed_message())

    def _failed_message(self) -> str:
        if self.max_restarts == 0:
            return f"model {self.name!r} failed and is not restarted; last error: {self._last_error}"
        return (
            f"model {self.name!r} failed after more than {self.max_restarts} restarts within"
            f" {self.restart_window:g} s; last error: {self._last_error}"
        )

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Supervise until cancelled; on the way out the child is stopped (shielded).

        Run it in a task group; it idles while the model is not wanted.
        """
        if self._running:
            raise UsageError(f"the supervisor of model {self.name!r} is already running")
        self._running = True
        try:
            async with anyio.create_task_group() as self._retirements:
                while True:
                    while not self.active:
                        await self._event().wait()
                    with anyio.CancelScope() as scope:
                        self._cycle_scope = scope
                        try:
                            try:
                                await self._cycle()
                            finally:
                                with anyio.CancelScope(shield=True):
                                    await self._close_model()
                        except Exception as exc:  # noqa: BLE001 - a bug must not take the owner's task group down
                            _log.exception("model %s: unexpected error in its supervisor", self.name)
                            self._phase = Phase.LOADING
                            await self._after_failure("crashed", f"supervisor error: {_describe(exc)}")
                    self._cycle_scope = None
                    self._retry_at = None
                    self._notify()
        finally:
            self._cycle_scope = None
            self._running = False
            self._closed = True
            with anyio.CancelScope(shield=True):
                await self._close_model()
            self._notify()

    async def _close_model(self) -> None:
        model, self._model = self._model, None
        if model is not None:
            await model.close()

    async def _cycle(self) -> None:
        """One life of the child: load it, serve until it dies, then back off (or fail)."""
        self._phase = Phase.LOADING
        self._condition("Ready", "False", "Loading", f"loading {self.config.path}")
        self._notify("loading")
        try:
            model = await self._load()
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:  # noqa: BLE001 - StartupError, ModelFileError, BinaryNotFoundError, OSError, ...
            self._load_failures += 1
            message = _describe(exc)
            _log.warning("model %s: load failed: %s", self.name, message)
            self._condition("Loaded", "False", "LoadFailed", message)
            self._condition("Ready", "False", "LoadFailed", message)
            self._load_backoff = True
            try:
                await self._after_failure("load_failed", message)
            finally:
                self._load_backoff = False
            return
        self._model = model
        self._loads += 1
        self._phase = Phase.SERVING
        self._condition("Loaded", "True", "Started", f"llama-server pid {model.pid} at {model.base_url}")
        self._condition("Ready", "True", "Serving", f"serving at {model.base_url}")
        if self._conditions["Crashed"].status == "True":
            self._condition("Crashed", "False", "Recovered", f"serving again; last crash: {self._last_error}")
        _log.info("model %s: serving, pid %d at %s", self.name, model.pid, model.base_url)
        self._notify("serving")
        reason, message = await self._watch(model)
        _log.warning("model %s: %s", self.name, message)
        self._model = None
        self._phase = Phase.LOADING
        self._condition("Loaded", "False", reason, message)
        self._condition("Ready", "False", reason, message)
        self._condition("Crashed", "True", reason, message)
        self._notify("crashed")
        self._retirements.start_soon(self._retire, model)
        await self._after_failure(None, message)

    async def _retire(self, model: E) -> None:
        """Close a crashed model a little later.

        Its child is already dead; closing its client at once would make the
        requests still reading from it fail with ClosedError instead of the
        ServerCrashedError that explains what happened.
        """
        try:
            await anyio.sleep(_RETIRE_DELAY)
        finally:
            with anyio.CancelScope(shield=True):
                await model.close()

    async def _load(self) -> E:
        cfg = self.config
        # The stop grace goes to the loader only when the config sets one: a loader of another kind
        # of endpoint need not know it.
        extra: dict[str, Any] = {} if cfg.restart_grace_period is None else {"grace": cfg.restart_grace_period}
        model: E = await self._loader(
            cfg.path,
            binary=cfg.binary,
            parallel=cfg.parallel,
            ctx_size=cfg.ctx_size,
            gpu_layers=cfg.gpu_layers,
            threads=cfg.threads,
            embeddings=cfg.embeddings,
            args=cfg.args,
            env=dict(cfg.env),
            **extra,
        )
        return model

    async def _after_failure(self, event: str | None, message: str) -> None:
        """Record a crash or failed load; then either mark Failed or sleep the backoff and return."""
        self._last_error = message
        now = anyio.current_time()
        while self._restart_times and now - self._restart_times[0] > self.restart_window:
            self._restart_times.popleft()
        recent = len(self._restart_times)
        if recent >= self.max_restarts:
            self._phase = Phase.FAILED
            self._retry_at = None
            failed = self._failed_message()
            self._condition("Ready", "False", "Failed", failed)
            self._condition("Failed", "True", "TooManyRestarts", failed)
            _log.error("%s", failed)
            self._notify(event)
            self._notify("failed")
            return
        delay = backoff_delay(self.restart_backoff, self.restart_backoff_max, recent)
        self._restart_times.append(now)
        self._restarts += 1
        self._retry_at = now + delay
        self._condition("Ready", "False", "BackOff", f"restarting in {delay:g} s after: {message}")
        self._notify(event)
        self._notify("restarting")
        await anyio.sleep(delay)
        self._retry_at = None

    # -- watching -------------------------------------------------------------------------------

    async def _watch(self, model: E) -> tuple[str, str]:
        """Return ``(reason, message)`` once the endpoint has died or stopped answering its health probe."""
        outcome: list[tuple[str, str]] = []
        async with anyio.create_task_group() as tg:

            async def exited() -> None:
                await model.wait()
                outcome.append(("Crashed", model.describe_exit()))
                tg.cancel_scope.cancel()

            async def unresponsive() -> None:
                message = await self._probe_until_dead(model)
                if model.returncode is None:
                    model.kill(message)
                outcome.append(("Unresponsive", message))
                tg.cancel_scope.cancel()

            tg.start_soon(exited)
            if self.health_interval is not None:
                tg.start_soon(unresponsive)
        return outcome[0]

    async def _probe_until_dead(self, model: E) -> str:
        interval = self.health_interval
        assert interval is not None
        failures = 0
        last = ""
        while True:
            await anyio.sleep(interval)
            try:
                with anyio.fail_after(self.health_timeout):
                    health = await model.health()
                ok = health.status == "ok"
                last = f"status {health.status!r}"
            except TimeoutError:
                ok, last = False, f"no answer within {self.health_timeout:g} s"
            except LlamaprocError as exc:
                ok, last = False, str(exc).split("\n", 1)[0]
            failures = 0 if ok else failures + 1
            if failures >= self.health_failures:
                return f"pid {model.pid} failed {failures} health checks in a row ({last})"

    # -- standalone use ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Run the supervisor in a task group of its own and start loading."""
        if self._task_group is not None:
            raise UsageError("the supervisor is already entered")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._task_group = tg
        tg.start_soon(self.run)
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        tg, self._task_group = self._task_group, None
        assert tg is not None
        await self.stop()
        tg.cancel_scope.cancel()
        return await tg.__aexit__(exc_type, exc, tb)


# --- helpers ------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """One readable line for a load error (the first line of its message, without output dumps)."""
    text = str(exc).split("\n--- llama-server output ---", 1)[0].strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def backoff_delay(restart_backoff: float, restart_backoff_max: float, recent_restarts: int) -> float:
    """The wait before a restart when ``recent_restarts`` restarts already happened in the window."""
    return min(restart_backoff * math.pow(2.0, recent_restarts), restart_backoff_max)
