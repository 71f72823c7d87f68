from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import llamaproc
import llamaproc.errors as exceptions


def test_all_is_sorted_and_complete() -> None:
    assert llamaproc.__all__ == sorted(llamaproc.__all__)
    public = {name for name in dir(llamaproc) if not name.startswith("_")} - {"sync", "testing"}
    # Submodules imported as a side effect are not API.
    public = {name for name in public if not inspect.ismodule(getattr(llamaproc, name))}
    assert public == set(llamaproc.__all__) - {"__version__"}


def test_public_objects_report_the_package_as_their_module() -> None:
    for name in llamaproc.__all__:
        obj = getattr(llamaproc, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "llamaproc", name


def test_every_error_derives_from_the_root() -> None:
    errors = [obj for obj in vars(exceptions).values() if inspect.isclass(obj) and issubclass(obj, BaseException)]
    assert len(errors) > 10
    for error in errors:
        assert issubclass(error, llamaproc.LlamaprocError), error
    for name in exceptions.__all__:
        assert name in llamaproc.__all__, f"{name} is not exported"


def test_misuse_errors_are_runtime_errors() -> None:
    assert issubclass(llamaproc.ClosedError, RuntimeError)


def test_the_library_does_not_load_the_daemon() -> None:
    """`import llamaproc` (and loading a model) costs nothing of the daemon's extra."""
    code = (
        "import sys, llamaproc, llamaproc.sync, llamaproc.testing\n"
        "heavy = ('starlette', 'uvicorn', 'uvloop', 'prometheus_client', 'httptools', 'llamaproc.serve')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('llamaproc.serve')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_errors_of_every_part_derive_from_the_root() -> None:
    assert issubclass(llamaproc.ListenError, llamaproc.LlamaprocError)
    assert issubclass(llamaproc.ListenError, OSError)


def test_serve_without_the_daemon_extra_says_which_extra_to_install(tmp_path: Path) -> None:
    # A stand-in for a missing dependency: a `starlette` package that cannot be imported.
    (tmp_path / "starlette").mkdir()
    (tmp_path / "starlette" / "__init__.py").write_text("raise ModuleNotFoundError('no', name='starlette')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-m", "llamaproc", "serve", "--config", str(tmp_path / "none.toml")],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode == 2
    assert "pip install 'llamaproc[daemon]'" in done.stderr and "Traceback" not in done.stderr
