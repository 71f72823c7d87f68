"""TextModel against a real llama-server on the CPU, with the tiny generated model."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import llamaproc
from llamaproc import LlamaClient, Token
from llamaproc.testing import write_tiny_model

pytestmark = pytest.mark.anyio

PROMPT = "hello world"
CHAT = [{"role": "user", "content": "say hi"}]
# Keeps a stream going as long as a test needs it: without --context-shift the
# generation would end when the 2048-token context is full (about 1-2 s).
LONG = 100_000
ENDLESS = ["--context-shift"]
# Under trio, a stream left before its end makes trio warn about httpx's (and httpx-sse's) inner
# async generators, which only the outermost one can be closed through (encode/httpx#3686).
# trio still closes them; the tests check what the user sees.
TRIO_ASYNCGEN_WARNING = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object:pytest.PytestUnraisableExceptionWarning"
)
BOTH_BACKENDS = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])


async def _collect(stream: llamaproc.TokenStream) -> list[Token]:
    async with stream:
        return [tok async for tok in stream]


def _text(tokens: list[Token]) -> str:
    return "".join(t.text for t in tokens)


def _cmdline(pid: int) -> list[str]:
    return [str(arg) for arg in psutil.Process(pid).cmdline()]


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _exited_on_sigterm(model: llamaproc.TextModel) -> bool:
    """The child went on close()'s SIGTERMs, not on the SIGKILL at the end of the grace.

    llama-server exits with 0 after the first SIGTERM once nothing is in flight, and with 1 at once on
    a second one; SIGKILL would make it -9.
    """
    return model.returncode in (0, 1)


def _without_waiting(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to its end in one step: what "at once, without touching the network" means.

    A coroutine that waits for anything (a connection, an answer) suspends instead; that fails here.
    Exceptions of ``coro`` propagate.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError(f"{coro!r} waited for something")


# -- generate / chat / embed -------------------------------------------------------------------


async def test_generate_yields_tokens_with_text_and_ids(tiny_model: Path) -> None:
    async with await llamaproc.load_model(tiny_model) as model:
        stream = model.generate(PROMPT, max_tokens=12)
        tokens = await _collect(stream)

        assert len(tokens) == 12
        assert all(isinstance(t.id, int) for t in tokens)
        assert all(t.text for t in tokens)
        assert stream.result is not None
        assert stream.result.text == _text(tokens)
        assert stream.result.token_ids == [t.id for t in tokens]
        assert stream.result.finish_reason == "limit"
        assert stream.result.usage.completion_tokens == 12
        # The ids are the model's: detokenizing them gives the streamed text back.
        assert await model.detokenize([t.id for t in tokens if t.id is not None]) == _text(tokens)


async def test_chat_yields_text(tiny_model: Path) -> None:
    async with await llamaproc.load_model(tiny_model) as model:
        stream = model.chat(CHAT, max_tokens=8)
        tokens = await _collect(stream)

        assert tokens and all(t.text for t in tokens)
        assert _text(tokens).strip()
        assert stream.result is not None
        assert stream.result.finish_reason == "length"
        assert stream.result.usage.completion_tokens == 8
        assert model.last_metrics is not None and model.last_metrics.generated_tokens == 8


async def test_embed_with_mean_pooling_chosen_for_a_file_that_names_none(tiny_embedding_model: Path) -> None:
    assert llamaproc.read_gguf_info(tiny_embedding_model).pooling_type is None
    async with await llamaproc.load_model(tiny_embedding_model, embeddings=True) as model:
        argv = _cmdline(model.pid)
        assert argv[argv.index("--pooling") + 1] == "mean"

        vectors = await model.embed(["hello world", "the blue sea"])

        assert len(vectors) == 2
        assert [len(v) for v in vectors] == [64, 64]
        assert all(math.isfinite(x) for v in vectors for x in v)
        assert vectors[0] != vectors[1]
        # A one-element list of a text gives the same vector as in a batch.
        assert (await model.embed(["the blue sea"]))[0] == pytest.approx(vectors[1], abs=1e-5)
        with pytest.raises(llamaproc.InvalidArgumentError):
            await model.embed("hello")


async def test_embed_with_pooling_named_by_the_file(tiny_embedding_model: Path, tmp_path: Path) -> None:
    # The same weights (seed 1) with llama.pooling_type = mean written into the file.
    path = write_tiny_model(tmp_path / "tiny-mean.gguf", seed=1, pooling="mean")
    assert llamaproc.read_gguf_info(path).pooling_type == "mean"
    texts = ["hello world", "the blue sea"]

    async with await llamaproc.load_model(path, embeddings=True) as model:
        assert "--pooling" not in _cmdline(model.pid)  # the file's own choice is used
        from_file = await model.embed(texts)
    async with await llamaproc.load_model(tiny_embedding_model, embeddings=True) as model:
        chosen = await model.embed(texts)

    assert [len(v) for v in from_file] == [64, 64]
    assert from_file[0] != from_file[1]
    for a, b in zip(from_file, chosen, strict=False):
        assert a == pytest.approx(b, abs=1e-5)


# -- greedy output across endpoints and callers ----------------------------------------------------


async def test_greedy_text_is_the_same_on_every_endpoint(tiny_model: Path) -> None:
    """generate() (streamed /completion), complete() (/completion) and /v1/completions agree.

    Both endpoints tokenize the prompt with the BOS token (the file asks for it),
    which the equal prompt token counts show.
    """
    async with await llamaproc.load_model(tiny_model) as model:
        stream = model.generate(PROMPT, max_tokens=16)
        streamed = _text(await _collect(stream))
        whole = await model.complete(PROMPT, max_tokens=16)
        async with LlamaClient(model.base_url, api_key=model.api_key) as client:
            openai = await client.text_completion(PROMPT, max_tokens=16, temperature=0)
        bos = await model.tokenize(PROMPT, add_special=True)

    assert streamed
    assert streamed == whole.text == openai.text
    assert stream.result is not None
    assert stream.result.usage.prompt_tokens == whole.usage.prompt_tokens == openai.usage.prompt_tokens == len(bos)
    assert bos[0] == 1  # <s>
    assert whole.usage.completion_tokens == openai.usage.completion_tokens == 16


async def test_the_child_answers_only_to_its_owner(tiny_model: Path) -> None:
    """A process that finds the child's port cannot go around its owner: it needs the key only the owner has."""
    async with await llamaproc.load_model(tiny_model) as model:
        assert model.api_key
        assert not any(model.api_key in arg for arg in _cmdline(model.pid))  # not visible in `ps`
        async with LlamaClient(model.base_url) as stranger:
            assert (await stranger.health()).status == "ok"  # /health stays public (probes)
            with pytest.raises(llamaproc.StatusError) as info:
                await stranger.tokenize("hi")
            assert info.value.status_code == 401
            with pytest.raises(llamaproc.StatusError):
                await _collect(stranger.stream_completion("hi", n_predict=2))
        async with LlamaClient(model.base_url, api_key="guess") as guesser:
            with pytest.raises(llamaproc.StatusError):
                await guesser.tokenize("hi")
        assert await model.tokenize("hi")  # the owner's calls carry the key


async def test_concurrent_callers_get_the_sequential_greedy_text(tiny_model: Path) -> None:
    prompts = ["hello world", "the cat and the dog", "hello world", "the cat and the dog"]
    async with await llamaproc.load_model(tiny_model, parallel=2) as model:
        expected = {p: _text(await _collect(model.generate(p, max_tokens=160))) for p in set(prompts)}
        assert len(set(expected.values())) == 2
        assert (await model.server_metrics())["llamacpp:n_busy_slots_per_decode"] == 1

        async def run(i: int, results: dict[int, str]) -> None:
            results[i] = _text(await _collect(model.generate(prompts[i], max_tokens=160)))

        # On a busy machine this process may be descheduled long enough for the server to finish one
        # request before the next arrives; a round counts when both slots were seen working at once.
        for _ in range(3):
            results: dict[int, str] = {}
            async with anyio.create_task_group() as tg:
                for i in range(len(prompts)):
                    tg.start_soon(run, i, results)
            assert results == {i: expected[p] for i, p in enumerate(prompts)}
            # llama-server's lifetime average of busy slots per decode call: above one once two
            # slots decoded in the same batch.
            if (await model.server_metrics())["llamacpp:n_busy_slots_per_decode"] > 1:
                break
        else:
            pytest.fail("the two slots never decoded at the same time")


# -- early break, close, crash ------------------------------------------------------------------------


@BOTH_BACKENDS
@TRIO_ASYNCGEN_WARNING
async def test_break_frees_the_slot(tiny_model: Path, anyio_backend: str) -> None:
    async with await llamaproc.load_model(tiny_model, parallel=1, args=ENDLESS) as model:
        got = 0
        async with model.generate(PROMPT, max_tokens=LONG) as stream:
            async for _ in stream:
                got += 1
                if got == 3:
                    break
        assert got == 3

        # With one slot, a second request only starts when the first one was dropped: left running,
        # the first one would go on for ever (--context-shift). The timeout is a safety net.
        with anyio.fail_after(30):
            async with model.generate(PROMPT, max_tokens=4) as second:
                first = await second.__anext__()
        assert first.text

        with anyio.fail_after(30):
            while any(slot["is_processing"] for slot in await model.slots()):
                await anyio.sleep(0.02)


async def test_cancelling_the_reader_frees_the_slot(tiny_model: Path) -> None:
    async with await llamaproc.load_model(tiny_model, parallel=1, args=ENDLESS) as model:
        got = 0
        three = anyio.Event()
        cancel = anyio.CancelScope()

        async def read() -> None:
            nonlocal got
            with cancel:
                async with model.generate(PROMPT, max_tokens=LONG) as stream:
                    async for _ in stream:
                        got += 1
                        if got == 3:
                            three.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            with anyio.fail_after(30):
                await three.wait()
            cancel.cancel()  # from another task, while the reader waits for its next token
        assert cancel.cancelled_caught and got >= 3

        with anyio.fail_after(30):  # the endless stream's slot is free again
            while any(slot["is_processing"] for slot in await model.slots()):
                await anyio.sleep(0.02)
        assert (await model.complete(PROMPT, max_tokens=4)).usage.completion_tokens == 4


@BOTH_BACKENDS
@TRIO_ASYNCGEN_WARNING
async def test_close_with_a_live_stream(tiny_model: Path, anyio_backend: str) -> None:
    """close() ends the stream with ClosedError and stops the child. (How fast: bench/, ``close_latency``.)"""
    model = await llamaproc.load_model(tiny_model, args=ENDLESS, grace=5)
    pid = model.pid
    seen: list[Token] = []
    caught: list[BaseException] = []
    three = anyio.Event()

    async def read() -> None:
        try:
            async with model.generate(PROMPT, max_tokens=LONG) as stream:
                async for tok in stream:
                    seen.append(tok)
                    if len(seen) == 3:
                        three.set()
        except llamaproc.LlamaprocError as exc:
            caught.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        with anyio.fail_after(30):
            await three.wait()
        await model.close()

    assert len(caught) == 1 and isinstance(caught[0], llamaproc.ClosedError), caught
    assert model.closed
    assert _exited_on_sigterm(model), model.returncode
    assert not psutil.pid_exists(pid) or _gone(pid)
    with pytest.raises(llamaproc.ClosedError):
        model.generate(PROMPT)
    with pytest.raises(llamaproc.ClosedError):
        await model.complete(PROMPT)
    await model.close()  # idempotent


async def test_close_with_a_live_stream_and_a_queued_request(tiny_model: Path) -> None:
    """One slot: a stream holds it, a second request waits in llama-server's queue.

    llama-server notices the closed queued connection only on its once-a-second
    check and, after one SIGTERM, waits for it; the second SIGTERM makes it exit.
    (How much sooner: bench/, ``close_latency.queued``.)
    """
    model = await llamaproc.load_model(tiny_model, parallel=1, args=ENDLESS, grace=5)
    caught: list[BaseException] = []
    first = anyio.Event()

    async def read() -> None:
        try:
            async with model.generate(PROMPT, max_tokens=LONG) as stream:
                async for _ in stream:
                    first.set()
        except llamaproc.LlamaprocError as exc:
            caught.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        with anyio.fail_after(30):
            await first.wait()
        tg.start_soon(read)  # queued: no answer until the slot is free
        with anyio.fail_after(30):
            while (await model.server_metrics()).get("llamacpp:requests_deferred", 0) < 1:
                await anyio.sleep(0.01)
        await model.close()

    assert len(caught) == 2 and all(isinstance(e, llamaproc.ClosedError) for e in caught), caught
    assert _exited_on_sigterm(model), model.returncode


@BOTH_BACKENDS
async def test_aclose_from_another_task(tiny_model: Path, anyio_backend: str) -> None:
    async with await llamaproc.load_model(tiny_model, parallel=1, args=ENDLESS) as model:
        stream = model.generate(PROMPT, max_tokens=LONG)
        caught: list[BaseException] = []
        reading = anyio.Event()

        async def read() -> None:
            try:
                async for _ in stream:
                    reading.set()
            except llamaproc.LlamaprocError as exc:
                caught.append(exc)

        # The stream is endless: the reader ends only because of aclose(). The timeout is a safety net.
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await reading.wait()
                await stream.aclose()

        assert [type(e) for e in caught] == [llamaproc.ClosedError], caught
        assert stream.error is caught[0]
        assert model.last_error is None  # nothing went wrong with the server
        # The slot is free and the model serves on.
        assert (await model.complete(PROMPT, max_tokens=2)).usage.completion_tokens == 2


@BOTH_BACKENDS
@TRIO_ASYNCGEN_WARNING
@pytest.mark.filterwarnings(r"ignore:Async generator 'llamaproc\.client\._client\._iterate':ResourceWarning")
async def test_break_without_async_with_frees_the_slot(tiny_model: Path, anyio_backend: str) -> None:
    """``async for tok in model.generate(...): break`` drops the stream, which closes it (no gc.collect())."""
    async with await llamaproc.load_model(tiny_model, parallel=1, args=ENDLESS) as model:
        async for _ in model.generate(PROMPT, max_tokens=LONG):
            break

        # One slot, and the dropped stream was endless: the next request gets the slot only if the
        # stream was closed. The timeout is a safety net.
        with anyio.fail_after(30):
            first = await model.complete(PROMPT, max_tokens=1)
        assert first.usage.completion_tokens == 1
        assert len(model._client._streams) == 0


async def test_close_during_a_non_streamed_call(tiny_model: Path) -> None:
    """(How fast close() is here: bench/, ``close_latency.non_streamed``.)"""
    model = await llamaproc.load_model(tiny_model, args=ENDLESS)
    caught: list[BaseException] = []

    async def call() -> None:
        try:
            await model.complete(PROMPT, max_tokens=LONG)
        except llamaproc.LlamaprocError as exc:
            caught.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        with anyio.fail_after(30):
            while not any(slot["is_processing"] for slot in await model.slots()):
                await anyio.sleep(0.01)
        await model.close()

    assert len(caught) == 1 and isinstance(caught[0], llamaproc.ClosedError), caught
    assert model.last_error is caught[0]
    assert _exited_on_sigterm(model), model.returncode


async def test_error_answers_are_raised_at_once(tiny_model: Path) -> None:
    """(That they do not wait for a crash, as a cut connection does: tests/unit/test_model_args.py.)"""
    async with await llamaproc.load_model(tiny_model) as model:  # no embeddings=True
        with pytest.raises(llamaproc.StatusError) as info:
            await model.embed(["hello"])
        assert info.value.status_code == 501
        assert "embeddings" in info.value.message
        assert model.last_error is info.value
        assert model.returncode is None

        with pytest.raises(llamaproc.StatusError) as bad:
            await _collect(model.generate(PROMPT, max_tokens=2, n_probs="not a number"))
        assert bad.value.status_code == 400
        assert model.last_error is bad.value

        # The server is fine afterwards.
        assert (await model.complete(PROMPT, max_tokens=2)).usage.completion_tokens == 2


async def test_crash_mid_stream_raises(tiny_model: Path) -> None:
    async with await llamaproc.load_model(tiny_model, args=ENDLESS) as model:
        got = 0
        # The stream is endless: it ends only because of the crash. The timeout is a safety net.
        with anyio.fail_after(30), pytest.raises(llamaproc.ServerCrashedError) as info:
            async with model.generate(PROMPT, max_tokens=LONG) as stream:
                async for _ in stream:
                    got += 1
                    if got == 3:
                        os.kill(model.pid, signal.SIGKILL)

        err = info.value
        assert err.returncode == -9
        assert err.pid == model.pid
        # The cause is the stream's own error, which has the connection's error as its cause.
        assert isinstance(err.__cause__, (llamaproc.IncompleteStreamError, llamaproc.TransportError))
        assert err.__cause__.__cause__ is not None
        assert model.returncode == -9
        assert model.last_error is err
        assert stream.error is err

        # Every later call fails at once, without touching the network: without waiting for anything.
        with pytest.raises(llamaproc.ServerCrashedError):
            _without_waiting(model.complete(PROMPT, max_tokens=2))
        with pytest.raises(llamaproc.ServerCrashedError):
            model.generate(PROMPT)
        with pytest.raises(llamaproc.ServerCrashedError):
            _without_waiting(model.slots())
    assert model.closed


async def test_crash_during_a_non_streamed_call(tiny_model: Path) -> None:
    async with await llamaproc.load_model(tiny_model, args=ENDLESS) as model:
        caught: list[BaseException] = []

        async def call() -> None:
            try:
                await model.complete(PROMPT, max_tokens=LONG)
            except llamaproc.LlamaprocError as exc:
                caught.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(30):
                while not any(slot["is_processing"] for slot in await model.slots()):
                    await anyio.sleep(0.01)
            os.kill(model.pid, signal.SIGKILL)

        assert len(caught) == 1 and isinstance(caught[0], llamaproc.ServerCrashedError), caught
        assert caught[0].returncode == -9
        assert model.last_error is caught[0]


async def test_crash_between_requests_raises(tiny_model: Path) -> None:
    async with await llamaproc.load_model(tiny_model) as model:
        await model.complete(PROMPT, max_tokens=2)
        os.kill(model.pid, signal.SIGKILL)
        with anyio.fail_after(30):
            while model.returncode is None:
                await anyio.sleep(0.01)
        with pytest.raises(llamaproc.ServerCrashedError) as info:
            await model.complete(PROMPT, max_tokens=2)
        assert info.value.returncode == -9
        assert model.last_error is info.value


# -- resources -----------------------------------------------------------------------------------------


async def test_sequential_requests_do_not_leak_fds(tiny_model: Path) -> None:
    me = psutil.Process()
    async with await llamaproc.load_model(tiny_model) as model:
        child = psutil.Process(model.pid)
        for _ in range(5):
            await _collect(model.generate(PROMPT, max_tokens=2))
        ours, theirs = me.num_fds(), child.num_fds()

        for _ in range(100):
            tokens = await _collect(model.generate(PROMPT, max_tokens=2))
            assert len(tokens) == 2

        def settled() -> bool:
            return bool(me.num_fds() <= ours + 2 and child.num_fds() <= theirs + 2)

        with anyio.move_on_after(10):  # let the server finish closing the last connection
            while not settled():
                await anyio.sleep(0.01)
        assert me.num_fds() <= ours + 2, (ours, me.num_fds())
        assert child.num_fds() <= theirs + 2, (theirs, child.num_fds())


async def test_back_to_back_streams(tiny_model: Path) -> None:
    """A request right after a stream must not fail.

    llama-server closes the connection after every streamed answer although
    the answer says ``Keep-Alive`` and not ``Connection: close``; a client
    that puts that connection back in its pool may send the next request on
    it just before the close arrives, and gets "Server disconnected without
    sending a response". The race is rare per request, hence the many rounds.
    """
    async with await llamaproc.load_model(tiny_model) as model:
        for i in range(200):
            if i % 2:
                tokens = await _collect(model.chat(CHAT, max_tokens=1))
            else:
                tokens = await _collect(model.generate(PROMPT, max_tokens=1))
            assert len(tokens) == 1
            if i % 3 == 0:
                await model.slots()


# -- trio -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio(tiny_model: Path, anyio_backend: str) -> None:
    import trio

    assert trio.lowlevel.current_trio_token() is not None
    model = await llamaproc.load_model(tiny_model, parallel=2)
    try:
        tokens = await _collect(model.generate(PROMPT, max_tokens=8))
        assert len(tokens) == 8 and all(t.id is not None for t in tokens)
        reply = await _collect(model.chat(CHAT, max_tokens=4))
        assert _text(reply)
        assert (await model.complete(PROMPT, max_tokens=8)).text == _text(tokens)
    finally:
        await model.close()
    assert model.returncode is not None


# -- introspection -------------------------------------------------------------------------------------


async def test_info_metrics_and_last_metrics(tiny_model: Path) -> None:
    async with await llamaproc.load_model(tiny_model, parallel=2) as model:
        assert model.last_metrics is None
        info = await model.info()
        assert info.gguf.architecture == "llama"
        assert info.gguf.context_length == 2048
        assert info.gguf.block_count == 2
        assert info.gguf.embedding_length == 64
        assert info.gguf.chat_template and "<|im_start|>" in info.gguf.chat_template
        assert info.props["total_slots"] == 2
        assert Path(info.props["model_path"]) == tiny_model
        assert info.pid == model.pid and info.base_url == model.base_url
        assert info.flavour == model.backend.flavour

        async with model.generate(PROMPT, max_tokens=7) as stream:
            async for _ in stream:
                pass
        assert model.last_metrics is not None
        assert model.last_metrics.generated_tokens == 7
        assert model.last_metrics.prompt_tokens + model.last_metrics.cached_tokens > 0
        assert model.last_metrics.decode_tokens_per_s > 0

        await model.complete(PROMPT, max_tokens=5)
        assert model.last_metrics.generated_tokens == 5

        counters = await model.server_metrics()
        assert counters["llamacpp:tokens_predicted_total"] == 12
        assert counters["llamacpp:prompt_tokens_total"] > 0
        assert counters["llamacpp:requests_processing"] == 0


async def test_tokenize_round_trip(tiny_model: Path) -> None:
    async with await llamaproc.load_model(tiny_model) as model:
        ids = await model.tokenize(PROMPT)
        with_bos = await model.tokenize(PROMPT, add_special=True)
        assert with_bos == [1, *ids]
        assert (await model.detokenize(ids)).strip() == PROMPT


async def test_repr_and_properties(tiny_model: Path) -> None:
    model = await llamaproc.load_model(tiny_model)
    async with model:
        assert model.path == tiny_model
        assert model.base_url.startswith("http://127.0.0.1:")
        assert str(model.pid) in repr(model)
        assert model.returncode is None and not model.closed
        # Readiness may be seen on the socket before the output thread has read the log that far.
        with anyio.fail_after(30):
            while "listening on" not in model.output:
                await anyio.sleep(0.01)
    assert model.closed and model.returncode is not None


# -- environment of the child ---------------------------------------------------------------------------


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


@pytest.mark.parametrize(("devices", "expected"), [("0", "0"), ("1", "1")])
async def test_hip_visible_devices(tiny_model: Path, devices: str, expected: str) -> None:
    kwargs = {} if devices == "0" else {"devices": devices}  # "0" is the default
    async with await llamaproc.load_model(tiny_model, **kwargs) as model:  # type: ignore[arg-type]
        env = _environ(model.pid)
    assert env["HIP_VISIBLE_DEVICES"] == expected
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(model.backend.binary.parent)


async def test_hip_visible_devices_left_alone(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "3")
    async with await llamaproc.load_model(tiny_model, devices=None, env={"LLAMAPROC_TEST_MARK": "x"}) as model:
        env = _environ(model.pid)
    assert env["HIP_VISIBLE_DEVICES"] == "3"
    assert env["LLAMAPROC_TEST_MARK"] == "x"
