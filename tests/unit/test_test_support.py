"""The tests' own rule for system components: skip with a reason, but fail under CI."""

from __future__ import annotations

import pytest
from support import require


def test_a_present_component_neither_skips_nor_fails() -> None:
    require("redis-server", True, "apt-get install redis-server")


def test_a_missing_component_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server is not on this machine"):
        require("redis-server", False, "apt-get install redis-server")


def test_a_missing_component_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must install it"):
        require("redis-server", False, "apt-get install redis-server")
