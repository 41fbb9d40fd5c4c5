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
# zarr imports cupy when it is installed; on the H100 image that import (cupy -> ml_dtypes)
# segfaulted. nvme_tier never hands zarr a GPU buffer: make it an ImportError, as without cupy.
sys.modules.setdefault("cupy", None)

from nvme_tier.bench.swap_bandwidth import main  # noqa: E402

if __name__ == "__main__":
    main()
