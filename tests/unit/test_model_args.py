"""TextModel's argument checks, the request bodies it builds and its errors, against a mocked llama-server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import respx
from trio.testing import MockClock

import llamaproc
from llamaproc import InvalidArgumentError, LlamaClient, TextModel
from llamaproc.backend import Backend
from llamaproc.process import OutputBuffer

BASE = "http://llama.test"
FINAL = {"content": "", "tokens": [], "stop": True, "stop_type": "limit", "tokens_evaluated": 1, "tokens_predicted": 0}
CHAT_FINAL = {"choices": [{"finish_reason": "length", "index": 0, "delta": {}}]}


class _Process:
    """Stands in for a running ServerProcess."""

    pid = 4242
    port = 8080
    base_url = BASE
    returncode = None
    output = OutputBuffer()

    async def stop(self) -> None:
        pass


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False, assert_all_mocked=True) as router:
        router.post("/completion").mock(
            side_effect=lambda request: httpx.Response(
                200,
                headers={"content-type": "text/event-stream"},
                content=f"data: {json.dumps(FINAL)}\n\n".encode(),
            )
            if json.loads(request.content)["stream"]
            else httpx.Response(200, json=FINAL)
        )
        router.post("/v1/chat/completions").mock(
            return_value=httpx.Response(
                200,
                headers={"content-type": "text/event-stream"},
                content=f"data: {json.dumps(CHAT_FINAL)}\n\ndata: [DONE]\n\n".encode(),
            )
        )
        yield router


@pytest.fixture
async def model(router: respx.MockRouter, tmp_path: Path) -> AsyncIterator[TextModel]:
    backend = Backend(binary=tmp_path / "llama-server", flavour="cpu")
    process: Any = _Process()
    model = TextModel(process, LlamaClient(BASE), path=tmp_path / "m.gguf", backend=backend)
    yield model
    await model.close()


def _sent(router: respx.MockRouter) -> Any:
    return json.loads(router.calls.last.request.content)


async def _drain(stream: llamaproc.TokenStream) -> None:
    async with stream:
        async for _ in stream:
            pass


# -- stop ---------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("stop", "sent"),
    [("ab", ["ab"]), (["ab", "c"], ["ab", "c"]), (("x",), ["x"]), ([], [])],
    ids=["string", "list", "tuple", "empty"],
)
async def test_stop_string_is_one_stop_string(
    model: TextModel, router: respx.MockRouter, stop: Any, sent: list[str]
) -> None:
    await _drain(model.generate("hi", stop=stop))
    assert _sent(router)["stop"] == sent
    await model.complete("hi", stop=stop)
    assert _sent(router)["stop"] == sent
    await _drain(model.chat([{"role": "user", "content": "hi"}], stop=stop))
    assert _sent(router)["stop"] == sent


@pytest.mark.anyio
async def test_no_stop_sends_none(model: TextModel, router: respx.MockRouter) -> None:
    await _drain(model.generate("hi", max_tokens=3))
    assert _sent(router) == {
        "prompt": "hi", "n_predict": 3, "temperature": 0.0, "stream": True, "return_tokens": True,
    }
    await model.complete([1, 2], max_tokens=-1)
    assert _sent(router) == {
        "prompt": [1, 2], "n_predict": -1, "temperature": 0.0, "stream": False, "return_tokens": True,
    }


# -- caller mistakes ----------------------------------------------------------------------------------


BAD_GENERATION: list[tuple[str, dict[str, Any]]] = [
    ("prompt must be", {"prompt": None}),
    ("prompt must be", {"prompt": 5}),
    ("prompt must be", {"prompt": ["hello", "world"]}),
    ("prompt must be", {"prompt": [1, 2.5]}),
    ("max_tokens must be at least -1", {"max_tokens": -5}),
    ("max_tokens must be an int", {"max_tokens": None}),
    ("max_tokens must be an int", {"max_tokens": "8"}),
    ("max_tokens must be an int", {"max_tokens": True}),
    ("temperature must be a number", {"temperature": "hot"}),
    ("stop must be", {"stop": 5}),
    ("stop must be", {"stop": ["a", 1]}),
    ("cannot be sent as JSON", {"foo": {1, 2}}),
    ("cannot be sent as JSON", {"temperature": float("nan")}),
]
BAD_IDS = [f"{next(iter(kw))}={kw[next(iter(kw))]!r}" for _, kw in BAD_GENERATION]


@pytest.mark.anyio
@pytest.mark.parametrize(("message", "bad"), BAD_GENERATION, ids=BAD_IDS)
async def test_bad_generation_arguments(
    model: TextModel, router: respx.MockRouter, message: str, bad: dict[str, Any]
) -> None:
    kwargs = {"prompt": "hi", **bad}
    prompt = kwargs.pop("prompt")
    with pytest.raises(InvalidArgumentError, match=message) as info:
        model.generate(prompt, **kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, llamaproc.UsageError)
    with pytest.raises(InvalidArgumentError, match=message):
        await model.complete(prompt, **kwargs)
    if "prompt" not in bad:
        with pytest.raises(InvalidArgumentError, match=message):
            model.chat([{"role": "user", "content": "hi"}], **kwargs)
    assert router.calls.call_count == 0
    assert model.last_error is None  # a mistake in the call, not a failure of the model


@pytest.mark.anyio
async def test_n_predict_is_given_as_max_tokens(model: TextModel, router: respx.MockRouter) -> None:
    with pytest.raises(InvalidArgumentError, match="as max_tokens, not n_predict"):
        model.generate("hi", n_predict=3)
    with pytest.raises(InvalidArgumentError, match="as max_tokens, not n_predict"):
        await model.complete("hi", n_predict=3)
    assert router.calls.call_count == 0


@pytest.mark.anyio
@pytest.mark.parametrize("messages", ["hi", None, [1], [{"role": "user"}, "hi"], {"role": "user"}])
async def test_bad_messages(model: TextModel, router: respx.MockRouter, messages: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="messages must be"):
        model.chat(messages)
    assert router.calls.call_count == 0


@pytest.mark.anyio
@pytest.mark.parametrize("texts", ["hello", [1], None])
async def test_bad_embed_input(model: TextModel, router: respx.MockRouter, texts: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        await model.embed(texts)
    assert router.calls.call_count == 0


BAD_LOAD: list[tuple[str, dict[str, Any]]] = [
    ("parallel must be at least 1", {"parallel": 0}),
    ("parallel must be an int", {"parallel": "2"}),
    ("parallel must be an int", {"parallel": True}),
    ("ctx_size must be at least 0", {"ctx_size": -5}),
    ("ctx_size must be an int or None", {"ctx_size": "4096"}),
    ("gpu_layers must be an int or None", {"gpu_layers": 1.5}),
    ("threads must be an int or None", {"threads": "4"}),
    ("pooling must be", {"pooling": 1}),
    ("args must be a sequence of strings", {"args": "--flash-attn on"}),
    ("args must be a sequence of strings", {"args": ["--threads", 4]}),
    ("args must be a sequence of strings", {"args": None}),
    ("env must be a mapping", {"env": {"FOO": 1}}),
    ("env must be a mapping", {"env": "FOO=1"}),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("message", "bad"), BAD_LOAD, ids=[f"{k}={v!r}" for _, b in BAD_LOAD for k, v in b.items()])
async def test_bad_load_arguments(tmp_path: Path, message: str, bad: dict[str, Any]) -> None:
    # Checked before the file or the binary is looked at.
    with pytest.raises(InvalidArgumentError, match=message) as info:
        await llamaproc.load_model(tmp_path / "missing.gguf", binary=tmp_path / "no-server", **bad)
    assert isinstance(info.value, ValueError)


@pytest.mark.anyio
async def test_good_load_arguments_get_as_far_as_the_file(tmp_path: Path) -> None:
    with pytest.raises(llamaproc.ModelFileError):
        await llamaproc.load_model(
            tmp_path / "missing.gguf", parallel=2, ctx_size=0, gpu_layers=-1, threads=4, pooling="mean",
            args=("--flash-attn", "on"), env={"FOO": "1"},
        )


# -- errors ---------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-virtual-clock")]
)
async def test_an_error_answer_is_raised_without_waiting_for_a_crash(model: TextModel, router: respx.MockRouter) -> None:
    """A cut connection may mean that the child died: the model waits (up to 0.5 s) for its exit status.

    An error answer comes from a live server: it is raised at once. Measured on a virtual clock.
    """
    router.post("/v1/embeddings").mock(
        return_value=httpx.Response(501, json={"error": {"code": 501, "message": "embeddings are off"}})
    )
    start = anyio.current_time()
    with pytest.raises(llamaproc.StatusError) as info:
        await model.embed(["hello"])
    assert anyio.current_time() == start
    assert info.value.status_code == 501 and model.last_error is info.value

    router.post("/completion").mock(side_effect=httpx.ConnectError("the connection was cut"))
    with pytest.raises(llamaproc.TransportError):
        await model.complete("hello")
    assert anyio.current_time() - start == pytest.approx(0.5)  # the child is alive here: the wait ran out
