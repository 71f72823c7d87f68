"""The ``llamaproc`` command.

``llamaproc run MODEL PROMPT``   stream a completion to stdout
``llamaproc demo``               write a tiny model and run it on the bundled llama-server
``llamaproc discover DIR``       list the GGUF models in a folder
``llamaproc serve --config F``   run the multi-model daemon (OpenAI HTTP + Unix socket)
``llamaproc chat MODEL [PROMPT]``  chat with a model, directly or through the daemon (``--daemon``)
``llamaproc ps`` / ``llamaproc stop``  the running daemon's models / stop it
``llamaproc worker [--register URL]``  run an rpc worker (``ggml-rpc-server``) a daemon can shard models over
``llamaproc render SPEC --image I``  print the Kubernetes manifests that run a serving spec's models
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import anyio

from ..backend import discover, find_backend
from ..errors import LlamaprocError
from ..model import load_model

__all__ = ["main"]


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def _run(args: argparse.Namespace) -> int:
    async with await load_model(
        args.model,
        binary=args.binary,
        ctx_size=args.ctx_size,
        gpu_layers=args.gpu_layers,
        log_output=args.verbose,
    ) as model:
        async with model.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature) as stream:
            async for token in stream:
                _write(token.text)
        _write("\n")
        if args.stats and model.last_metrics is not None:
            m = model.last_metrics
            print(
                f"[{m.prompt_tokens} prompt tokens in {m.prefill_ms:.1f} ms, "
                f"{m.generated_tokens} generated at {m.decode_tokens_per_s:.0f} tokens/s]",
                file=sys.stderr,
            )
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from ..testing import write_tiny_model

    backend = find_backend(args.binary)
    print(f"llama-server: {backend.binary} ({backend.flavour} build, found via {backend.source})")
    with tempfile.TemporaryDirectory(prefix="llamaproc-demo-") as tmp:
        path = write_tiny_model(Path(tmp) / "tiny.gguf")
        print(f"model: {path} ({path.stat().st_size / 1e6:.1f} MB, random weights: expect gibberish)")
        started = time.perf_counter()
        async with await load_model(path, binary=backend.binary, parallel=2, embeddings=True) as model:
            print(f"loaded in {(time.perf_counter() - started) * 1000:.0f} ms: pid {model.pid} at {model.base_url}")
            prompt = "hello world"
            _write(f"\ngenerate({prompt!r}):\n  ")
            async with model.generate(prompt, max_tokens=32) as stream:
                async for token in stream:
                    _write(token.text)
            metrics = model.last_metrics
            if metrics is not None:
                _write(f"\n  [{metrics.generated_tokens} tokens at {metrics.decode_tokens_per_s:.0f} tokens/s]\n")
            _write("\nchat([{'role': 'user', 'content': 'hi'}]):\n  ")
            async with model.chat([{"role": "user", "content": "hi"}], max_tokens=16) as stream:
                async for token in stream:
                    _write(token.text)
            vectors = await model.embed(["red", "blue"])
            _write(f"\n\nembed(['red', 'blue']): 2 vectors of {len(vectors[0])} floats\n")
        print(f"closed: llama-server exited with code {model.returncode}")
    return 0


def _discover(args: argparse.Namespace) -> int:
    models = discover(args.directory)
    if not models:
        print(f"no GGUF models in {args.directory}")
        return 1
    print(f"{'file':40} {'arch':10} {'type':10} {'size':>10} {'ctx':>8}")
    for info in models:
        size = f"{info.size_bytes / 2**20:.1f} MiB"
        print(f"{Path(info.path).name:40} {info.architecture or '?':10} {info.file_type or '?':10} "
              f"{size:>10} {info.context_length or 0:>8}")
    return 0


#: The environment variable ``llamaproc worker`` takes the daemon's API key from when ``--api-key`` is not given.
API_KEY_ENV = "LLAMAPROC_API_KEY"


async def _worker(args: argparse.Namespace) -> int:
    """Run an rpc worker in the foreground until SIGINT or SIGTERM; with ``--register``, keep a daemon informed."""
    import ipaddress

    from ..process import start_worker

    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(
            f"llamaproc worker: warning: listening on {args.host}: rpc-server has no authentication:"
            " keep workers on a trusted network",
            file=sys.stderr,
        )
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    advertise = args.advertise
    if advertise is not None:
        from ..process import parse_address

        parse_address(advertise)
    elif args.register is not None and args.host in ("0.0.0.0", "::"):
        print("llamaproc worker: with --host 0.0.0.0, give --advertise HOST:PORT, the address the daemon reaches",
              file=sys.stderr)
        return 2
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with await start_worker(host=args.host, port=args.port, threads=args.threads) as worker:
            _write(f"llamaproc worker: serving at {worker.address} (pid {worker.pid})\n")
            for device in worker.devices:
                _write(f"  {device.name}: {device.free / 2**20:.0f} MiB free of {device.total / 2**20:.0f} MiB\n")
            async with anyio.create_task_group() as tg:
                if args.register is not None:
                    from ._register import register_and_heartbeat

                    tg.start_soon(
                        lambda: register_and_heartbeat(
                            args.register, api_key=api_key, address=advertise or worker.address,
                            devices=worker.devices,
                            cpu_seconds=worker.cpu_seconds,
                        )  # fmt: skip
                    )

                async def died() -> None:
                    await worker.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(died)
                async for signum in signals:
                    print(f"llamaproc worker: {signal.Signals(signum).name} received, stopping", file=sys.stderr)
                    break
                tg.cancel_scope.cancel()
            if worker.returncode is not None:
                print(f"llamaproc worker: rpc-server exited with code {worker.returncode}:\n"
                      f"{worker.output.summary()}", file=sys.stderr)  # fmt: skip
                return 1
    return 0


def _render(args: argparse.Namespace) -> int:
    """Print the Kubernetes manifests of a spec; exit 2 on a bad spec, as ``serve`` does on a bad config."""
    from ..errors import ConfigError
    from ..kube import MODEL_DIR, dump_manifests, render_manifests
    from ..runtime import read_spec

    try:
        spec = read_spec(args.spec, model_dir=MODEL_DIR)
        manifests = render_manifests(
            spec,
            image=args.image,
            namespace=args.namespace,
            models_claim=args.models_claim,
            models_host_path=args.models_host_path,
            api_keys_secret=args.api_keys_secret,
            gpu_resource=args.gpu_resource,
        )
    except ConfigError as exc:
        print(f"llamaproc render: {exc}", file=sys.stderr)
        return 2
    _write(f"# llamaproc render {Path(args.spec).name}: {len(manifests)} objects\n")
    _write(dump_manifests(manifests))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaproc", description="Supervise llama.cpp's llama-server.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log llama-server's output to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="stream a completion of PROMPT by MODEL to stdout")
    run.add_argument("model", help="path of a GGUF model")
    run.add_argument("prompt")
    run.add_argument("--max-tokens", type=int, default=256)
    run.add_argument("--temperature", type=float, default=0.0)
    run.add_argument("--ctx-size", type=int, default=None)
    run.add_argument("--gpu-layers", type=int, default=None)
    run.add_argument("--binary", default=None, help="llama-server to use")
    run.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")

    demo = sub.add_parser("demo", help="write a tiny model and run it on the bundled llama-server")
    demo.add_argument("--binary", default=None, help="llama-server to use")

    disc = sub.add_parser("discover", help="list the GGUF models in a folder")
    disc.add_argument("directory")

    serve = sub.add_parser("serve", help="run the multi-model daemon in the foreground")
    serve.add_argument("--config", required=True, help="TOML config file, or a serving spec (.yaml)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8484, help="HTTP port (0: any free port)")
    serve.add_argument("--socket", default=None, help="Unix socket path (default: STATE_DIR/serve.sock)")
    serve.add_argument("--state-dir", default=None, help="pid file and state (default: ~/.llamaproc)")

    chat = sub.add_parser("chat", help="chat with a model: a GGUF path, or a daemon's model with --daemon")
    chat.add_argument("model")
    chat.add_argument("prompt", nargs="?", default=None, help="one message; interactive when omitted")
    chat.add_argument("--daemon", action="store_true", help="talk to the running `llamaproc serve`")
    chat.add_argument("--socket", default=None)
    chat.add_argument("--state-dir", default=None)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--binary", default=None, help="llama-server to use (without --daemon)")

    worker = sub.add_parser("worker", help="run an rpc worker in the foreground for sharded models")
    worker.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (rpc-server has no authentication: trusted networks only)")
    worker.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    worker.add_argument("--threads", type=int, default=None, help="CPU threads of the rpc-server")
    worker.add_argument("--register", default=None, metavar="URL",
                        help="register with the daemon at URL (http://HOST:PORT) and send it heartbeats")
    worker.add_argument("--api-key", default=None,
                        help=f"the daemon's API key (default: ${API_KEY_ENV})")
    worker.add_argument("--advertise", default=None, metavar="HOST:PORT",
                        help="the address to register (default: where it listens; needed with --host 0.0.0.0)")

    render = sub.add_parser("render", help="print the Kubernetes manifests that run a serving spec's models")
    render.add_argument("spec", help="the serving spec (YAML, or TOML of [[documents]])")
    render.add_argument("--image", required=True, help="the container image: llamaproc[daemon] and llama-server")
    render.add_argument("--namespace", default=None, help="the objects' namespace (default: none, kubectl's)")
    volume = render.add_mutually_exclusive_group()
    volume.add_argument("--models-claim", default=None, metavar="PVC",
                        help="the PersistentVolumeClaim of the models, mounted at /models (default: llamaproc-models)")
    volume.add_argument("--models-host-path", default=None, metavar="DIR",
                        help="a directory of the nodes holding the models, instead of a claim")
    render.add_argument("--api-keys-secret", default="llamaproc-api-keys", metavar="NAME",
                        help="the Secret whose key 'api-key' holds the daemons' API key (default: llamaproc-api-keys)")
    render.add_argument("--gpu-resource", default="nvidia.com/gpu", metavar="NAME",
                        help="the resource a pod asks for when its model's device is not cpu (default: nvidia.com/gpu)")

    serve.add_argument("--watch", action="store_true", help="apply the config file again whenever it changes")
    for name, text in (
        ("ps", "list the running daemon's models"),
        ("stop", "stop the running daemon"),
        ("apply", "serve a new config (TOML or spec) in the running daemon, without a restart"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state-dir", default=None)
        p.add_argument("--socket", default=None)
        if name == "apply":
            p.add_argument("file", help="the config: TOML, or a serving spec (.yaml)")
            p.add_argument("--dry-run", action="store_true", help="print the changes without making them")
        if name == "stop":
            p.add_argument(
                "--timeout",
                type=float,
                default=None,
                help="seconds to wait for the daemon to exit (default: its drain_timeout + 30 s, at least 60 s)",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "run":
            return anyio.run(_run, args)
        if args.command == "demo":
            return anyio.run(_demo, args)
        if args.command == "discover":
            return _discover(args)
        if args.command == "worker":
            return anyio.run(_worker, args)
        if args.command == "render":
            return _render(args)
        if args.command == "serve":
            try:
                from ..serve import cmd_serve
            except ModuleNotFoundError as exc:
                # The daemon's dependencies come with an extra; a library install has none of them.
                print(
                    f"llamaproc serve: {exc.name} is not installed; the daemon needs the daemon extra:"
                    " pip install 'llamaproc[daemon]'",
                    file=sys.stderr,
                )
                return 2
            return cmd_serve(args)
        from . import _daemon_cli

        command = {
            "chat": _daemon_cli.cmd_chat, "ps": _daemon_cli.cmd_ps, "stop": _daemon_cli.cmd_stop,
            "apply": _daemon_cli.cmd_apply,
        }  # fmt: skip
        return command[args.command](args)
    except BrokenPipeError:
        # Whoever read our output has gone (`llamaproc run ... | head`): stop quietly, like a
        # program killed by SIGPIPE, with nothing left to flush into the dead pipe at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except LlamaprocError as exc:
        print(f"llamaproc: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
