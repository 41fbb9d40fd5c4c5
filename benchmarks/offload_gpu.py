"""End-to-end offload figures on one ZeRO-3 bf16 engine, every method in ONE run, one JSON.

What it measures, in this order (each phase writes the JSON again, so a cut-off run keeps what it had):

* limits       pinned PCIe copies (device <-> page-locked host) and raw DeepSpeed aio (one
               aio_handle, a page-locked buffer, O_DIRECT, on the same path): the ceilings.
* nvme         nvme_tier with the default nvme policy (optim_states -> nvme, hp_params/lp_params/
               lp_grads -> pinned_cpu, contiguous_grad_buffer discarded): first call and steady
               cycles, per-state cycles (include=[state]), peak host RSS (psutil, sampling thread)
               and pinned bytes, bit-exactness of every state buffer after each reload.
* checksum     NVMe-only offload/reload (include=["optim_states"]) with checksum true vs false,
               alternated; also the host memory an NVMe-only offload adds vs the staging budget.
* non_blocking how long offload_states(non_blocking=True) takes to return, and the total.
* zarr         the zarr backend on the same state (write, write + sync, cold read).
* torch_save   naive torch.save / torch.load of the same optimizer-state tensors.
* pinned_cpu   the pinned_cpu tier (device="cpu" policy: everything to page-locked host RAM):
               first call after attach and steady state.
* upstream     DeepSpeed's own offload_states(device=cpu, pin_memory=True) after
               nvme_tier.detach(engine): first call and steady state.

GB = 1e9 bytes. Works on CPU too (small sizes), e.g.:

    python benchmarks/offload_gpu.py --params-b 0.01 --hidden 1024 --raw-gb 0.25 --path /var/tmp/ob

GPU (H100 figures in docs/performance.md):

    python benchmarks/offload_gpu.py --params-b 1.6 --hidden 8192 --path /tmp/nvme/bench \
        --json benchmarks/results/offload_gpu_h100.json --plot benchmarks/results/offload_gpu_h100.png
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

# zarr imports cupy (for GPU buffers, which nvme_tier never hands it) when cupy is installed; on the
# H100 image that import (cupy -> ml_dtypes) segfaulted. Make it an ImportError, as without cupy.
sys.modules.setdefault("cupy", None)

from swap_bandwidth import drop_page_cache, sync_device, timed  # noqa: E402  (benchmarks/ is sys.path[0] for a script)

GB = 1e9
MiB = 1 << 20
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda") if CUDA else torch.device("cpu")
PROC = psutil.Process()


# -- small helpers ----------------------------------------------------------------------------------


def gbps(nbytes: float, seconds: float | None) -> float | None:
    return round(nbytes / seconds / GB, 3) if seconds else None


def rnd(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(x, n)


def rss() -> int:
    return PROC.memory_info().rss


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


class RssSampler:
    """Peak RSS while a block runs, sampled every ``interval`` s in a thread (psutil)."""

    def __init__(self, interval: float = 0.002, baseline: int | None = None):
        self.interval = interval
        self.baseline = baseline
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.extra: Callable[[], int] | None = None
        self.extra_peak = 0

    def __enter__(self) -> RssSampler:
        if self.baseline is None:
            self.baseline = rss()
        self.peak = max(self.baseline, rss())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            if self.extra is not None:
                with contextlib.suppress(Exception):
                    self.extra_peak = max(self.extra_peak, self.extra())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def added(self) -> int:
        return self.peak - (self.baseline or 0)


def fsync_tree(path: str) -> None:
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def machine_info(path: str) -> dict:
    info: dict[str, Any] = {
        "host": platform.node(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "host_mem_total_GB": round(psutil.virtual_memory().total / GB, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if CUDA else None,
    }
    with contextlib.suppress(Exception):
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_mem_GB"] = round(p.total_memory / GB, 1)
    with contextlib.suppress(Exception):
        u = shutil.disk_usage(path)
        info["disk"] = {"path": path, "total_GB": round(u.total / GB, 1), "free_GB": round(u.free / GB, 1)}
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True, timeout=10).stdout
        info["disk"]["df"] = out.strip().splitlines()[-1]
    return info


# -- the engine -------------------------------------------------------------------------------------
def dist_env() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def build_engine(args) -> Any:
    import deepspeed

    layers = max(1, round(args.params_b * 1e9 / (args.hidden * args.hidden)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[
            torch.nn.Linear(args.hidden, args.hidden, bias=False, device=DEV, dtype=torch.bfloat16)
            for _ in range(layers)
        ]
    )
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": args.optimizer == "torch"}},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": args.bucket},
        "bf16": {"enabled": True},
    }
    engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
    return engine


def train_step(engine, args) -> None:
    x = torch.randn(args.batch, args.hidden, device=DEV, dtype=torch.bfloat16)
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    sync_device()


def state_sizes(engine) -> dict[str, int]:
    from nvme_tier import engine as ds

    return {k.value: v for k, v in ds.buffers_present(engine).items()}


def snapshot(engine) -> dict[str, torch.Tensor]:
    """Device clones of every data-holding state buffer (contiguous_grad_buffer is scratch)."""
    from nvme_tier import engine as ds
    from nvme_tier.types import StateKind

    out = {}
    for kind, bufs in ds.discover_buffers(engine).items():
        if kind is StateKind.contiguous_grad_buffer:
            continue
        for b in bufs:
            out[b.name] = b.view.clone()
    sync_device()
    return out


def check_exact(engine, ref: dict[str, torch.Tensor]) -> dict:
    """torch.equal of every state buffer against its snapshot, plus crc32c of a sample of each."""
    from nvme_tier import engine as ds
    from nvme_tier.storage.base import crc32c

    now = {b.name: b for bufs in ds.discover_buffers(engine).values() for b in bufs}
    bad, compared, crcs = [], 0, {}
    for name, want in ref.items():
        got = now.get(name)
        if got is None or got.nbytes != want.numel() or not torch.equal(got.view, want):
            bad.append(name)
            continue
        compared += want.numel()
        if len(crcs) < 4:
            n = min(want.numel(), 64 * MiB)
            crcs[name] = [crc32c(want[:n].cpu()), crc32c(got.view[:n].cpu())]
    # A state dict rebuilt in another order (upstream reload) shifts the ordinal names: a mismatched
    # buffer that equals another mismatched snapshot is still bit-exact, only renamed.
    unmatched = list(bad)
    for name in bad:
        got = now.get(name)
        hit = next(
            (
                o
                for o in unmatched
                if got is not None and ref[o].numel() == got.nbytes and torch.equal(got.view, ref[o])
            ),
            None,
        )
        if hit is not None:
            unmatched.remove(hit)
    return {
        "exact": not unmatched,
        "renamed_only": bool(bad) and not unmatched,
        "mismatched": bad,
        "bytes_compared": compared,
        "crc32c_first_64MiB": crcs,
    }


def fresh_baseline(engine) -> int:
    """Detach nvme_tier, return cached pinned blocks to the OS, then read RSS: what a new attach adds."""
    import nvme_tier

    nvme_tier.detach(engine)
    gc.collect()
    if CUDA:
        torch._C._host_emptyCache()
    return rss()


def offload_cfg(args, path: str, **over) -> dict:
    block = {
        "path": path,
        "backend": args.backend,
        "progress": False,
        "staging_budget_mb": args.staging_mb,
    }
    block.update(over)
    return block


# -- phases -----------------------------------------------------------------------------------------
def phase_limits(args, out: dict) -> None:
    from nvme_tier.config import AioSettings
    from nvme_tier.storage.aio import load_aio_op

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
    out["limits"] = res


def phase_disk(args, out: dict) -> None:
    """Exploration: fresh file vs in-place overwrite vs delete-then-write; AioBackend chunkings (A/B, alternated)."""
    from nvme_tier.config import AioSettings
    from nvme_tier.storage import AioBackend, OwnerInfo, WriterDirectory
    from nvme_tier.storage.aio import load_aio_op

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
    from nvme_tier.storage.aio import _Slot, _take_handle

    for rep in range(2):
        for chunk_mb, slots in args.sweep:
            for variant in args.disk_variants:
                in_place = variant != "fresh"
                be = AioBackend(
                    WriterDirectory(d, OwnerInfo.current(label="disk")),
                    staging_budget_bytes=chunk_mb * slots * MiB,
                )
                be.chunk_bytes, be.slot_count, be.rewrite_in_place = chunk_mb * MiB, slots, in_place
                if variant == "inplace_torch_pinned":  # staging from torch's pinned allocator instead
                    be._slots = [
                        _Slot(
                            _take_handle(be.settings),
                            torch.empty(be.chunk_bytes, dtype=torch.uint8, pin_memory=CUDA),
                        )
                        for _ in range(slots)
                    ]
                be.write("s", src).result()  # the first write: a fresh file
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
    out["disk"] = res


def phase_probe(args, out: dict) -> None:
    """Exploration: how fast page-locked host memory can be had on this machine, and its DMA speed."""
    if not CUDA:
        return
    from nvme_tier.storage import staging

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
                lambda threads=threads: staging.PinnedHostMemory(n, threads=threads),
                lambda o: o.tensor,
            )
    out["probe_pinned_alloc"] = {"bytes": n, "rows": rows}


def offload_call(engine, ctl, label: str, baseline: int | None = None, **kw) -> dict:
    """One timed offload_states call with RSS sampling; returns its figures."""
    before_dev = torch.cuda.memory_allocated() if CUDA else 0
    sampler = RssSampler(baseline=baseline)
    sampler.extra = lambda: ctl._mover.pinned_bytes
    with sampler:
        s = timed(lambda: engine.offload_states(**kw))
    st = ctl.last_stats.get("offload")
    moved = (st.bytes_written + st.bytes_to_host) if st else 0
    row = {
        "call": label,
        "s": rnd(s),
        "bytes_written_nvme": st.bytes_written if st else 0,
        "bytes_skipped": st.bytes_skipped if st else 0,
        "bytes_to_host": st.bytes_to_host if st else 0,
        "GBps": gbps(moved, s),
        "nvme_GBps": gbps(st.bytes_written, s) if st and st.bytes_written else None,
        "rss_added_GB": round(sampler.added / GB, 3),
        "pinned_bytes_after": ctl._mover.pinned_bytes,
        "pinned_bytes_peak": max(sampler.extra_peak, ctl._mover.pinned_bytes),
        "device_bytes_freed": (before_dev - torch.cuda.memory_allocated()) if CUDA else None,
    }
    print("offload", row, flush=True)
    return row


def reload_call(engine, ctl, label: str, **kw) -> dict:
    s = timed(lambda: engine.reload_states(**kw))
    st = ctl.last_stats.get("reload")
    row = {"call": label, "s": rnd(s), "bytes_read_nvme": st.bytes_read if st else 0}
    print("reload", row, flush=True)
    return row


def phase_nvme(args, out: dict, engine, ref, sizes) -> None:
    import nvme_tier
    from nvme_tier.types import StateKind

    base = fresh_baseline(engine)
    path = os.path.join(args.path, "nvme")
    t = time.perf_counter()
    ctl = nvme_tier.attach(engine, offload_cfg(args, path))
    attach_s = time.perf_counter() - t
    pinned_policy = sum(sizes[k] for k in ("hp_params", "lp_params", "lp_grads"))
    res: dict[str, Any] = {
        "policy": "default nvme: optim_states->nvme, hp/lp_params+lp_grads->pinned_cpu, grad buffer discard",
        "attach_s": rnd(attach_s),
        "nvme_bytes": sizes["optim_states"],
        "pinned_cpu_bytes": pinned_policy,
        "calls": [],
    }
    # First call: backend start (aio handles, staging), pinned host buffers for the pinned_cpu states.
    first = offload_call(engine, ctl, "first", baseline=base)
    first["host_added_over_rss_before_attach_GB"] = first["rss_added_GB"]
    res["calls"].append(first)
    res["calls"].append(reload_call(engine, ctl, "first"))
    res["exact_after_first"] = check_exact(engine, ref)
    for i in range(args.cycles):
        nvme_tier.mark_dirty(engine)  # force a real rewrite (skip_unchanged would skip it)
        res["calls"].append(offload_call(engine, ctl, f"steady{i}"))
        res["calls"].append(reload_call(engine, ctl, f"steady{i}"))
    res["exact_after_steady"] = check_exact(engine, ref)
    # Skip-unchanged: offload again without training in between -> nothing rewritten.
    res["calls"].append(offload_call(engine, ctl, "unchanged"))
    res["calls"].append(reload_call(engine, ctl, "unchanged"))

    per_state = {}
    for kind in StateKind:
        if not sizes.get(kind.value):
            continue
        os_, rs_ = [], []
        for rep in range(args.cycles if kind is StateKind.optim_states else 1):
            nvme_tier.mark_dirty(engine)  # a real (in-place) rewrite, not a skip
            o = offload_call(engine, ctl, f"only_{kind.value}#{rep}", include=[kind.value])
            r = reload_call(engine, ctl, f"only_{kind.value}#{rep}")
            os_.append(o["s"])
            rs_.append(r["s"])
        o["s"], r["s"] = median(os_), median(rs_)
        tier = (
            "discard"
            if kind is StateKind.contiguous_grad_buffer
            else ("nvme" if kind is StateKind.optim_states else "pinned_cpu")
        )
        per_state[kind.value] = {
            "tier": tier,
            "bytes": sizes[kind.value],
            "offload_s": o["s"],
            "reload_s": r["s"],
            "offload_s_all": os_,
            "reload_s_all": rs_,
            "offload_GBps": gbps(sizes[kind.value], o["s"]) if tier != "discard" else None,
            "reload_GBps": gbps(sizes[kind.value], r["s"]) if tier != "discard" else None,
            "rss_added_GB": o["rss_added_GB"],
        }
    res["per_state"] = per_state
    res["exact_after_per_state"] = check_exact(engine, ref)
    steady_o = [c for c in res["calls"] if c["call"].startswith("steady") and "bytes_to_host" in c]
    steady_r = [c for c in res["calls"] if c["call"].startswith("steady") and "bytes_read_nvme" in c]
    total = sum(v for k, v in sizes.items() if k != "contiguous_grad_buffer")
    res["summary"] = {
        "total_bytes": total,
        "first_offload_s": first["s"],
        "steady_offload_s": median([c["s"] for c in steady_o]),
        "steady_reload_s": median([c["s"] for c in steady_r]),
        "steady_offload_GBps_all_states": gbps(total, median([c["s"] for c in steady_o])),
        "steady_reload_GBps_all_states": gbps(total, median([c["s"] for c in steady_r])),
        "nvme_offload_GBps": per_state["optim_states"]["offload_GBps"],
        "nvme_reload_GBps": per_state["optim_states"]["reload_GBps"],
        "first_call_host_added_GB": first["rss_added_GB"],
        "pinned_bytes": ctl._mover.pinned_bytes,
    }
    out["nvme"] = res


def phase_checksum(args, out: dict, engine, ref, sizes) -> None:
    """NVMe-only (include optim_states) with checksum on/off, alternated; fresh attach each time."""
    import nvme_tier

    rows = []
    for rep in range(args.checksum_reps):
        for checksum in (True, False):
            base = fresh_baseline(engine)
            path = os.path.join(args.path, f"ck{int(checksum)}")
            ctl = nvme_tier.attach(
                engine, offload_cfg(args, path, checksum=checksum, include=["optim_states"])
            )
            nvme_tier.mark_dirty(engine)
            o = offload_call(engine, ctl, f"checksum_{checksum}#{rep}", baseline=base)
            r = reload_call(engine, ctl, f"checksum_{checksum}#{rep}")
            rows.append(
                {
                    "checksum": checksum,
                    "rep": rep,
                    "offload_s": o["s"],
                    "reload_s": r["s"],
                    "offload_GBps": gbps(sizes["optim_states"], o["s"]),
                    "reload_GBps": gbps(sizes["optim_states"], r["s"]),
                    "host_added_GB": o["rss_added_GB"],
                    "staging_pinned_bytes": o["pinned_bytes_after"],
                }
            )
    exact = check_exact(engine, ref)

    def med(ck: bool, key: str) -> float | None:
        return median([r[key] for r in rows if r["checksum"] is ck])

    on_o, off_o, on_r, off_r = (
        med(True, "offload_s"),
        med(False, "offload_s"),
        med(True, "reload_s"),
        med(False, "reload_s"),
    )
    out["checksum"] = {
        "rows": rows,
        "offload_s_on": on_o,
        "offload_s_off": off_o,
        "reload_s_on": on_r,
        "reload_s_off": off_r,
        "offload_cost": rnd(on_o / off_o - 1, 3) if off_o else None,
        "reload_cost": rnd(on_r / off_r - 1, 3) if off_r else None,
        "roundtrip_cost": rnd((on_o + on_r) / (off_o + off_r) - 1, 3) if off_o else None,
        "nvme_only_host_added_GB_max": max(r["host_added_GB"] for r in rows),
        "staging_budget_bytes": args.staging_mb * MiB,
        "exact": exact,
    }


def phase_non_blocking(args, out: dict, engine, ref, sizes) -> None:
    import nvme_tier

    path = os.path.join(args.path, "nb")
    fresh_baseline(engine)  # the previous phase's files are deleted (and discarded) before the clock runs
    os.sync()
    ctl = nvme_tier.attach(engine, offload_cfg(args, path))
    nvme_tier.mark_dirty(engine)
    rows = []
    for rep in range(2):
        nvme_tier.mark_dirty(engine)
        sync_device()
        prof = None
        if rep == 0 and args.profile_non_blocking:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t = time.perf_counter()
        engine.offload_states(non_blocking=True)
        ret = time.perf_counter() - t
        if prof is not None:
            import io
            import pstats

            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
            profile_text = buf.getvalue()
        nvme_tier.wait(engine)
        total = time.perf_counter() - t
        t = time.perf_counter()
        engine.reload_states(non_blocking=True)
        rret = time.perf_counter() - t
        nvme_tier.wait(engine)
        rtotal = time.perf_counter() - t
        rows.append(
            {
                "rep": rep,
                "offload_return_ms": round(ret * 1e3, 2),
                "offload_total_s": rnd(total),
                "reload_return_ms": round(rret * 1e3, 2),
                "reload_total_s": rnd(rtotal),
            }
        )
        print("non_blocking", rows[-1], flush=True)
    if args.profile_non_blocking:
        out["non_blocking_profile_rep0"] = profile_text.splitlines()[:60]
    out["non_blocking"] = {
        "rows": rows,
        "note": "rep 0 is the first offload of a freshly attached controller (backend start, pinned buffers)",
        "offload_return_ms_max": max(r["offload_return_ms"] for r in rows),
        "exact": check_exact(engine, ref),
    }
    _ = ctl


def phase_zarr(args, out: dict, engine, ref, sizes) -> None:
    import nvme_tier

    path = os.path.join(args.path, "zarr")
    ctl = nvme_tier.attach(engine, offload_cfg(args, path, backend="zarr", include=["optim_states"]))
    rows = []
    for rep in range(args.zarr_reps):
        nvme_tier.mark_dirty(engine)
        o = offload_call(engine, ctl, f"zarr#{rep}")
        t = time.perf_counter()
        fsync_tree(path)
        os.sync()
        sync_s = time.perf_counter() - t
        cold = drop_page_cache()
        r = reload_call(engine, ctl, f"zarr#{rep}")
        n = sizes["optim_states"]
        rows.append(
            {
                "offload_s": o["s"],
                "sync_s": rnd(sync_s),
                "reload_s": r["s"],
                "cold_read": cold,
                "write_GBps": gbps(n, o["s"]),
                "write_plus_sync_GBps": gbps(n, o["s"] + sync_s),
                "read_GBps": gbps(n, r["s"]),
                "host_added_GB": o["rss_added_GB"],
            }
        )
    out["zarr"] = {
        "rows": rows,
        "write_GBps": median([r["write_GBps"] for r in rows]),
        "write_plus_sync_GBps": median([r["write_plus_sync_GBps"] for r in rows]),
        "read_GBps": median([r["read_GBps"] for r in rows]),
        "note": "page-cache writes; write_plus_sync adds fsync of every chunk file; reads after drop_caches when cold_read",
        "exact": check_exact(engine, ref),
    }
    nvme_tier.detach(engine)


def phase_torch_save(args, out: dict, engine, ref, sizes) -> None:
    """torch.save of the optimizer-state tensors as a dict, torch.load + copy back into place."""
    from nvme_tier import engine as ds
    from nvme_tier.types import StateKind

    bufs = ds.discover_buffers(engine)[StateKind.optim_states]
    tensors = {b.name: b.view for b in bufs}
    n = sum(b.nbytes for b in bufs)
    path = os.path.join(args.path, "torch_save")
    os.makedirs(path, exist_ok=True)
    f = os.path.join(path, "optim_states.pt")
    gc.collect()
    base = rss()
    with RssSampler(baseline=base) as smp:
        save_s = timed(lambda: torch.save(tensors, f))
    t = time.perf_counter()
    fd = os.open(f, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    fsync_s = time.perf_counter() - t
    cold = drop_page_cache()

    def load() -> None:
        loaded = torch.load(f, map_location="cpu", weights_only=True)
        for name, t_ in loaded.items():
            tensors[name].copy_(t_)

    with RssSampler() as smp2:
        load_s = timed(load)
    gc.collect()
    os.unlink(f)
    out["torch_save"] = {
        "bytes": n,
        "save_s": rnd(save_s),
        "fsync_s": rnd(fsync_s),
        "load_s": rnd(load_s),
        "cold_read": cold,
        "save_GBps": gbps(n, save_s),
        "save_plus_fsync_GBps": gbps(n, save_s + fsync_s),
        "load_GBps": gbps(n, load_s),
        "save_host_added_GB": round(smp.added / GB, 3),
        "load_host_added_GB": round(smp2.added / GB, 3),
        "note": "torch.save of the device tensors (page cache, no fsync); load = torch.load(map_location=cpu) + copy_ into the device tensors",
        "exact": check_exact(engine, ref),
    }


def phase_pinned_cpu(args, out: dict, engine, ref, sizes) -> None:
    """The pinned_cpu tier for every state (device='cpu' policy)."""
    import nvme_tier

    total = sum(v for k, v in sizes.items() if k != "contiguous_grad_buffer")
    res: dict[str, Any] = {"bytes": total, "runs": {}}
    for mode in args.cpu_modes:
        base = fresh_baseline(engine)
        t0 = time.perf_counter()
        ctl = nvme_tier.attach(engine, offload_cfg(args, os.path.join(args.path, "cpu"), device="cpu"))
        attach_s = time.perf_counter() - t0
        trained = 0.0
        if mode == "after_training":
            # The usual pattern: attach at start-up, train, then offload.
            t = time.perf_counter()
            while time.perf_counter() - t < args.train_seconds:
                train_step(engine, args)
            trained = time.perf_counter() - t
            ref = snapshot(engine)
        since_attach = time.perf_counter() - t0
        calls = [offload_call(engine, ctl, "first", baseline=base)]
        calls.append(reload_call(engine, ctl, "first"))
        for i in range(args.cycles):
            calls.append(offload_call(engine, ctl, f"steady{i}"))
            calls.append(reload_call(engine, ctl, f"steady{i}"))
        steady_o = median([c["s"] for c in calls if c["call"].startswith("steady") and "bytes_to_host" in c])
        steady_r = median(
            [c["s"] for c in calls if c["call"].startswith("steady") and "bytes_read_nvme" in c]
        )
        res["runs"][mode] = {
            "attach_s": rnd(attach_s),
            "trained_s_before_first": rnd(trained),
            "first_call_after_attach_s": rnd(since_attach),
            "calls": calls,
            "first_offload_s": calls[0]["s"],
            "steady_offload_s": steady_o,
            "steady_reload_s": steady_r,
            "steady_offload_GBps": gbps(total, steady_o),
            "steady_reload_GBps": gbps(total, steady_r),
            "first_over_steady": rnd(calls[0]["s"] / steady_o, 2) if steady_o else None,
            "host_added_GB_first": calls[0]["rss_added_GB"],
            "pinned_bytes": ctl._mover.pinned_bytes,
            "exact": check_exact(engine, ref),
        }
        nvme_tier.detach(engine)
    out["pinned_cpu"] = res
    return ref


def phase_upstream(args, out: dict, engine, ref, sizes) -> None:
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    import nvme_tier

    nvme_tier.detach(engine)  # DeepSpeed's own offload_states/reload_states again
    total = sum(v for k, v in sizes.items() if k != "contiguous_grad_buffer")
    rows = []
    try:
        for label in ("first", "steady0", "steady1"):
            gc.collect()
            with RssSampler() as smp:
                o = timed(
                    lambda: engine.offload_states(
                        device=OffloadDeviceEnum.cpu, pin_memory=True, non_blocking=False
                    )
                )
            r = timed(lambda: engine.reload_states(non_blocking=False))
            rows.append(
                {
                    "call": label,
                    "offload_s": rnd(o),
                    "reload_s": rnd(r),
                    "offload_GBps": gbps(total, o),
                    "reload_GBps": gbps(total, r),
                    "rss_added_GB": round(smp.added / GB, 3),
                }
            )
            print("upstream", rows[-1], flush=True)
        steady = median([x["offload_s"] for x in rows[1:]])
        out["upstream_cpu"] = {
            "rows": rows,
            "first_over_steady": rnd(rows[0]["offload_s"] / steady, 2) if steady else None,
            "exact": check_exact(engine, ref),
        }
    except Exception as exc:  # upstream may refuse (e.g. CPU accelerator)
        out["upstream_cpu"] = {"rows": rows, "error": f"{type(exc).__name__}: {exc}"}


# -- goals, plot ------------------------------------------------------------------------------------
def goals(out: dict, args) -> dict:
    g: dict[str, Any] = {}

    def add(name: str, value, target, ok: bool | None, note: str = "") -> None:
        g[name] = {"value": value, "target": target, "met": ok, "note": note}

    lim = out.get("limits", {})
    raw = lim.get("raw_aio") or {}
    nv = (out.get("nvme") or {}).get("summary") or {}
    if raw and nv:
        limit = max(raw["write_GBps"], raw.get("write_in_place_GBps") or 0)
        w = rnd(nv["nvme_offload_GBps"] / limit, 3)
        r = rnd(nv["nvme_reload_GBps"] / raw["read_GBps"], 3)
        add(
            "nvme_offload_vs_raw_aio_write",
            w,
            ">= 0.90",
            w >= 0.9,
            f"steady (in-place rewrite) offload of optim_states vs the faster raw write ({limit} GB/s: "
            f"new file {raw['write_GBps']}, in place {raw.get('write_in_place_GBps')})",
        )
        add("nvme_reload_vs_raw_aio_read", r, ">= 0.90", r >= 0.9)
        f = (out.get("nvme") or {}).get("calls", [{}])[0]
        if f.get("nvme_GBps"):
            x = rnd(f["nvme_GBps"] / raw["write_GBps"], 3)
            add(
                "nvme_first_offload_vs_raw_aio_write_new_file",
                x,
                "(info)",
                None,
                "first call: new files, pinned_cpu copies and waiting for pre-allocation in the same call",
            )
    ck = out.get("checksum") or {}
    nvo = out.get("nvme") or {}
    if ck:
        budget = ck["staging_budget_bytes"]
        added = ck["nvme_only_host_added_GB_max"] * GB
        add(
            "nvme_only_host_added_vs_staging_budget",
            rnd(added / budget, 3),
            "<= 1.1",
            added <= 1.1 * budget,
            "fresh attach, include=[optim_states]: RSS peak during the first offload minus RSS before attach",
        )
    if nvo:
        budget = args.staging_mb * MiB
        added = nvo["calls"][0]["rss_added_GB"] * GB
        pinned = nvo["pinned_cpu_bytes"]
        add(
            "default_policy_host_added_vs_budget_plus_pinned_cpu",
            rnd(added / (1.1 * budget + pinned), 3),
            "<= 1.0 (added <= 1.1 x staging budget + pinned_cpu state bytes)",
            added <= 1.1 * budget + pinned,
            f"added {added / GB:.3f} GB, pinned_cpu states {pinned / GB:.3f} GB, budget {budget / GB:.3f} GB",
        )
    pc = (out.get("pinned_cpu") or {}).get("runs") or {}
    pcie = lim.get("pcie_pinned")
    for mode, run in pc.items():
        if pcie:
            ratio = rnd(run["steady_offload_GBps"] / pcie["d2h_GBps"], 3)
            add(f"pinned_cpu_steady_offload_vs_pcie_d2h[{mode}]", ratio, ">= 0.9", ratio >= 0.9)
            ratio = rnd(run["steady_reload_GBps"] / pcie["h2d_GBps"], 3)
            add(f"pinned_cpu_steady_reload_vs_pcie_h2d[{mode}]", ratio, ">= 0.9", ratio >= 0.9)
        add(
            f"pinned_cpu_first_over_steady[{mode}]",
            run["first_over_steady"],
            "<= 2",
            run["first_over_steady"] <= 2,
            f"first call {run['first_call_after_attach_s']} s after attach",
        )
    z = out.get("zarr")
    if z and raw:
        wz = rnd(z["write_plus_sync_GBps"] / raw["write_GBps"], 3)
        rz = rnd(z["read_GBps"] / raw["read_GBps"], 3)
        add("zarr_write_plus_sync_vs_raw_aio_write", wz, ">= 0.5", wz >= 0.5)
        add(
            "zarr_read_vs_raw_aio_read",
            rz,
            ">= 0.5",
            rz >= 0.5,
            "cold" if z["rows"][0]["cold_read"] else "page cache not dropped",
        )
    ts = out.get("torch_save")
    if ts and nv:
        x = rnd(nv["nvme_offload_GBps"] / ts["save_GBps"], 3)
        add("nvme_offload_vs_torch_save", x, ">= 2.5", x >= 2.5, "torch.save without fsync (page cache)")
        x = rnd(nv["nvme_offload_GBps"] / ts["save_plus_fsync_GBps"], 3)
        add("nvme_offload_vs_torch_save_plus_fsync", x, ">= 2.5", x >= 2.5)
        x = rnd(nv["nvme_reload_GBps"] / ts["load_GBps"], 3)
        add("nvme_reload_vs_torch_load", x, "(info)", None)
    if ck:
        c = ck["roundtrip_cost"]
        add(
            "checksum_cost_roundtrip",
            c,
            "<= 0.10",
            c is not None and c <= 0.10,
            f"offload {ck['offload_cost']}, reload {ck['reload_cost']}",
        )
    nb = out.get("non_blocking")
    if nb:
        m = nb["offload_return_ms_max"]
        add("non_blocking_offload_return_ms", m, "< 50", m < 50)
    nv_full = out.get("nvme") or {}
    checks = [nv_full.get(k) for k in ("exact_after_first", "exact_after_steady", "exact_after_per_state")]
    checks += [(out.get(k) or {}).get("exact") for k in ("checksum", "non_blocking", "zarr", "torch_save")]
    checks += [r["exact"] for r in pc.values()]
    checks = [c for c in checks if c]
    add(
        "bit_exact_after_every_reload",
        all(c["exact"] for c in checks),
        "true",
        all(c["exact"] for c in checks),
        f"{len(checks)} checks of every state buffer (torch.equal against device snapshots): nvme_tier paths, "
        "zarr and torch.save",
    )
    up = (out.get("upstream_cpu") or {}).get("exact")
    if up:
        add("upstream_bit_exact_after_reload", up["exact"], "(info)", None, f"mismatched: {up['mismatched']}")
    return g


def plot(out: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim, nv = out.get("limits", {}), (out.get("nvme") or {}).get("summary", {})
    bars: list[tuple[str, float | None, float | None, str]] = []  # label, write/offload, read/reload, group
    raw = lim.get("raw_aio") or {}
    bars.append(("raw aio\nnew file", raw.get("write_GBps"), raw.get("read_GBps"), "disk"))
    if raw.get("write_in_place_GBps"):
        bars.append(("raw aio\nin place (limit)", raw.get("write_in_place_GBps"), None, "disk"))
    bars.append(("nvme_tier\nNVMe (aio)", nv.get("nvme_offload_GBps"), nv.get("nvme_reload_GBps"), "disk"))
    z = out.get("zarr") or {}
    bars.append(("nvme_tier\nzarr (+sync)", z.get("write_plus_sync_GBps"), z.get("read_GBps"), "disk"))
    ts = out.get("torch_save") or {}
    bars.append(("torch.save\n/load", ts.get("save_GBps"), ts.get("load_GBps"), "disk"))
    pcie = lim.get("pcie_pinned") or {}
    bars.append(("pinned PCIe\n(limit)", pcie.get("d2h_GBps"), pcie.get("h2d_GBps"), "host"))
    for i, (mode, run) in enumerate(((out.get("pinned_cpu") or {}).get("runs") or {}).items()):
        if i == 0:
            bars.append(("pinned_cpu\nsteady", run["steady_offload_GBps"], run["steady_reload_GBps"], "host"))
        first = gbps(out["pinned_cpu"]["bytes"], run["first_offload_s"])
        bars.append((f"pinned_cpu first\n{mode.replace('_', ' ')}", first, None, "host"))
    up = (out.get("upstream_cpu") or {}).get("rows") or []
    if up:
        bars.append(("upstream cpu\nsteady", up[-1]["offload_GBps"], up[-1]["reload_GBps"], "host"))
        bars.append(("upstream cpu\nfirst", up[0]["offload_GBps"], up[0]["reload_GBps"], "host"))
    fig, ax = plt.subplots(figsize=(14, 5))
    xs = range(len(bars))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [b[1] or 0 for b in bars], w, label="offload / write", color="#3b75af")
    ax.bar([x + w / 2 for x in xs], [b[2] or 0 for b in bars], w, label="reload / read", color="#ef8636")
    for x, b in zip(xs, bars, strict=False):
        for dx, v in ((-w / 2, b[1]), (w / 2, b[2])):
            if v:
                ax.text(x + dx, v * 1.05, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([b[0] for b in bars], fontsize=8)
    ax.set_ylabel("GB/s (log)")
    m = out.get("machine", {})
    ax.set_title(
        f"offload_gpu: {out.get('model', {}).get('params_B')} B params ZeRO-3 bf16 on {m.get('gpu', 'CPU')}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# -- main -------------------------------------------------------------------------------------------
PHASES = (
    "limits",
    "disk",
    "probe",
    "nvme",
    "checksum",
    "non_blocking",
    "zarr",
    "torch_save",
    "pinned_cpu",
    "upstream",
)
DEFAULT_PHASES = tuple(p for p in PHASES if p not in ("disk", "probe"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params-b", type=float, default=1.6, help="model size, billions of parameters")
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--bucket", type=int, default=int(5e8), help="ZeRO reduce_bucket_size (elements)")
    p.add_argument(
        "--optimizer",
        choices=("torch", "fused"),
        default="fused",
        help="Adam implementation (upstream offload_states needs FusedAdam)",
    )
    p.add_argument("--path", required=True, help="directory on the disk under test")
    p.add_argument("--backend", default="aio")
    p.add_argument("--staging-mb", type=int, default=512)
    p.add_argument("--raw-gb", type=float, default=4.0, help="bytes of the raw aio / PCIe limit tests")
    p.add_argument("--raw-reps", type=int, default=2)
    p.add_argument("--cycles", type=int, default=2, help="steady offload/reload cycles per measurement")
    p.add_argument("--checksum-reps", type=int, default=2)
    p.add_argument("--zarr-reps", type=int, default=1)
    p.add_argument("--cpu-modes", nargs="+", default=["right_after_attach", "after_training"])
    p.add_argument(
        "--train-seconds",
        type=float,
        default=5.0,
        help="training before the first pinned_cpu call (after_training)",
    )
    p.add_argument("--probe-gb", type=float, default=8.0)
    p.add_argument(
        "--sweep",
        type=lambda s: [tuple(map(int, x.split("x"))) for x in s.split(",")],
        default=[(16, 4), (64, 4), (128, 4)],
        help="chunk_MiBxslots,... compared by the disk phase",
    )
    p.add_argument(
        "--disk-variants",
        nargs="+",
        default=["fresh", "inplace"],
        choices=["fresh", "inplace", "inplace_torch_pinned"],
    )
    p.add_argument("--profile-non-blocking", action="store_true", help="cProfile the first non-blocking call")
    p.add_argument("--phases", nargs="+", default=list(DEFAULT_PHASES), choices=PHASES)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    os.makedirs(args.path, exist_ok=True)
    dist_env()
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    out: dict[str, Any] = {
        "command": "python "
        + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(args.path),
        "args": {k: v for k, v in vars(args).items()},
        "phase_seconds": {},
    }

    def save() -> None:
        if args.json:
            out["goals"] = goals(out, args)
            tmp = args.json + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(out, fh, indent=1, default=str)
            os.replace(tmp, args.json)

    def run(name: str, fn: Callable, *a):
        if name not in args.phases:
            return None
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        r = fn(args, out, *a)
        out["phase_seconds"][name] = round(time.perf_counter() - t, 1)
        save()
        return r

    run("probe", phase_probe)
    run("limits", phase_limits)
    run("disk", phase_disk)
    if any(ph in args.phases for ph in PHASES[3:]):
        t = time.perf_counter()
        engine = build_engine(args)
        init_s = time.perf_counter() - t
        t = time.perf_counter()
        train_step(engine, args)
        step_s = time.perf_counter() - t
        sizes = state_sizes(engine)
        params = sum(p.ds_numel for p in engine.module.parameters())
        out["model"] = {
            "params_B": round(params / 1e9, 3),
            "hidden": args.hidden,
            "init_s": round(init_s, 1),
            "first_step_s": round(step_s, 2),
            "state_bytes": sizes,
            "state_GB_total": round(sum(sizes.values()) / GB, 2),
            "device_allocated_GB": round(torch.cuda.memory_allocated() / GB, 2) if CUDA else None,
            "optimizer": "torch.optim.Adam (DeepSpeed torch_adam)"
            if args.optimizer == "torch"
            else "FusedAdam",
        }
        print("model", out["model"], flush=True)
        ref = snapshot(engine)
        run("nvme", phase_nvme, engine, ref, sizes)
        run("checksum", phase_checksum, engine, ref, sizes)
        run("non_blocking", phase_non_blocking, engine, ref, sizes)
        run("zarr", phase_zarr, engine, ref, sizes)
        run("torch_save", phase_torch_save, engine, ref, sizes)
        new_ref = run("pinned_cpu", phase_pinned_cpu, engine, ref, sizes)
        run("upstream", phase_upstream, engine, new_ref if new_ref is not None else ref, sizes)
    out["goals"] = goals(out, args)
    save()
    if args.plot:
        plot(out, args.plot)
    print("\n== goals")
    for k, v in out["goals"].items():
        print(
            f"{'OK ' if v['met'] else ('-- ' if v['met'] is None else 'NO ')} {k}: {v['value']} (target {v['target']}) {v['note']}"
        )
    return out


if __name__ == "__main__":
    main()
