"""``llamaproc run`` into a pipe that is closed early."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import llamaproc


def test_run_into_a_closed_pipe_is_quiet(backend: llamaproc.Backend, tiny_model: Path) -> None:
    """`llamaproc run ... | head -c 5`: no BrokenPipeError traceback, the server is stopped."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamaproc", "run", str(tiny_model), "hello world", "--max-tokens", "100000",
         "--ctx-size", "4096"],
        stdout=write_end,
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as reader:
            assert reader.read(5)
        # The reader is gone: the next write fails.
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = stderr.decode()
    assert "Traceback" not in text and "BrokenPipeError" not in text, text
    assert "Exception ignored" not in text, text
    assert proc.returncode == 128 + signal.SIGPIPE
