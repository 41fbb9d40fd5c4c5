"""Byte units: the numbers every layer shares, defined once.

At the bottom of the import graph, so storage, the host side and the CLI can all use them
without one importing another only for a constant.
"""

from __future__ import annotations

PAGE = 4096  # bytes of a host memory page (and the O_DIRECT alignment floor)
MiB = 1 << 20
