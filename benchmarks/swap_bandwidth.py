"""Swap bandwidth per method: the script users run from a checkout.

The code lives in ``nvme_tier/bench/swap_bandwidth.py`` so that ``nvme-tier bench`` also works from
an installed wheel; see that module's docstring for the methods and what is measured.

    python benchmarks/swap_bandwidth.py --size-gb 1 --path /mnt/nvme/bench \\
        --json benchmarks/results/swap_bandwidth.json --plot benchmarks/results/swap_bandwidth.png
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

# drop_page_cache, sync_device and timed are re-exported for benchmarks/offload_gpu.py.
from nvme_tier.bench.swap_bandwidth import drop_page_cache, main, sync_device, timed  # noqa: E402, F401

if __name__ == "__main__":
    main()
