"""What skip_unchanged's kept-file check costs (issue 23), against the write it saves.

Before an unchanged state is skipped, its kept file must be shown to still hold what was written
(``StorageBackend.holds_written_bytes``): an ``lstat`` per data file against the stamp taken at write
(dev, inode, size, mtime, ctime) and a few sampled pages read back (O_DIRECT where the filesystem
takes it) against their crc32c. Goal: at most 2 % of the write it saves, the fingerprint's budget.

For each backend and size this times the rewrite of an unchanged tensor (what a skip saves: for aio
an in-place rewrite) and the check (median of ``--checks`` runs), and writes the ratio.

    python benchmarks/skip_check_cost.py --json benchmarks/results/skip_check_cost_cpu.json
    python benchmarks/skip_check_cost.py --path /local_nvme --sizes-mib 64 1024 4096
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from nvme_tier.bench.common import machine_info  # noqa: E402
from nvme_tier.deepspeed.ops import aio_compatible  # noqa: E402
from nvme_tier.storage import AioStore, OwnerInfo, StorageBackend, WriterDirectory, ZarrStore  # noqa: E402

GOAL = 0.02  # check seconds / write seconds of the same bytes


def measure(kind: str, root: str, size_mib: int, writes: int, checks: int) -> dict:
    cls = AioStore if kind == "aio" else ZarrStore
    backend = StorageBackend(cls(WriterDirectory(root, OwnerInfo.current(label="bench"))))
    data = torch.randint(0, 255, (size_mib << 20,), dtype=torch.uint8)
    try:
        backend.write("x", data).result()  # the first write makes the file and the staging
        write_s = []
        for _ in range(writes):
            start = time.perf_counter()
            backend.write("x", data).result()
            write_s.append(time.perf_counter() - start)
        record = backend.record("x")
        check_s = []
        for _ in range(checks):
            start = time.perf_counter()
            held = backend.holds_written_bytes(record)
            check_s.append(time.perf_counter() - start)
            assert held, "the check refused an untouched file"
    finally:
        backend.release()
    write, check = statistics.median(write_s), statistics.median(check_s)
    return {
        "backend": kind,
        "size_mib": size_mib,
        "files": len(record.stamps or ()),
        "sampled_pages": len(record.samples or ()),
        "write_s": write,
        "write_gbps": (size_mib << 20) / write / 1e9,
        "check_ms": check * 1e3,
        "check_max_ms": max(check_s) * 1e3,
        "ratio": check / write,
        "within_goal": check / write <= GOAL,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    parser.add_argument("--backends", nargs="+", default=["aio", "zarr"], choices=["aio", "zarr"])
    parser.add_argument("--writes", type=int, default=3)
    parser.add_argument("--checks", type=int, default=21)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    root = args.path or tempfile.mkdtemp(prefix="ntier-skipcheck-", dir=os.getcwd())
    kinds = [k for k in args.backends if k != "aio" or aio_compatible()[0]]
    rows = []
    for kind in kinds:
        for size in args.sizes_mib:
            row = measure(kind, root, size, args.writes, args.checks)
            rows.append(row)
            print(
                f"{kind:5s} {size:6d} MiB  write {row['write_s'] * 1e3:8.1f} ms ({row['write_gbps']:.2f} GB/s)"
                f"  check {row['check_ms']:.3f} ms ({row['files']} files, {row['sampled_pages']} pages)"
                f"  = {row['ratio'] * 100:.3f} % of the write"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"goal": GOAL, "path": root, "machine": machine_info(root), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
