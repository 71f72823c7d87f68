"""llama-server's ``/metrics`` (the Prometheus text format), parsed to ``{sample name: value}``.

The library reads a handful of unlabelled gauges and counters; parsing them
here keeps ``prometheus_client`` (a dependency of the daemon only) out of the
library. Labels, if a sample has any, are dropped from its name; a later
sample of the same name wins.
"""

from __future__ import annotations

import math

__all__ = ["parse_metrics"]

_SPECIAL = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}


def parse_metrics(text: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition; raises ``ValueError`` for a malformed line."""
    samples: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        brace = line.find("{")
        if brace >= 0:
            end = line.rfind("}")
            if end < brace:
                raise ValueError(f"unterminated labels in metrics line {raw!r:.200}")
            name, rest = line[:brace], line[end + 1 :]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not name or not fields:
            raise ValueError(f"malformed metrics line {raw!r:.200}")
        value = fields[0]
        samples[name.strip()] = _SPECIAL[value] if value in _SPECIAL else float(value)
    return samples
