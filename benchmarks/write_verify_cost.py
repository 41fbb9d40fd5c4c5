"""What the aio backend's write verification costs (issue 18): the file-size check and the sampled
O_DIRECT read-back of (intra_op_parallelism + 1) pages per chunk, against the whole write.

DeepSpeed's async_io op drops per-request errors, so every aio write is read back in a few pages
before its state may be freed. This times ``StorageBackend._verify_written`` inside real writes
(first write: new files; later ones: in-place rewrites) from a CUDA tensor when there is one.

    python benchmarks/write_verify_cost.py --path /local_nvme --size-mb 1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch

from nvme_tier.storage import AioStore, OwnerInfo, StorageBackend, WriterDirectory
from nvme_tier.storage import aio as aio_mod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--size-mb", type=int, default=256, help="bytes per tensor write, in MiB")
    parser.add_argument("--writes", type=int, default=6)
    parser.add_argument("--staging-mb", type=int, default=512)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()

    spent: list[float] = []
    verify = StorageBackend._verify_written

    def timed(self, *a):
        start = time.perf_counter()
        verify(self, *a)
        spent.append(time.perf_counter() - start)

    StorageBackend._verify_written = timed
    root = args.path or tempfile.mkdtemp(prefix="ntier-verify-")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = torch.randn(args.size_mb << 18, device=device)  # float32: size_mb MiB
    backend = StorageBackend(
        AioStore(
            WriterDirectory(root, OwnerInfo.current(rank=0, label="bench")),
            staging_budget_bytes=args.staging_mb << 20,
        )
    )
    runs = []
    try:
        for i in range(args.writes):
            start = time.perf_counter()
            backend.write(f"x{i % 2}", data).result()
            runs.append({"write_s": time.perf_counter() - start, "verify_s": spent[-1]})
        record = backend.record("x0")
    finally:
        backend.release()
    steady = runs[2:] or runs  # the first writes also make files and page-lock the staging
    # Medians: on a shared disk one write in a few waits behind other processes' I/O.
    out = {
        "host": platform.node(),
        "device": device,
        "bytes": data.numel() * data.element_size(),
        "chunk_bytes": record.chunk_bytes,
        "sampled_pages_per_chunk": aio_mod.AioSettings().intra_op_parallelism + 1,
        "runs": runs,
        "median_verify_s": statistics.median(r["verify_s"] for r in steady),
        "median_write_s": statistics.median(r["write_s"] for r in steady),
        "median_verify_fraction": statistics.median(r["verify_s"] / r["write_s"] for r in steady),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
