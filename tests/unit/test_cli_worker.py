"""``llamaproc worker``'s checks that need no rpc-server."""

from __future__ import annotations

import pytest

from llamaproc.cli import main


def test_a_bad_advertised_address_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--advertise", "nonsense"]) == 1
    assert "nonsense" in capsys.readouterr().err


def test_registering_a_wildcard_address_needs_advertise(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--host", "0.0.0.0", "--register", "http://127.0.0.1:8484"]) == 2
    err = capsys.readouterr().err
    assert "--advertise" in err and "no authentication" in err
