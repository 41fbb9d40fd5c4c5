"""offload_gpu's phases without an engine: the ceilings (pinned PCIe copies, raw DeepSpeed aio on
the disk under test) and two explorations (disk write patterns and AioStore chunkings; how fast
page-locked host memory can be had)."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from measure import GB, MiB, gbps, median, rnd, rss, timed
from offload_engine import CUDA, DEV, OffloadRun


def phase_limits(run: OffloadRun) -> dict[str, Any]:
    """The ceilings: pinned PCIe copies and raw DeepSpeed aio (one aio_handle, page-locked, O_DIRECT)."""
    from nvme_tier.config import AioSettings
    from nvme_tier.deepspeed.ops import load_aio_op

    args = run.args
    n = int(args.raw_gb * GB) // MiB * MiB
    res: dict[str, Any] = {"bytes": n}
    if CUDA:
        dev = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 256)
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        d2h, h2d = [], []
        for _ in range(3):
            d2h.append(timed(lambda: host.copy_(dev, non_blocking=True)))
            h2d.append(timed(lambda: dev.copy_(host, non_blocking=True)))
        res["pcie_pinned"] = {
            "d2h_GBps": gbps(n, median(d2h)),
            "h2d_GBps": gbps(n, median(h2d)),
            "d2h_s": [rnd(x) for x in d2h],
            "h2d_s": [rnd(x) for x in h2d],
        }
        dev = host = None
    else:
        res["pcie_pinned"] = None

    s = AioSettings()
    handle = load_aio_op().aio_handle(
        s.block_size, s.queue_depth, s.single_submit, s.overlap_events, s.intra_op_parallelism
    )
    buf = handle.new_cpu_locked_tensor(n, torch.empty(0, dtype=torch.uint8))
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 256)
    buf.copy_(src)
    path = os.path.join(args.path, "raw_aio.bin")
    w, wi, r, exact = [], [], [], True
    for _ in range(args.raw_reps):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.sync()  # the unlink's discards (ext4 -o discard) finish outside the timed write
        t = time.perf_counter()
        done = handle.sync_pwrite(buf, path)  # a new file
        w.append(time.perf_counter() - t)
        t = time.perf_counter()
        done = done + handle.sync_pwrite(buf, path) - 1  # the same file again, in place (no O_TRUNC)
        wi.append(time.perf_counter() - t)
        buf.zero_()
        t = time.perf_counter()
        done2 = handle.sync_pread(buf, path)
        r.append(time.perf_counter() - t)
        exact = exact and done == 1 and done2 == 1 and bool(torch.equal(buf, src.cpu() if CUDA else src))
    os.unlink(path)
    handle.free_cpu_locked_tensor(buf)
    buf = src = handle = None
    res["raw_aio"] = {
        "settings": s.model_dump(),
        "buffer": "aio_handle.new_cpu_locked_tensor (page-locked), one sync_pwrite/sync_pread of the whole buffer",
        "write_GBps": gbps(n, median(w)),
        "write_in_place_GBps": gbps(n, median(wi)),
        "read_GBps": gbps(n, median(r)),
        "write_GBps_best": gbps(n, min(w)),
        "write_in_place_GBps_best": gbps(n, min(wi)),
        "read_GBps_best": gbps(n, min(r)),
        "write_s": [rnd(x) for x in w],
        "write_in_place_s": [rnd(x) for x in wi],
        "read_s": [rnd(x) for x in r],
        "exact": exact,
    }
    return {"limits": res}


def phase_disk(run: OffloadRun) -> dict[str, Any]:
    """Exploration: fresh file vs in-place overwrite vs delete-then-write; AioStore chunkings (A/B, alternated)."""
    from nvme_tier.config import AioSettings
    from nvme_tier.deepspeed.ops import load_aio_op
    from nvme_tier.storage import AioStore, OwnerInfo, StorageBackend, WriterDirectory

    args = run.args
    n = int(args.raw_gb * GB) // MiB * MiB
    s = AioSettings()
    handle = load_aio_op().aio_handle(
        s.block_size, s.queue_depth, s.single_submit, s.overlap_events, s.intra_op_parallelism
    )
    buf = handle.new_cpu_locked_tensor(n, torch.empty(0, dtype=torch.uint8))
    buf.copy_(torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 256))
    d = os.path.join(args.path, "disk")
    os.makedirs(d, exist_ok=True)
    raw: dict[str, list[float]] = {}

    def rec(key: str, sec: float) -> None:
        raw.setdefault(key, []).append(sec)

    for rep in range(args.raw_reps):
        f = os.path.join(d, f"fresh{rep}.bin")
        t = time.perf_counter()
        handle.sync_pwrite(buf, f)
        rec("fresh_write", time.perf_counter() - t)  # noqa: E702
        t = time.perf_counter()
        handle.sync_pwrite(buf, f)
        rec("inplace_write", time.perf_counter() - t)  # noqa: E702
        t = time.perf_counter()
        handle.sync_pread(buf, f)
        rec("read", time.perf_counter() - t)  # noqa: E702
        t = time.perf_counter()
        os.unlink(f)
        rec("unlink", time.perf_counter() - t)  # noqa: E702
        t = time.perf_counter()
        handle.sync_pwrite(buf, f)
        rec("after_unlink_write", time.perf_counter() - t)  # noqa: E702
        fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
        t = time.perf_counter()
        handle.sync_pwrite(buf, f)
        rec("after_trunc_write", time.perf_counter() - t)  # noqa: E702
        os.unlink(f)
    handle.free_cpu_locked_tensor(buf)
    del buf, handle
    res: dict[str, Any] = {
        "raw_aio_GBps": {k: [gbps(n, x) for x in v] for k, v in raw.items() if k != "unlink"},
        "unlink_s": [rnd(x) for x in raw["unlink"]],
    }
    print("disk raw", res, flush=True)
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 256)
    dst = torch.empty_like(src)
    rows = []
    for rep in range(2):
        for chunk_mb, slots in args.sweep:
            for variant in args.disk_variants:
                be = StorageBackend(
                    AioStore(
                        WriterDirectory(d, OwnerInfo.current(label="disk")),
                        staging_budget_bytes=chunk_mb * slots * MiB,
                    )
                )
                be.store.chunk_bytes, be.store.slot_count = chunk_mb * MiB, slots
                be.write("s", src).result()  # the first write: a fresh file
                if variant == "fresh":  # delete-then-write instead of the in-place rewrite
                    be.delete("s")
                w = timed(lambda be=be: be.write("s", src).result())  # the rewrite under test
                r = timed(lambda be=be: be.read_into("s", dst).result())
                rows.append(
                    {
                        "rep": rep,
                        "chunk_MiB": chunk_mb,
                        "slots": slots,
                        "variant": variant,
                        "rewrite_GBps": gbps(n, w),
                        "read_GBps": gbps(n, r),
                        "exact": bool(torch.equal(src, dst)),
                    }
                )
                be.release()
                print("disk backend", rows[-1], flush=True)
    res["backend_rewrite"] = rows
    return {"disk": res}


def phase_probe(run: OffloadRun) -> dict[str, Any]:
    """Exploration: how fast page-locked host memory can be had on this machine, and its DMA speed."""
    if not CUDA:
        return {}
    from nvme_tier import pinned_memory

    args = run.args
    n = int(args.probe_gb * GB) // MiB * MiB
    dev = torch.empty(n, dtype=torch.uint8, device=DEV)
    rows = []

    def one(label: str, make: Callable[[], Any], tensor_of: Callable[[Any], torch.Tensor]) -> None:
        gc.collect()
        base = rss()
        t = time.perf_counter()
        obj = make()
        alloc = time.perf_counter() - t
        added = rss() - base
        host = tensor_of(obj)
        d2h = timed(lambda: host.copy_(dev, non_blocking=True))
        h2d = timed(lambda: dev.copy_(host, non_blocking=True))
        t = time.perf_counter()
        if hasattr(obj, "free"):
            obj.free()
        obj = host = None
        gc.collect()
        if label.startswith("torch"):
            torch._C._host_emptyCache()
        free_s = time.perf_counter() - t
        rows.append(
            {
                "method": label,
                "alloc_s": rnd(alloc),
                "alloc_GBps": gbps(n, alloc),
                "rss_added_GB": round(added / GB, 3),
                "split_s": {k: rnd(v) for k, v in getattr(obj, "seconds", {}).items()},
                "d2h_GBps": gbps(n, d2h),
                "h2d_GBps": gbps(n, h2d),
                "free_s": rnd(free_s),
            }
        )
        print("probe", rows[-1], flush=True)

    for rep in range(2):
        one(
            f"torch_pin_memory#{rep}", lambda: torch.empty(n, dtype=torch.uint8, pin_memory=True), lambda o: o
        )
        for threads in (1, 8, 16):
            one(
                f"register_threads{threads}#{rep}",
                lambda threads=threads: pinned_memory.PinnedHostMemory(n, threads=threads),
                lambda o: o.tensor,
            )
    return {"probe_pinned_alloc": {"bytes": n, "rows": rows}}
