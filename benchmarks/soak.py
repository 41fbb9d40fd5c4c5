"""Soak: hundreds of train/offload/reload cycles on a tiny real engine, watching for leaks.

Every cycle trains one step (so every state changes and is rewritten), offloads (optimizer
states to NVMe, the rest to pinned host memory) and reloads. A control run of as many cycles
without training (``mark_dirty`` forces the rewrites) isolates nvme_tier's own footprint. Sampled every cycle: open file
descriptors, threads, RSS, nvme_tier's pinned/staging host bytes, files and bytes on disk. A leak
shows as growth between the end of warm-up and the end of the run. At the end the run is compared
with a never-offloaded twin (same batches, run afterwards): losses and weights must be identical.

    python benchmarks/soak.py --cycles 300 --json benchmarks/results/soak_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch
from measure import PROC, ROOT, machine_info, pinned_bytes, rss, set_launch_env, write_json

sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tests' engine and training helpers (helpers.py)

WARMUP = 5  # cycles before the baseline: first-use allocations (handles, staging, caches)


@dataclass
class Series:
    """One metric over the run: value at start, after warm-up, at the end, and its maximum."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    def summary(self, warmup: int) -> dict:
        base = self.values[min(warmup, len(self.values) - 1)]
        return {
            "start": self.values[0],
            "after_warmup": base,
            "end": self.values[-1],
            "max": max(self.values),
            "growth_after_warmup": self.values[-1] - base,
            "max_growth_after_warmup": max(self.values[warmup:] or [base]) - base,
        }


def disk_usage(path: str) -> tuple[int, int]:
    """(files, allocated bytes) under ``path``, like ``du``."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            files += 1
            size += st.st_blocks * 512
    return files, size


# zarr's event loop runs blocking I/O on asyncio's default executor, whose threads start lazily
# (one more only when all are busy) up to this cap: bounded growth, not a leak.
POOL_PREFIX = "asyncio_"
POOL_CAP = min(32, (os.cpu_count() or 1) + 4)


def sample(controller, path: str) -> dict[str, float]:
    gc.collect()
    files, size = disk_usage(path)
    pool = sum(t.name.startswith(POOL_PREFIX) for t in threading.enumerate())
    threads = PROC.num_threads()
    return {
        "fds": PROC.num_fds(),
        "threads": threads,
        "pool_threads": pool,
        "other_threads": threads - pool,
        "rss_mb": rss() / 2**20,
        "pinned_bytes": pinned_bytes(controller),
        "disk_files": files,
        "disk_bytes": size,
    }


def soak(
    engine, cycles: int, path: str, warmup: int = WARMUP, seed: int = 1, train_steps: int = 1
) -> tuple[dict, list[float]]:
    """Run ``cycles`` train/offload/reload cycles; returns (per-metric summaries, losses).

    ``train_steps=0`` is the control that isolates nvme_tier: no training, ``mark_dirty`` forces
    every offload to rewrite the states all the same.
    """
    from helpers import train

    import nvme_tier

    controller = nvme_tier.controller_of(engine)
    series: dict[str, Series] = {}
    losses: list[float] = []
    start = time.perf_counter()
    for cycle in range(cycles + 1):
        if cycle:
            if train_steps:
                losses += train(engine, train_steps, seed=seed + cycle)
            else:
                nvme_tier.mark_dirty(engine)
            engine.offload_states()
            if controller.last_stats["offload"].bytes_written == 0:
                raise RuntimeError(f"cycle {cycle}: nothing was rewritten; the soak would test nothing")
            engine.reload_states()
        for name, value in sample(controller, path).items():
            series.setdefault(name, Series()).add(value)
    elapsed = time.perf_counter() - start
    summary = {name: s.summary(warmup) for name, s in series.items()}
    step = max(1, cycles // 20)
    summary["rss_mb_trace"] = {c: round(series["rss_mb"].values[c], 2) for c in range(0, cycles + 1, step)}
    summary["seconds_per_cycle"] = elapsed / max(cycles, 1)
    summary["cycles"] = cycles
    return summary, losses


def twin_losses(engine_kwargs: dict, cycles: int, seed: int = 1) -> tuple[list[float], list[torch.Tensor]]:
    from helpers import make_engine, params_of, train

    twin = make_engine(**{**engine_kwargs, "path": None})
    losses: list[float] = []
    for cycle in range(1, cycles + 1):
        losses += train(twin, 1, seed=seed + cycle)
    return losses, params_of(twin)


def run_backend(backend: str, cycles: int, base: str) -> dict:
    from helpers import make_engine, params_of

    import nvme_tier

    path = tempfile.mkdtemp(prefix=f"soak-{backend}-", dir=base)
    kwargs = {"stage": 3, "path": path, "backend": backend, "width": 256}
    engine = make_engine(**kwargs)
    nvme_tier.attach(engine)
    summary, losses = soak(engine, cycles, path)
    weights = params_of(engine)
    control, _ = soak(engine, cycles, path, train_steps=0)
    summary["offload_only"] = {
        k: control[k]
        for k in ("fds", "other_threads", "pinned_bytes", "disk_bytes", "rss_mb", "rss_mb_trace")
    }
    summary["offload_only"]["seconds_per_cycle"] = control["seconds_per_cycle"]
    status = {k: v.as_dict() for k, v in nvme_tier.offload_status(engine).items()}
    nvme_tier.detach(engine)
    left = disk_usage(path)
    if left[0] == 0:
        os.rmdir(path)
    twin, twin_weights = twin_losses(kwargs, cycles)
    summary["twin_identical"] = losses == twin and all(
        torch.equal(a, b) for a, b in zip(weights, twin_weights, strict=True)
    )
    summary["files_after_detach"] = left[0]
    summary["state_bytes"] = {k: v["bytes"] for k, v in status.items()}
    return summary


def leak_verdict(summary: dict) -> dict[str, bool]:
    """Flat means: no fd/thread/pinned/disk growth after warm-up (a lazily started, capped executor
    pool excepted), RSS within allocator noise."""
    return {
        "fds_flat": summary["fds"]["max_growth_after_warmup"] <= 0,
        "threads_flat": summary["other_threads"]["max_growth_after_warmup"] <= 0
        and summary["pool_threads"]["max"] <= POOL_CAP,
        "pinned_flat": summary["pinned_bytes"]["max_growth_after_warmup"] <= 0,
        "disk_flat": summary["disk_bytes"]["max_growth_after_warmup"] <= 0
        and summary["disk_files"]["max_growth_after_warmup"] <= 0,
        "rss_flat": summary["rss_mb"]["growth_after_warmup"] < 32,
        # Without training (DeepSpeed's own step creeps by a few KiB), nvme_tier alone stays flat.
        "offload_only_rss_flat": "offload_only" not in summary
        or summary["offload_only"]["rss_mb"]["growth_after_warmup"] < 1,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--backends", default="zarr,aio")
    parser.add_argument("--path", default=None, help="directory for the NVMe files (default: a temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    set_launch_env()
    from nvme_tier.deepspeed.ops import aio_compatible

    base = args.path or tempfile.mkdtemp(prefix="nvme-tier-soak-")
    os.makedirs(base, exist_ok=True)
    results: dict = {
        "benchmark": "soak",
        "machine": machine_info(base),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "warmup_cycles": WARMUP,
        "pool_thread_cap": POOL_CAP,
        "model": "TinyNet(width=256), ZeRO-3, bf16, Adam; default nvme policy",
        "backends": {},
    }
    ok, why = aio_compatible()
    for backend in [b for b in args.backends.split(",") if b]:
        if backend == "aio" and not ok:
            results["backends"][backend] = {"skipped": why}
            continue
        summary = run_backend(backend, args.cycles, base)
        summary["verdict"] = leak_verdict(summary)
        results["backends"][backend] = summary
        v = summary["verdict"]
        print(
            f"{backend}: {args.cycles} cycles, {summary['seconds_per_cycle'] * 1e3:.1f} ms/cycle; "
            f"fds {summary['fds']['start']}->{summary['fds']['end']} (max {summary['fds']['max']}), "
            f"rss {summary['rss_mb']['after_warmup']:.0f}->{summary['rss_mb']['end']:.0f} MiB, "
            f"disk {summary['disk_bytes']['after_warmup']}->{summary['disk_bytes']['end']} B, "
            f"pinned {summary['pinned_bytes']['end']} B, twin identical: {summary['twin_identical']}, "
            f"flat: {all(v.values())} {v}"
        )
    if args.json:
        write_json(args.json, results)
    ok_all = all(
        all(r["verdict"].values()) and r["twin_identical"] and r["files_after_detach"] == 0
        for r in results["backends"].values()
        if "verdict" in r
    )
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
