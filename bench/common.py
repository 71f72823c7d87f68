"""What the benchmarks share: results, interleaved rounds, statistics, servers."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import httpx

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


@dataclass
class Settings:
    quick: bool
    workdir: Path
    profile: bool = False

    def reps(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Result:
    """One row of the table.

    ``compare`` says what the target is checked against:
    ``ratio`` (subject / baseline, or the median of per-round ratios),
    ``diff`` (subject - baseline, median of per-round differences) or
    ``abs`` (the subject alone: a latency bound; the baseline is context).
    """

    metric: str
    unit: str
    subject: float
    baseline: float | None
    compare: Literal["ratio", "diff", "abs"]
    target: float
    op: Literal["<=", ">="]
    value: float
    subject_label: str = ""
    baseline_label: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.value <= self.target if self.op == "<=" else self.value >= self.target

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def kill_leftovers(*names: str) -> list[int]:
    """Kill the children of this process whose command line contains one of ``names``; return their pids.

    A stopped one (a worker of the sharded benchmark) is continued first, so that it can die.
    """
    import psutil

    left = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if any(name in cmd for name in names):
                left.append(p.pid)
                p.send_signal(signal.SIGCONT)
                p.kill()
        except psutil.Error:
            pass
    return left


def write_report(name: str, results: Sequence[Result], context: dict[str, Any], *, started: Any, elapsed: float,
                 **extra: Any) -> dict[str, Any]:
    """Write ``bench/results/NAME.json`` (the run's settings, the machine, the results) and return the report."""
    import llamaproc

    report = {
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(elapsed, 2),
        **extra,
        "llamaproc": llamaproc.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_after": os.getloadavg(),
        "context": context,
        "results": [r.to_json() for r in results],
        "all_ok": all(r.ok for r in results),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}")
    return report


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired(subject: Sequence[float], baseline: Sequence[float], how: Literal["ratio", "diff"]) -> float:
    """The median of per-round ratios (or differences): robust to drift of the machine's load."""
    if how == "ratio":
        return median([s / b for s, b in zip(subject, baseline, strict=True) if b])
    return median([s - b for s, b in zip(subject, baseline, strict=True)])


async def interleave(
    variants: dict[str, Callable[[], Awaitable[float]]], rounds: int
) -> dict[str, list[float]]:
    """Run every variant once per round, rotating the order each round; collect the values."""
    names = list(variants)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(await variants[name]())
    return out


async def stream_rate(model: Any, prompt: str, n: int) -> float:
    """Tokens/s of one greedy stream of ``n`` tokens through ``model.generate`` (a TextModel of any kind)."""
    count = 0
    t0 = time.perf_counter()
    async with model.generate(prompt, max_tokens=n, temperature=0.0) as stream:
        async for _ in stream:
            count += 1
    dt = time.perf_counter() - t0
    if count != n:
        raise RuntimeError(f"model.generate() gave {count} tokens, expected {n}")
    return count / dt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_model(workdir: Path) -> Path:
    from llamaproc.testing import write_tiny_model

    path = workdir / "tiny.gguf"
    if not path.exists():
        write_tiny_model(path)
    return path


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="llamaproc-bench-") as d:
        yield Path(d)


def server_argv(binary: str | os.PathLike[str], model: Path, port: int) -> list[str]:
    """The argv ``load_model(model)`` gives llama-server, with a fixed port."""
    return [
        os.fspath(binary), "--model", str(model), "--parallel", "1", "--metrics", "--slots",
        "--port", str(port), "--host", "127.0.0.1",
    ]


def server_env(backend_env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "HIP_VISIBLE_DEVICES": "0", **backend_env}


class BareServer:
    """llama-server started with a bare Popen, ready when /health answers 200 (polled every 1 ms)."""

    def __init__(self, binary: str | os.PathLike[str], model: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = server_argv(binary, model, self.port)
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Spawn and wait for health; return the seconds from before Popen to the 200."""
        with httpx.Client(trust_env=False, timeout=1.0) as http:
            t0 = time.perf_counter()
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=self.env, start_new_session=True,
            )
            deadline = t0 + 30.0
            while True:
                try:
                    if http.get(self.url + "/health").status_code == 200:
                        return time.perf_counter() - t0
                except httpx.TransportError:
                    pass
                if self.popen.poll() is not None:
                    raise RuntimeError(f"bare llama-server exited with {self.popen.returncode}")
                if time.perf_counter() > deadline:
                    raise RuntimeError("bare llama-server did not become healthy in 30 s")
                time.sleep(0.001)

    def terminate(self, timeout: float = 3.0) -> float:
        """SIGTERM, wait (SIGKILL after ``timeout``); return the seconds it took to exit."""
        assert self.popen is not None
        t0 = time.perf_counter()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return float("inf")
        return time.perf_counter() - t0

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


class FakeServer:
    """bench/fake_server.py in its own process."""

    def __init__(self, native: Path, chat: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "fake_server.py"), "--native", str(native), "--chat", str(chat)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.close()
            raise RuntimeError(f"the fake server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
