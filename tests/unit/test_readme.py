"""The README says what the code does: its tables are checked against the code."""

from __future__ import annotations

from pathlib import Path

from llamaproc.protocol import ERROR_CODES, error_codes_table

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_the_readme_prints_the_error_code_table() -> None:
    assert error_codes_table() in README


def test_every_code_is_in_the_table_once() -> None:
    table = error_codes_table()
    for code in ERROR_CODES:
        assert table.count(f"| `{code}` |") == 1
