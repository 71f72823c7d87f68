"""Start-up failures and orphan prevention with the real llama-server."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import psutil
import pytest

import llamaproc


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.anyio
async def test_bad_model_file_is_reported_at_once(tmp_path: Path) -> None:
    # (The path must not contain words like "fail" or "error": see the next test.)
    bad = tmp_path / "bad.gguf"
    bad.write_text("this is not a model\n" * 10)

    # llama-server writes its log from a worker thread and, now and then (about 1 run in 200 on a
    # loaded machine), exits before the last lines are written: the failure itself must always be
    # seen at once, its reason in at least one of three tries.
    reasons = 0
    for _ in range(3):
        # At once: from the exit, not after the start-up timeout (an hour; the 30 s are a safety net).
        with anyio.fail_after(30), pytest.raises(llamaproc.StartupError) as info:
            await llamaproc.load_model(bad, startup_timeout=3600)

        err = info.value
        assert type(err) is llamaproc.StartupError  # an exit, not a timeout
        assert err.returncode not in (None, 0)
        assert err.pid is not None and _gone(err.pid)
        # This build prints "gguf_init_from_reader: invalid magic characters: 'this', expected 'GGUF'".
        if "invalid magic" in err.output:
            assert "invalid magic" in str(err).splitlines()[0]  # the reason is in the first line
            reasons += 1
            break
    assert reasons, err.output


@pytest.mark.anyio
async def test_the_reason_is_not_taken_from_the_model_path(tmp_path: Path) -> None:
    bad = tmp_path / "error-correction-models" / "bad.gguf"
    bad.parent.mkdir()
    bad.write_text("this is not a model\n" * 10)
    for _ in range(3):  # see above: the log's last lines are now and then lost
        with pytest.raises(llamaproc.StartupError) as info:
            await llamaproc.load_model(bad)
        if "invalid magic" in info.value.output:
            break
    assert "invalid magic" in str(info.value).splitlines()[0]


@pytest.mark.anyio
async def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(llamaproc.ModelFileError, match="not found"):
        await llamaproc.load_model(tmp_path / "missing.gguf")
    with pytest.raises(llamaproc.ModelFileError):
        await llamaproc.load_model(tmp_path)  # a directory


@pytest.mark.anyio
async def test_missing_binary(tiny_model: Path) -> None:
    with pytest.raises(llamaproc.BinaryNotFoundError) as info:
        await llamaproc.load_model(tiny_model, binary="/nonexistent")
    assert "/nonexistent" in str(info.value)
    assert info.value.searched


@pytest.mark.anyio
async def test_startup_error_is_raised_for_a_bad_argument(tiny_model: Path) -> None:
    with pytest.raises(llamaproc.StartupError) as info:
        await llamaproc.load_model(tiny_model, args=["--no-such-option"])
    assert info.value.returncode not in (None, 0)
    assert "no-such-option" in str(info.value)


_PARENT = textwrap.dedent(
    """
    import sys, anyio, llamaproc

    async def main():
        model = await llamaproc.load_model(sys.argv[1])
        print(model.pid, flush=True)
        await anyio.sleep(120)

    anyio.run(main)
    """
)


@pytest.mark.parametrize("spawn", ["setpriv", "preexec"])
def test_parent_sigkill_leaves_no_orphan(tiny_model: Path, spawn: str) -> None:
    """Both ways of setting the parent-death signal: through setpriv, and the preexec_fn fallback."""
    env = dict(os.environ)
    env.pop("LLAMAPROC_NO_SETPRIV", None)
    if spawn == "preexec":
        env["LLAMAPROC_NO_SETPRIV"] = "1"
    elif shutil.which("setpriv") is None:
        pytest.skip("no setpriv on this machine")
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tiny_model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    server_pid = 0
    try:
        assert parent.stdout is not None and parent.stderr is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), (line, parent.stderr.read() if parent.poll() is not None else b"")
        server_pid = int(line)
        server = psutil.Process(server_pid)
        assert "llama-server" in " ".join(server.cmdline())
        assert os.path.basename(server.exe()) == "llama-server"  # setpriv and sh exec'd in place
        assert server.ppid() == parent.pid

        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)

        deadline = time.monotonic() + 30  # a wait, not a bound: the kernel kills it with its parent
        while not _gone(server_pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _gone(server_pid), f"llama-server {server_pid} outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for stream in (parent.stdout, parent.stderr):
            if stream is not None:
                stream.close()
        if server_pid and not _gone(server_pid):
            os.kill(server_pid, signal.SIGKILL)


@pytest.mark.anyio
async def test_host_given_in_args(tiny_model: Path) -> None:
    async with await llamaproc.load_model(tiny_model, args=["--host", "127.0.0.2"], startup_timeout=10) as model:
        assert model.base_url.startswith("http://127.0.0.2:")
        assert (await model.complete("hello", max_tokens=2)).usage.completion_tokens == 2


@pytest.mark.anyio
async def test_an_unclosed_model_is_killed_with_a_warning(tiny_model: Path) -> None:
    """A TextModel dropped without close(): its finalizer kills llama-server and says so."""
    model = await llamaproc.load_model(tiny_model, startup_timeout=30)
    pid = model.pid
    assert os.path.basename(psutil.Process(pid).exe()) == "llama-server"
    with pytest.warns(ResourceWarning, match=f"unclosed TextModel tiny.gguf \\(llama-server pid {pid}\\)"):
        del model
        gc.collect()
    with anyio.fail_after(30):  # a safety net only
        while not _gone(pid):
            await anyio.sleep(0.01)
