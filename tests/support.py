"""Helpers every test may use (tests/ is on sys.path through its conftest)."""

from __future__ import annotations

import os

import pytest


def require(component: str, present: bool, how: str) -> None:
    """Skip a test whose system component is missing, with the reason; under CI (``CI`` set) fail instead.

    CI installs every component (.ci/run): a missing one there is a missing install step, never a pass.
    """
    if present:
        return
    message = f"{component} is not on this machine ({how})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must install it", pytrace=False)
    pytest.skip(message)
