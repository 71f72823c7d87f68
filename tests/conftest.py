from __future__ import annotations

import pytest

# the ledger's store fixtures (a real redis-server, a fresh store of each kind)
pytest_plugins = ["ledger_stores"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
