"""Byte units and how a byte count reads: what every layer shares, defined once.

At the bottom of the import graph, so storage, the host side and the CLI can all use them
without one importing another only for a constant.
"""

from __future__ import annotations

PAGE = 4096  # bytes of a host memory page (and the O_DIRECT alignment floor)
MiB = 1 << 20


def round_down(value: int, multiple: int) -> int:
    return value - value % multiple


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def human_bytes(n: float) -> str:
    """``n`` bytes as a person reads them: ``512 B``, ``1.50 MiB``, ``2.00 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
