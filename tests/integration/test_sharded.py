"""A model split over real rpc workers: parity with one process, failover that loses no token, bad input.

Every test runs real ``ggml-rpc-server`` workers and a real llama-server
coordinator on the CPU, with a tiny generated model of 8 layers. The
reference for every comparison is the same greedy request on one process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import psutil
import pytest
from netns import Host, require_netns

import llamaproc
from llamaproc.testing import write_tiny_model

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PROMPT = "Once upon a time"
N_LAYER = 8

Workers = Callable[[int], Awaitable[list[llamaproc.RpcWorker]]]


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("sharded") / "tiny8.gguf", n_layers=N_LAYER, seed=3)


@pytest.fixture
async def workers() -> AsyncIterator[Workers]:
    """Start n local rpc workers (closed at the end of the test)."""
    started: list[llamaproc.RpcWorker] = []

    async def start(n: int) -> list[llamaproc.RpcWorker]:
        new = [await llamaproc.start_worker() for _ in range(n)]
        started.extend(new)
        return new

    try:
        yield start
    finally:
        with anyio.CancelScope(shield=True):
            for w in started:
                if w.returncode is None:
                    try:
                        os.kill(w.pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                await w.close()


async def reference(path: Path, n: int, **params: object) -> list[int]:
    async with await llamaproc.load_model(path) as model:
        result = await model.complete(PROMPT, max_tokens=n, **params)  # type: ignore[arg-type]
        assert result.token_ids is not None and len(result.token_ids) == n
        return result.token_ids


async def collect(stream: llamaproc.TokenStream, *, at: int | None = None,
                  then: Callable[[], None] | None = None) -> list[int]:
    ids: list[int] = []
    async with stream:
        async for tok in stream:
            assert tok.id is not None
            ids.append(tok.id)
            if at is not None and len(ids) == at and then is not None:
                then()
    return ids


def whole(layout: list[llamaproc.Shard]) -> None:
    """The shards are contiguous, in order, and hold every layer (the output layer is N_LAYER)."""
    start = 0
    for shard in layout:
        assert shard.layers.start == start
        start = shard.layers.stop
    assert start == N_LAYER + 1


@pytest.mark.parametrize(
    ("n", "split", "expected"),
    [
        (1, "uniform", [range(0, 9)]),
        (2, "uniform", [range(0, 5), range(5, 9)]),
        (2, [3, 1], [range(0, 7), range(7, 9)]),
        (3, "uniform", [range(0, 3), range(3, 6), range(6, 9)]),
        (3, [1, 2, 1], [range(0, 3), range(3, 7), range(7, 9)]),
    ],
)
async def test_parity_with_one_process(
    sharded_model: Path, workers: Workers, n: int, split: object, expected: list[range]
) -> None:
    ref = await reference(sharded_model, 96)
    ws = await workers(n)
    async with await llamaproc.load_model(sharded_model, workers=ws, split=split) as model:  # type: ignore[arg-type]
        assert isinstance(model, llamaproc.ShardedModel)
        assert [s.address for s in model.layout] == [w.address for w in ws]
        assert [s.layers for s in model.layout] == expected
        whole(model.layout)
        stream = model.generate(PROMPT, max_tokens=96)
        assert await collect(stream) == ref
        assert stream.reshards == []
        done = await model.complete(PROMPT, max_tokens=96)
        assert done.token_ids == ref


async def test_capacity_split_uses_the_reported_memory(sharded_model: Path, workers: Workers) -> None:
    ws = await workers(2)
    assert all(d.free > 0 and d.total >= d.free for w in ws for d in w.devices)
    async with await llamaproc.load_model(sharded_model, workers=[w.address for w in ws]) as model:
        whole(model.layout)  # equal free memory on one machine: an even split
        assert [len(s.layers) for s in model.layout] == [5, 4]


async def test_one_process_has_an_empty_layout(sharded_model: Path) -> None:
    async with await llamaproc.load_model(sharded_model) as model:
        assert model.layout == []
        async with model.generate(PROMPT, max_tokens=4) as stream:
            async for _ in stream:
                pass
        assert stream.reshards == []


def leftover(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


async def test_killed_worker_mid_stream_loses_no_token(sharded_model: Path, workers: Workers) -> None:
    ref = await reference(sharded_model, 300)
    ws = await workers(3)
    victim = ws[1]
    async with await llamaproc.load_model(sharded_model, workers=ws) as model:
        first = model.pid
        stream = model.generate(PROMPT, max_tokens=300)
        ids = await collect(stream, at=60, then=lambda: os.kill(victim.pid, signal.SIGKILL))
        assert ids == ref
        assert len(stream.reshards) == 1
        reshard = stream.reshards[0]
        assert reshard.lost == [victim.address]
        assert 60 <= reshard.after_tokens < 300
        assert [s.address for s in reshard.layout] == [ws[0].address, ws[2].address]
        whole(reshard.layout)
        assert model.layout == reshard.layout
        assert model.lost_workers == [victim.address] and model.degraded
        assert model.pid != first
        assert stream.result is not None and stream.result.token_ids == ref
        # The model keeps serving on the survivors.
        assert (await model.complete(PROMPT, max_tokens=32)).token_ids == ref[:32]
        coordinators = [first, model.pid]
    assert leftover(coordinators) == []


async def test_hung_worker_is_evicted_after_the_stall_timeout(sharded_model: Path, workers: Workers) -> None:
    ref = await reference(sharded_model, 200)
    ws = await workers(2)
    victim = ws[0]
    async with await llamaproc.load_model(sharded_model, workers=ws, stall_timeout=1.0) as model:
        stream = model.generate(PROMPT, max_tokens=200)
        ids = await collect(stream, at=50, then=lambda: os.kill(victim.pid, signal.SIGSTOP))
        assert ids == ref
        assert [r.lost for r in stream.reshards] == [[victim.address]]
        assert "no token" in stream.reshards[0].reason
        assert [s.address for s in model.layout] == [ws[1].address]


async def test_chat_stream_resumes_exactly(sharded_model: Path, workers: Workers) -> None:
    messages = [{"role": "user", "content": "tell me a story"}]
    async with await llamaproc.load_model(sharded_model) as single:
        async with single.chat(messages, max_tokens=200) as stream:
            reference_text = "".join([tok.text async for tok in stream])
    ws = await workers(2)
    async with await llamaproc.load_model(sharded_model, workers=ws) as model:
        texts: list[str] = []
        async with model.chat(messages, max_tokens=200) as stream:
            async for tok in stream:
                texts.append(tok.text)
                if len(texts) == 40:
                    os.kill(ws[1].pid, signal.SIGKILL)
        assert "".join(texts) == reference_text
        assert len(stream.reshards) == 1


async def test_every_worker_lost_raises_the_typed_error(sharded_model: Path, workers: Workers) -> None:
    ws = await workers(2)
    async with await llamaproc.load_model(sharded_model, workers=ws) as model:

        def kill_all() -> None:
            for w in ws:
                os.kill(w.pid, signal.SIGKILL)

        with pytest.raises(llamaproc.WorkersLostError) as info:
            await collect(model.generate(PROMPT, max_tokens=300), at=20, then=kill_all)
        assert sorted(info.value.lost) == sorted(w.address for w in ws)
        with pytest.raises(llamaproc.WorkersLostError):
            await model.complete(PROMPT, max_tokens=4)


async def test_min_workers_zero_finishes_on_the_coordinator(sharded_model: Path, workers: Workers) -> None:
    ref = await reference(sharded_model, 200)
    ws = await workers(1)
    async with await llamaproc.load_model(sharded_model, workers=ws, min_workers=0) as model:
        stream = model.generate(PROMPT, max_tokens=200)
        ids = await collect(stream, at=30, then=lambda: os.kill(ws[0].pid, signal.SIGKILL))
        assert ids == ref
        assert stream.reshards[0].layout == [] and model.layout == []


# --- bad input ----------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_worker_is_named(sharded_model: Path) -> None:
    address = f"127.0.0.1:{closed_port()}"
    with pytest.raises(llamaproc.WorkerUnreachableError) as info:
        await llamaproc.load_model(sharded_model, workers=[address])
    assert address in str(info.value)


async def test_a_server_that_is_not_a_worker_is_refused(sharded_model: Path) -> None:
    async with await llamaproc.load_model(sharded_model) as other:
        address = other.base_url.removeprefix("http://")
        with pytest.raises(llamaproc.WorkerUnreachableError) as info:
            await llamaproc.load_model(sharded_model, workers=[address])
        assert address in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"workers": ["127.0.0.1:5000", "127.0.0.1:5000"]}, "workers"),
        ({"workers": "127.0.0.1:5000"}, "workers"),
        ({"workers": []}, "workers"),
        ({"workers": ["nonsense"]}, None),
        ({"workers": ["127.0.0.1:5000"], "split": [1, 2]}, "split"),
        ({"workers": ["127.0.0.1:5000", "127.0.0.1:5001"], "split": [1, -2]}, "split"),
        ({"workers": ["127.0.0.1:5000"], "split": "fast"}, "split"),
        ({"workers": ["127.0.0.1:5000"], "min_workers": 2}, "min_workers"),
        ({"workers": ["127.0.0.1:5000"], "max_reshards": -1}, "max_reshards"),
        ({"workers": ["127.0.0.1:5000"], "stall_timeout": 0}, "stall_timeout"),
        ({"workers": ["127.0.0.1:5000"], "gpu_layers": 4}, "workers"),
    ],
)
async def test_bad_arguments_raise_before_anything_starts(
    sharded_model: Path, kwargs: dict[str, object], param: str | None
) -> None:
    with pytest.raises(llamaproc.InvalidArgumentError) as info:
        await llamaproc.load_model(sharded_model, **kwargs)  # type: ignore[arg-type]
    if param is not None:
        assert info.value.param == param


async def test_a_worker_serves_one_model(sharded_model: Path, workers: Workers) -> None:
    ws = await workers(1)
    async with await llamaproc.load_model(sharded_model, workers=ws):
        with pytest.raises(llamaproc.WorkerBusyError) as info:
            await llamaproc.load_model(sharded_model, workers=[ws[0].address])
        assert info.value.address == ws[0].address
    # Free again once that model is closed.
    async with await llamaproc.load_model(sharded_model, workers=ws) as model:
        assert model.workers == [ws[0].address]


# --- workers on other hosts ---------------------------------------------------------------------------


async def test_a_cut_link_mid_stream_reshards_onto_the_survivors(
    sharded_model: Path, workers: Workers, backend: llamaproc.Backend, tmp_path: Path
) -> None:
    """A worker in another network namespace whose link goes silent: the coordinator does not hang."""
    require_netns()
    ref = await reference(sharded_model, 200)
    binary = backend.rpc_server
    assert binary is not None
    local = await workers(1)
    with Host() as remote, (tmp_path / "rpc.log").open("wb") as log:
        remote.popen([binary, "-H", remote.address, "-p", "50052"], env={**os.environ, **backend.env},
                     stdout=log, stderr=subprocess.STDOUT)
        address = f"{remote.address}:50052"
        with anyio.fail_after(30):
            while True:  # until it listens
                try:
                    await llamaproc.probe_worker(address)
                    break
                except llamaproc.WorkerUnreachableError:
                    await anyio.sleep(0.05)
        async with await llamaproc.load_model(
            sharded_model, workers=[address, local[0]], split="uniform", stall_timeout=1.0
        ) as model:
            assert [s.address for s in model.layout] == [address, local[0].address]
            stream = model.generate(PROMPT, max_tokens=200)
            ids = await collect(stream, at=50, then=remote.cut)
            assert ids == ref
            assert [r.lost for r in stream.reshards] == [[address]]
            assert [s.address for s in model.layout] == [local[0].address]


async def test_workers_it_starts_itself_are_stopped_with_it(sharded_model: Path) -> None:
    ref = await reference(sharded_model, 48)
    async with await llamaproc.load_model(sharded_model, workers=2) as model:
        assert len(model.layout) == 2
        pids = [p.pid for p in psutil.Process().children() if "rpc-server" in " ".join(p.cmdline())]
        assert len(pids) == 2
        assert (await model.complete(PROMPT, max_tokens=48)).token_ids == ref
    assert leftover(pids) == []


def test_the_blocking_api_loads_a_sharded_model(sharded_model: Path) -> None:
    from llamaproc import sync

    with sync.load_model(sharded_model, workers=2) as model:
        assert [len(s.layers) for s in model.layout] == [5, 4]
        assert [t.text for t in model.generate(PROMPT, max_tokens=8)]


async def test_concurrent_streams_all_resume_exactly(sharded_model: Path, workers: Workers) -> None:
    """Two streams generating at once on two slots: both are cut, both resume on their own slot."""
    prompts = [PROMPT, "The sun and the moon"]
    async with await llamaproc.load_model(sharded_model) as single:
        refs = [(await single.complete(p, max_tokens=200)).token_ids for p in prompts]
    ws = await workers(2)
    async with await llamaproc.load_model(sharded_model, workers=ws, parallel=2) as model:
        results: dict[int, list[int]] = {}
        streams: dict[int, llamaproc.TokenStream] = {}
        both = anyio.Event()
        counts = [0, 0]

        async def run(i: int) -> None:
            stream = streams[i] = model.generate(prompts[i], max_tokens=200)
            ids: list[int] = []
            async with stream:
                async for tok in stream:
                    assert tok.id is not None
                    ids.append(tok.id)
                    counts[i] = len(ids)
                    if i == 0 and len(ids) == 30:
                        with anyio.fail_after(60):
                            while counts[1] < 10:  # the other one is generating too
                                await anyio.sleep(0.001)
                        os.kill(ws[0].pid, signal.SIGKILL)
                        both.set()
            results[i] = ids

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, 0)
            tg.start_soon(run, 1)
        assert both.is_set()
        assert results[0] == refs[0]
        assert results[1] == refs[1]
        assert len(streams[0].reshards) == 1 and len(streams[1].reshards) == 1


async def test_a_constrained_stream_is_not_resumed(sharded_model: Path, workers: Workers) -> None:
    ws = await workers(2)
    async with await llamaproc.load_model(sharded_model, workers=ws) as model:
        stream = model.generate(PROMPT, max_tokens=300, grammar='root ::= [a-z ]+')
        with pytest.raises(llamaproc.IncompleteStreamError, match="not resumed"):
            await collect(stream, at=20, then=lambda: os.kill(ws[0].pid, signal.SIGKILL))
        # The model itself recovered: the next request is served by the survivor.
        assert (await model.complete(PROMPT, max_tokens=8)).token_ids
        assert model.lost_workers == [ws[0].address]
