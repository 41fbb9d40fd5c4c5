"""Plain-text tables, one look for all: the CLI's listings, ``format_status`` and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_cell(value: Any) -> str:
    """Floats with 3 significant digits, None as "-", anything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def format_rows(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart, a rule of dashes under the header."""
    cells = [[format_cell(x) for x in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
