"""Durations (``"5m"``) and memory sizes: bytes as an int, or a number with a unit (``"2GiB"``, ``"1.5GB"``).

The one parser of sizes in the package: the ledger's requests and capacities
and the serve config's budgets all read sizes through :func:`parse_size`.
"""

from __future__ import annotations

import itertools
import math
import re
from decimal import Decimal

from ..errors import InvalidArgumentError

__all__ = ["parse_duration", "parse_size"]

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_SIZE_RE = re.compile(rf"\s*({_NUMBER})\s*([a-z]*)\s*")


def parse_size(value: str | int, *, param: str | None = None) -> int:
    """Parse a byte size into int bytes.

    Accepts a plain int of bytes or a number with a unit: ``B``, SI ``kB MB GB
    TB`` (powers of 1000) or IEC ``KiB MiB GiB TiB`` (powers of 1024), case
    insensitive, e.g. ``"512MiB"`` or ``"1.5GB"``. Fractional bytes round down.
    Raises :class:`InvalidArgumentError` (a ``ValueError``) naming ``param`` for
    anything else.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidArgumentError(
            f"invalid size {value!r}: expected bytes as an integer or a string like '8GiB'", param=param
        )
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgumentError(f"invalid size {value!r}: must be >= 0", param=param)
        return value
    match = _SIZE_RE.fullmatch(value.lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise InvalidArgumentError(
            f"invalid size {value!r}: expected e.g. '8GiB', '512MiB', '1.5GB' or a number of bytes", param=param
        )
    return int(Decimal(match.group(1)) * _SIZE_UNITS[match.group(2)])


_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION_PART = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h|d)")
_DURATION_RE = re.compile(rf"(?:{_DURATION_PART.pattern})+\s*")



def parse_duration(value: str | float) -> float | None:
    """Parse a duration into seconds; ``None`` means disabled.

    Accepts a plain number of seconds (``30``, ``1.5``, ``"30"``) or a string of
    number-unit parts in decreasing order (``"300ms"``, ``"5m"``, ``"1h30m"``;
    units ``d h m s ms``). ``0``, any zero duration and ``"never"`` disable.
    Raises :class:`ConfigError` (a ``ValueError``) for anything else.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidArgumentError(f"invalid duration {value!r}: expected a string like '30s' or a number of seconds")
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "never":
            return None
        if re.fullmatch(_NUMBER, text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text):
            parts = _DURATION_PART.findall(text)
            factors = [_DURATION_UNITS[unit] for _, unit in parts]
            if any(a <= b for a, b in itertools.pairwise(factors)):
                raise InvalidArgumentError(f"invalid duration {value!r}: units must appear once each, largest first")
            seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
        else:
            raise InvalidArgumentError(f"invalid duration {value!r}: expected e.g. '300ms', '30s', '5m', '1h30m' or 'never'")
    else:
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise InvalidArgumentError(f"invalid duration {value!r}: must be a finite number of seconds >= 0")
    return seconds if seconds > 0 else None
