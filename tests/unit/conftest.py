"""Fixtures of the unit tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from process_helpers import survivors


@pytest.fixture
def tag() -> Iterator[str]:
    """A unique argument for the fake server; no process may carry it after the test."""
    value = f"fake-{uuid.uuid4().hex}"
    yield value
    left = survivors(value)
    for p in left:
        p.kill()
    assert not left, f"processes survived the test: {left}"
