"""A service that holds its model only while it is needed, through the memory ledger.

    python examples/ledger_service.py [MODEL.gguf]

A Starlette app opens the memory ledger in its lifespan (the one every
process of the host shares, so this service, ``llamaproc serve`` and a batch
job do not load past the memory there is) and loads a model through it with
``idle_unload="5m"``: after five minutes without a call the model gives its
memory back, and the next call loads it again (the call waits for that, it
does not fail). FastAPI's ``lifespan=`` is the same: the ``lifespan`` function
below works unchanged in ``FastAPI(lifespan=lifespan)``.

``GET /health`` answers ``{"status": "ok", "model_loaded": ...}`` (false
while the model is unloaded), ``POST /complete`` a completion. Run as a
script, it uses a ledger file in a temporary directory (not the default
``~/.llamaproc/ledger.db``), starts the app in Starlette's ``TestClient``
(which runs the lifespan), makes one call to each route, prints the answers
and shuts the app down: no server is left running.
"""

import contextlib
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import llamaproc
from llamaproc.testing import write_tiny_model


def make_app(model_path: Path, ledger_url: str | None = None) -> Starlette:
    """The app; ``ledger_url`` ``None`` is the host's default ledger."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, llamaproc.TextModel]]:
        async with await llamaproc.open_ledger(ledger_url) as ledger:
            async with await llamaproc.load_model(model_path, ledger=ledger, idle_unload="5m") as model:
                yield {"model": model}  # on shutdown: the model stops and its lease goes back, then the ledger closes

    async def health(request: Request) -> JSONResponse:
        model: llamaproc.TextModel = request.state.model
        return JSONResponse({"status": "ok", "model_loaded": model.loaded})

    async def complete(request: Request) -> JSONResponse:
        model: llamaproc.TextModel = request.state.model
        body = await request.json()
        result = await model.complete(body["prompt"], max_tokens=body.get("max_tokens", 32))
        return JSONResponse({"text": result.text})

    routes = [Route("/health", health, methods=["GET"]), Route("/complete", complete, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)


def main(model_path: Path, ledger_url: str) -> None:
    with TestClient(make_app(model_path, ledger_url)) as client:  # runs the lifespan: ledger open, model loaded
        health = client.get("/health")
        health.raise_for_status()
        print(f"GET /health -> {health.json()}")
        answer = client.post("/complete", json={"prompt": "hello world", "max_tokens": 16})
        answer.raise_for_status()
        print(f"POST /complete -> {answer.json()}")
    print("service stopped; its model and its lease went with it")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else write_tiny_model(Path(tmp) / "tiny.gguf")
        main(path, f"sqlite://{tmp}/ledger.db")
