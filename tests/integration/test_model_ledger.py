"""load_model through a ledger, with the real llama-server and the tiny model.

Every case runs on a SQLite file; the ones that take the ``ledger_url``
fixture run on a real ``redis-server`` too (tests/ledger_stores.py).
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import llamaproc
from llamaproc.backend import estimate_memory
from llamaproc.testing import write_tiny_model

pytestmark = pytest.mark.anyio

CTX = 2048


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "second.gguf", seed=2)


def one_model(path: Path, ctx: int = CTX) -> int:
    return estimate_memory(path, ctx_size=ctx).total


async def wait_until(condition: object, what: str) -> None:
    with anyio.fail_after(30):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.02)


async def test_close_releases_the_lease_and_placement_says_what_was_loaded(tiny_model: Path, ledger_url: str) -> None:
    async with await llamaproc.open_ledger(ledger_url, capacity={"cpu": "1GiB"}, ttl=3) as ledger:
        model = await llamaproc.load_model(tiny_model, ctx_size=CTX, ledger=ledger)
        async with model:
            placement = model.placement
            assert placement is not None
            assert (placement.device, placement.ctx_size, placement.reason) == ("cpu", CTX, None)
            (held,) = await ledger.leases()
            assert held.holder == tiny_model.name
            # Corrected from the buffers llama-server logged: far below the estimate's compute margin.
            assert held.memory == placement.memory < one_model(tiny_model)
            assert (await model.complete("hello", max_tokens=4)).text
        assert await ledger.leases() == []


async def test_the_second_model_waits_and_times_out(tiny_model: Path, second_model: Path, tmp_path: Path) -> None:
    capacity = one_model(tiny_model) + one_model(second_model) - 1
    async with await llamaproc.open_ledger(f"sqlite://{tmp_path}/l.db", capacity={"cpu": capacity}, ttl=3) as ledger:
        # Without the correction both would fit; a placeholder lease keeps the first's estimate held.
        async with await llamaproc.load_model(tiny_model, ctx_size=CTX, ledger=ledger) as first:
            filler = await ledger.lease(capacity - first.placement.memory - one_model(second_model) + 1)  # type: ignore[union-attr]
            with pytest.raises(llamaproc.LeaseTimeoutError) as caught:
                await llamaproc.load_model(second_model, ctx_size=CTX, ledger=ledger, lease_timeout=0.3)
            assert caught.value.memory == one_model(second_model)
            await filler.release()
            assert (await first.complete("hello", max_tokens=4)).text


async def test_an_urgent_model_preempts_an_idle_one_which_reloads_on_its_next_call(
    tiny_model: Path, second_model: Path, ledger_url: str
) -> None:
    capacity = one_model(tiny_model) + 1
    async with await llamaproc.open_ledger(ledger_url, capacity={"cpu": capacity}, ttl=3) as ledger:
        async with await llamaproc.load_model(tiny_model, ctx_size=CTX, ledger=ledger, priority="batch") as first:
            expected = (await first.complete("the cat", max_tokens=8)).text
            # The rest of the device is less than the second model's estimate: it must ask the first to yield.
            async with await llamaproc.load_model(
                second_model, ctx_size=CTX, ledger=ledger, priority="urgent", lease_timeout=30
            ) as second:
                assert not first.loaded
                assert (await second.complete("hi", max_tokens=4)).text
                holders = {lease.holder for lease in await ledger.leases()}
                assert tiny_model.name not in holders
                # The next call waits for the memory the urgent model gives back on close.
                async with anyio.create_task_group() as tg:
                    tg.start_soon(second.close)
                    again = await first.complete("the cat", max_tokens=8)
            assert again.text == expected
            assert first.loaded
            assert tiny_model.name in {lease.holder for lease in await ledger.leases()}


async def test_fit_loads_a_smaller_context_and_says_so(tiny_model: Path, tmp_path: Path) -> None:
    big = CTX  # the tiny model's trained context: llama-server caps the context there
    capacity = one_model(tiny_model, big) - 1
    async with await llamaproc.open_ledger(f"sqlite://{tmp_path}/l.db", capacity={"cpu": capacity}, ttl=3) as ledger:
        async with await llamaproc.load_model(tiny_model, ctx_size=big, ledger=ledger, fit=True, min_ctx_size=256) as model:
            placement = model.placement
            assert placement is not None
            assert placement.ctx_size == big // 2
            assert placement.reason is not None and f"context {big} -> {big // 2}" in placement.reason
            props = (await model.info()).props
            assert props["default_generation_settings"]["n_ctx"] == big // 2
        with pytest.raises(llamaproc.InsufficientMemoryError) as caught:
            await llamaproc.load_model(tiny_model, ctx_size=big, ledger=ledger, fit=True, min_ctx_size=big)
        assert caught.value.memory > caught.value.free == capacity


async def test_idle_unload_unloads_and_the_next_call_reloads(tiny_model: Path, tmp_path: Path) -> None:
    async with await llamaproc.open_ledger(f"sqlite://{tmp_path}/l.db", capacity={"cpu": "1GiB"}, ttl=3) as ledger:
        async with await llamaproc.load_model(tiny_model, ctx_size=CTX, ledger=ledger, idle_unload=0.2) as model:
            first_pid = model.pid
            expected = (await model.complete("the cat", max_tokens=8)).text
            await wait_until(lambda: not model.loaded, "idle unload")

            async def no_leases() -> bool:
                return await ledger.leases() == []

            with anyio.fail_after(30):
                while not await no_leases():
                    await anyio.sleep(0.02)
            assert (await model.complete("the cat", max_tokens=8)).text == expected
            assert model.pid != first_pid
        assert await ledger.leases() == []


async def test_a_stream_reloads_an_unloaded_model_and_holds_off_its_preemption(
    tiny_model: Path, second_model: Path, tmp_path: Path
) -> None:
    capacity = one_model(tiny_model) + 1
    async with await llamaproc.open_ledger(f"sqlite://{tmp_path}/l.db", capacity={"cpu": capacity}, ttl=3) as ledger:
        async with await llamaproc.load_model(
            tiny_model, ctx_size=CTX, ledger=ledger, priority="batch", idle_unload=3600
        ) as first:
            expected = (await first.complete("the cat", max_tokens=24)).token_ids
            async with await llamaproc.load_model(
                second_model, ctx_size=CTX, ledger=ledger, priority="urgent", lease_timeout=30
            ) as second:
                assert not first.loaded
                assert (await second.complete("hi", max_tokens=4)).text
            # A stream on the unloaded model reloads it when it starts.
            async with first.generate("the cat", max_tokens=24) as stream:
                ids = [tok.id async for tok in stream]
            assert ids == expected and first.loaded
            # While a stream runs, an urgent waiter's request waits for it to end.
            async with first.generate("the cat", max_tokens=24) as stream:
                it = stream.__aiter__()
                ids = [(await it.__anext__()).id]
                granted = anyio.Event()

                async def urgent() -> None:
                    async with await llamaproc.load_model(
                        second_model, ctx_size=CTX, ledger=ledger, priority="urgent", lease_timeout=30
                    ):
                        granted.set()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(urgent)
                    with anyio.fail_after(30):
                        while not any(w for w in await ledger.leases() if w.preempt_requested):
                            await anyio.sleep(0.01)
                    assert first.loaded and not granted.is_set()  # asked, but the stream still runs
                    ids += [tok.id async for tok in it]
                    assert ids == expected
                    await stream.aclose()  # the stream ends: the model gives its memory to the waiter
                    with anyio.fail_after(30):
                        await granted.wait()
                assert not first.loaded
