"""Embed llamaproc in another async service: the model lives as long as the app.

    python examples/service_lifespan.py [MODEL.gguf]

A Starlette app loads the model in its lifespan and closes it on shutdown, so
llama-server starts and stops with the service. The script starts the app with
uvicorn, calls it once, and shuts it down.
"""

import contextlib
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import llamaproc
from llamaproc.testing import write_tiny_model


def make_app(model_path: Path) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, llamaproc.TextModel]]:
        async with await llamaproc.load_model(model_path, parallel=2) as model:
            yield {"model": model}  # closed (child stopped) when the app shuts down

    async def complete(request: Request) -> JSONResponse:
        model: llamaproc.TextModel = request.state.model
        body = await request.json()
        result = await model.complete(body["prompt"], max_tokens=body.get("max_tokens", 32))
        return JSONResponse({"text": result.text, "pid": model.pid})

    return Starlette(routes=[Route("/complete", complete, methods=["POST"])], lifespan=lifespan)


async def main(model_path: Path) -> None:
    config = uvicorn.Config(make_app(model_path), host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        while not server.started:
            await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            answer = (await client.post("/complete", json={"prompt": "hello world"})).json()
        print(f"service answered from llama-server pid {answer['pid']}: {answer['text']!r}")
        server.should_exit = True
    print("service stopped; its llama-server stopped with it")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else write_tiny_model(Path(tmp) / "tiny.gguf")
        anyio.run(main, path)
