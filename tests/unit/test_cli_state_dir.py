"""`ps`, `chat --daemon` and `stop` find a daemon started with another state directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from llamaproc.cli._daemon_cli import cmd_ps, cmd_stop, find_socket, state_dir


def args(**values: object) -> argparse.Namespace:
    return argparse.Namespace(**values)


def test_the_state_dir_comes_from_the_option_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLAMAPROC_STATE_DIR", raising=False)
    assert state_dir(args()) == Path("~/.llamaproc").expanduser()
    monkeypatch.setenv("LLAMAPROC_STATE_DIR", str(tmp_path / "env"))
    assert state_dir(args()) == tmp_path / "env"
    assert state_dir(args(state_dir=str(tmp_path / "given"))) == tmp_path / "given"


def test_the_socket_is_the_one_serve_json_of_that_dir_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "serve.json").write_text(json.dumps({"socket": "/run/elsewhere.sock"}))
    monkeypatch.setenv("LLAMAPROC_STATE_DIR", str(tmp_path))
    assert find_socket(args()) == Path("/run/elsewhere.sock")


def test_not_finding_a_daemon_says_how_to_find_one_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLAMAPROC_STATE_DIR", str(tmp_path))
    assert cmd_ps(args()) == 1
    assert cmd_stop(args()) == 1
    err = capsys.readouterr().err
    assert err.count("LLAMAPROC_STATE_DIR") == 2 and str(tmp_path) in err
