"""``python -m nvme_tier``: the same commands as the ``nvme-tier`` console script."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
