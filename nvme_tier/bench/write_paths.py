"""Why the data path is DeepSpeed's async_io and not aiofiles: one host buffer written and read back.

Methods, on the same bytes (a host tensor; the device copy is not part of this question):

* ``aiofiles``        ``aiofiles.open(...)`` + ``await f.write(chunk)`` per chunk: each call runs
                      the blocking, buffered (page cache) ``write`` in asyncio's thread pool.
* ``aiofiles_x4``     the same with 4 handles writing 4 slices concurrently (``asyncio.gather``).
* ``os_pwrite``       plain buffered ``os.pwrite``/``os.preadv`` per chunk, one thread.
* ``aio_backend``     nvme_tier's AioBackend: DeepSpeed's async_io, O_DIRECT, pinned staging,
                      several requests in flight, crc32c per chunk (more work than the others).

Buffered writes "finish" once the bytes are in the page cache, so each buffered method also
reports write GB/s including ``fsync`` (the honest number for bytes on the disk) and how much
the page cache (host RAM) grew during the write. Reads are cold
where dropping the page cache worked (root). 1 GB = 1e9 bytes.

    python -m nvme_tier.bench.write_paths --size-gb 0.5 --path /local_nvme/bench \\
        --json benchmarks/results/write_paths_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from nvme_tier.bench.common import drop_page_cache, machine_info, methods_table
from nvme_tier.deepspeed.ops import aio_compatible
from nvme_tier.storage import AioStore, OwnerInfo, StorageBackend, WriterDirectory, supports_o_direct
from nvme_tier.units import MiB

CHUNK = 8 * MiB  # per write/read call of the buffered methods (the aio backend sizes its own)
METHODS = ("aiofiles", "aiofiles_x4", "os_pwrite", "aio_backend")


def _slices(nbytes: int, parts: int) -> list[tuple[int, int]]:
    step = -(-nbytes // parts) // CHUNK * CHUNK or CHUNK
    return [(off, min(step, nbytes - off)) for off in range(0, nbytes, step)]


async def _aiofiles_write(path: str, view: memoryview, parts: int) -> None:
    import aiofiles

    async def one(offset: int, length: int) -> None:
        async with aiofiles.open(path, "r+b") as f:
            await f.seek(offset)
            for off in range(offset, offset + length, CHUNK):
                await f.write(view[off : min(off + CHUNK, offset + length)])

    with open(path, "wb") as fh:  # create and size it, so the slices can be written in any order
        fh.truncate(len(view))
    await asyncio.gather(*(one(o, n) for o, n in _slices(len(view), parts)))


async def _aiofiles_read(path: str, view: memoryview, parts: int) -> None:
    import aiofiles

    async def one(offset: int, length: int) -> None:
        async with aiofiles.open(path, "rb") as f:
            await f.seek(offset)
            for off in range(offset, offset + length, CHUNK):
                await f.readinto(view[off : min(off + CHUNK, offset + length)])

    await asyncio.gather(*(one(o, n) for o, n in _slices(len(view), parts)))


def _os_pwrite(path: str, view: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in range(0, len(view), CHUNK):
            os.pwrite(fd, view[off : off + CHUNK], off)
    finally:
        os.close(fd)


def _os_pread(path: str, view: memoryview) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, len(view), CHUNK):
            os.preadv(fd, [view[off : off + CHUNK]], off)
    finally:
        os.close(fd)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def page_cache_bytes() -> int:
    """The kernel's page cache (``Cached`` in /proc/meminfo): host RAM that file writes filled."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    nbytes = max(CHUNK, int(args.size_gb * 1e9) // CHUNK * CHUNK)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dst = torch.zeros_like(src)
    src_view, dst_view = memoryview(src.numpy()), memoryview(dst.numpy())
    aio_ok, aio_why = aio_compatible()
    if aio_ok and not supports_o_direct(args.path):
        aio_ok, aio_why = False, f"{args.path} does not support O_DIRECT"
    try:
        import aiofiles  # noqa: F401

        aiofiles_why = ""
    except ImportError:
        aiofiles_why = "aiofiles not installed (pip install aiofiles)"

    backend = None
    results: dict[str, dict] = {}
    for name in args.methods:
        if name.startswith("aiofiles") and aiofiles_why:
            results[name] = {"skipped": aiofiles_why}
            continue
        if name == "aio_backend" and not aio_ok:
            results[name] = {"skipped": aio_why}
            continue
        path = os.path.join(args.path, f"{name}.bin")
        if name == "aio_backend":
            backend = StorageBackend(
                AioStore(
                    WriterDirectory(os.path.join(args.path, name), OwnerInfo.current(label="bench")),
                    staging_budget_bytes=args.staging_mb * MiB,
                )
            )
            backend.write("warmup", torch.zeros(4096, dtype=torch.uint8)).result()  # open handles once
            backend.delete("warmup")
            write, read, sync = (
                lambda b=backend: b.write("state", src).result(),
                lambda b=backend: b.read_into("state", dst).result(),
                None,  # O_DIRECT: the bytes are on the disk when the write returns
            )
        elif name == "os_pwrite":
            write, read, sync = (
                lambda p=path: _os_pwrite(p, src_view),
                lambda p=path: _os_pread(p, dst_view),
                lambda p=path: _fsync(p),
            )
        else:
            parts = 4 if name == "aiofiles_x4" else 1
            write, read, sync = (
                lambda p=path, n=parts: asyncio.run(_aiofiles_write(p, src_view, n)),
                lambda p=path, n=parts: asyncio.run(_aiofiles_read(p, dst_view, n)),
                lambda p=path: _fsync(p),
            )
        write_s, write_sync_s, read_s, exact, cold, cached = [], [], [], True, True, []
        for rep in range(args.repeats):
            print(f"[round {rep + 1}/{args.repeats}] {name}", flush=True)
            if backend is not None and name == "aio_backend":
                backend.delete("state")
            os.sync()
            drop_page_cache()
            before = page_cache_bytes()
            write_s.append(_timed(write))
            cached.append(max(0, page_cache_bytes() - before))
            write_sync_s.append(write_s[-1] + (_timed(sync) if sync else 0.0))
            dst.zero_()
            cold = drop_page_cache() and cold
            read_s.append(_timed(read))
            exact = exact and bool(torch.equal(src, dst))
        if backend is not None and name == "aio_backend":
            backend.release()
            backend = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

        def gbps(samples: list[float]) -> float:
            return round(nbytes / statistics.median(samples) / 1e9, 3)

        results[name] = {
            "write_GBps": gbps(write_s),
            "write_plus_fsync_GBps": gbps(write_sync_s),
            "read_GBps": gbps(read_s),
            "page_cache_added_by_write_bytes": int(statistics.median(cached)),
            "cold_reads": cold,
            "round_trip_exact": exact,
            "write_s": [round(x, 4) for x in write_s],
            "read_s": [round(x, 4) for x in read_s],
        }
    return {
        "machine": {**machine_info(args.path), "aio_usable": aio_ok, "aio_reason": aio_why},
        "size_bytes": nbytes,
        "chunk_bytes": CHUNK,
        "repeats": args.repeats,
        "methods": results,
    }


HEADER = ["method", "write GB/s", "+fsync", "read GB/s", "cold", "cache +MiB", "ok"]


def table_row(name: str, m: dict) -> list:
    return [
        name,
        *(f"{m[k]:.2f}" for k in ("write_GBps", "write_plus_fsync_GBps", "read_GBps")),
        str(m["cold_reads"])[:1],
        f"{m['page_cache_added_by_write_bytes'] / MiB:.0f}",
        "yes" if m["round_trip_exact"] else "NO",
    ]


def print_table(report: dict) -> None:
    print(methods_table(report["methods"], HEADER, table_row))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m nvme_tier.bench.write_paths", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--size-gb", type=float, default=0.5, help="bytes to move, GB (default %(default)s)")
    p.add_argument("--path", help="scratch directory on the disk under test (default: a temporary one)")
    p.add_argument("--staging-mb", type=int, default=512, help="the aio backend's staging budget (MiB)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--repeats", type=int, default=3, help="rounds per method; the median is reported")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    created = args.path is None or not os.path.exists(args.path)
    args.path = args.path or tempfile.mkdtemp(prefix="nvme_tier_write_paths_")
    os.makedirs(args.path, exist_ok=True)
    try:
        report = run(args)
    finally:
        if created:
            shutil.rmtree(args.path, ignore_errors=True)
    print_table(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
            fh.write("\n")
    return report


if __name__ == "__main__":
    main()
