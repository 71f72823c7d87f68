"""A busy model loaded through a ledger, preempted or losing its lease, with the real llama-server.

The model is the tiny generated one, loaded at priority ``batch`` on a device
it shares with an ``urgent`` waiter that needs the whole device. A stream in
flight holds the unload off until it ends (or until ``preempt_grace``); a
lease removed from the ledger behind the model's back stops its server at
once. Each time the model's next call reloads it. The cases that take the
``ledger_url`` fixture run on a SQLite file and on a real ``redis-server``.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

import llamaproc
from llamaproc import Lease, Ledger, TextModel

pytestmark = pytest.mark.anyio

CTX = 2048
CAPACITY = 2**30  # the model's lease is far less; the urgent waiter asks for all of it
PROMPT = "the cat"
TTL = 3.0  # renewal (and so news of a preemption or a loss) every second
SAFETY = 60.0  # a safety net for things that take a few renewals, never a measure of speed
# Keeps a stream going for as long as a test needs: without --context-shift the generation would end
# when the context is full.
ENDLESS = ["--context-shift"]
LONG = 100_000
WORKER = Path(__file__).with_name("ledger_worker.py")
# Under trio, a stream cut before its end makes trio warn about httpx's inner async generators,
# which only the outermost one can be closed through (encode/httpx#3686); trio still closes them.
TRIO_ASYNCGEN_WARNING = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` is true (a safety net, never a timing assertion)."""
    with anyio.fail_after(SAFETY):
        while not condition():
            await anyio.sleep(0.02)


def model_lease(model: TextModel) -> Lease:
    """The lease the model holds now (no public handle: the model hides its lease behind load and unload)."""
    managed = model._managed
    assert managed is not None and managed.lease is not None
    return managed.lease


async def reloads_and_answers(model: TextModel, ledger: Ledger, expected: list[int] | None, old_pid: int) -> None:
    """The model's next call reloads it (a new server under a new lease) and answers as before."""
    assert expected
    again = await model.complete(PROMPT, max_tokens=len(expected))
    assert again.token_ids == expected
    assert model.loaded and model.pid != old_pid
    assert [info.holder for info in await ledger.leases()] == [model.path.name]


@pytest.mark.usefixtures("anyio_backend")
async def test_a_preempted_stream_runs_to_its_end_then_the_model_yields(tiny_model: Path, ledger_url: str) -> None:
    async with await llamaproc.open_ledger(ledger_url, capacity={"cpu": CAPACITY}, ttl=TTL) as ledger:
        async with await llamaproc.load_model(tiny_model, ctx_size=CTX, ledger=ledger, priority="batch") as model:
            expected = (await model.complete(PROMPT, max_tokens=24)).token_ids
            pid = model.pid
            granted: list[Lease] = []

            async def urgent() -> None:
                granted.append(await ledger.lease(CAPACITY, priority="urgent", holder="urgent", timeout=SAFETY))

            async with model.generate(PROMPT, max_tokens=24) as stream:
                tokens = stream.__aiter__()
                ids = [(await tokens.__anext__()).id]
                async with anyio.create_task_group() as tg:
                    tg.start_soon(urgent)
                    # The model hears the request (with its ledger's next renewal) while its stream is in flight.
                    await until(lambda: model_lease(model).preempt_requested)
                    assert model.loaded and model.returncode is None and not granted
                    ids += [token.id async for token in tokens]
                    # Every token, and a normal end: the stream was never cut.
                    assert ids == expected
                    assert stream.error is None and stream.result is not None
                # The stream's end unloaded the model and gave its memory to the waiter.
            assert not model.loaded
            with anyio.fail_after(SAFETY):
                await model.wait()  # the old server exits
            [lease] = granted
            assert [info.holder for info in await ledger.leases()] == ["urgent"]
            await lease.release()
            await reloads_and_answers(model, ledger, expected, pid)


async def test_a_waiter_in_another_process_is_granted_when_the_stream_ends(
    tiny_model: Path, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    url = f"sqlite://{tmp_path}/l.db"
    async with await llamaproc.open_ledger(url, capacity={"cpu": CAPACITY}, ttl=TTL) as ledger:
        async with await llamaproc.load_model(tiny_model, ctx_size=CTX, ledger=ledger, priority="batch") as model:
            expected = (await model.complete(PROMPT, max_tokens=24)).token_ids
            pid = model.pid
            async with model.generate(PROMPT, max_tokens=24) as stream:
                tokens = stream.__aiter__()
                ids = [(await tokens.__anext__()).id]
                # Waits for the whole device (up to 60 s), says "granted TOKEN", releases and says "released".
                worker = subprocess.Popen(
                    [sys.executable, str(WORKER), "wait", url, "trio", str(CAPACITY), "urgent", str(SAFETY)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                processes.append(worker)
                await until(lambda: model_lease(model).preempt_requested)
                assert model.loaded and worker.poll() is None
                assert [info.holder for info in await ledger.leases()] == [tiny_model.name]
                ids += [token.id async for token in tokens]
                assert ids == expected and stream.error is None
            assert worker.stdout is not None
            with anyio.fail_after(SAFETY):  # read to the end: the worker exits
                lines = await anyio.to_thread.run_sync(worker.stdout.read, abandon_on_cancel=True)
            assert [line.split()[0] for line in lines.splitlines()] == ["granted", "released"], lines
            assert not model.loaded
            with anyio.fail_after(SAFETY):
                await model.wait()
            await reloads_and_answers(model, ledger, expected, pid)
            assert await anyio.to_thread.run_sync(worker.wait, 10) == 0


@pytest.mark.usefixtures("anyio_backend")
@TRIO_ASYNCGEN_WARNING
async def test_a_stream_past_the_grace_is_cut_with_an_error_and_the_waiter_is_granted(
    tiny_model: Path, tmp_path: Path
) -> None:
    async with await llamaproc.open_ledger(f"sqlite://{tmp_path}/l.db", capacity={"cpu": CAPACITY}, ttl=TTL) as ledger:
        async with await llamaproc.load_model(
            tiny_model, ctx_size=CTX, ledger=ledger, priority="batch", preempt_grace=0.3, args=ENDLESS
        ) as model:
            expected = (await model.complete(PROMPT, max_tokens=8)).token_ids
            pid = model.pid
            reader = EndlessReader(model)  # only the grace timer can end it

            with anyio.fail_after(SAFETY):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(reader)
                    await reader.started.wait()
                    lease = await ledger.lease(CAPACITY, priority="urgent", holder="urgent")
            # The waiter was granted and the reader ended: with a typed error, not a hang or a normal end.
            [error] = reader.caught
            assert isinstance(error, llamaproc.ServerCrashedError), repr(error)
            # It says that the model was unloaded, and why, not that llama-server crashed.
            assert "the model was unloaded during the call (preempted; calls still running after the grace" in str(
                error
            )
            assert model.last_error is error
            assert not model.loaded
            with anyio.fail_after(SAFETY):
                await model.wait()
            assert [info.holder for info in await ledger.leases()] == ["urgent"]
            await lease.release()
            await reloads_and_answers(model, ledger, expected, pid)


class EndlessReader:
    """Reads a stream that never ends on its own, in a task.

    ``started`` is set at its first token; ``caught`` holds what ended it.
    """

    def __init__(self, model: llamaproc.TextModel) -> None:
        self.model = model
        self.started = anyio.Event()
        self.caught: list[BaseException] = []

    async def __call__(self) -> None:
        try:
            async with self.model.generate(PROMPT, max_tokens=LONG) as stream:
                async for _ in stream:
                    self.started.set()
        except BaseException as exc:  # noqa: BLE001 - what ends the stream is what the test checks
            self.caught.append(exc)


def remove_lease(ledger_url: str, lease_id: str) -> None:
    """Remove a lease from the store by hand, as an operator (or Redis's eviction) could, behind the holder's back."""
    if ledger_url.startswith("sqlite://"):
        db = sqlite3.connect(ledger_url[len("sqlite://") :], isolation_level=None)
        try:
            assert db.execute("DELETE FROM leases WHERE id = ?", (lease_id,)).rowcount == 1
        finally:
            db.close()
        return
    import redis

    client = redis.Redis.from_url(ledger_url)
    try:
        assert client.delete(f"llamaproc:ledger:l:{lease_id}") == 1  # the default key prefix
    finally:
        client.close()


@pytest.mark.usefixtures("anyio_backend")
@TRIO_ASYNCGEN_WARNING
async def test_a_lost_lease_stops_the_server_at_once_and_the_next_call_reloads(
    tiny_model: Path, ledger_url: str
) -> None:
    async with await llamaproc.open_ledger(ledger_url, capacity={"cpu": CAPACITY}, ttl=TTL) as ledger:
        # A grace far past the safety net: only the loss, not the grace timer, can stop the server in time.
        async with await llamaproc.load_model(
            tiny_model, ctx_size=CTX, ledger=ledger, args=ENDLESS, preempt_grace=10 * SAFETY
        ) as model:
            expected = (await model.complete(PROMPT, max_tokens=8)).token_ids
            pid = model.pid
            [info] = await ledger.leases()
            reader = EndlessReader(model)

            with anyio.fail_after(SAFETY):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(reader)
                    await reader.started.wait()  # a call in flight does not hold off the stop
                    await anyio.to_thread.run_sync(remove_lease, ledger_url, info.id)
                    # The model's next renewal finds the lease gone: its server is killed at once.
                    await model.wait()
            [error] = reader.caught
            assert isinstance(error, llamaproc.ServerCrashedError), repr(error)
            assert "the model was unloaded during the call (its lease was lost)" in str(error)
            assert not model.loaded
            assert model_lease(model).lost
            assert await ledger.leases() == []
            await reloads_and_answers(model, ledger, expected, pid)
            [again] = await ledger.leases()
            assert again.id != info.id and again.token > info.token
