"""Device memory released when a non-blocking offload returns, per tier (issue 13, part 3).

For each placement (every state on pinned_cpu, on cpu, on nvme, and the default nvme policy) one
ZeRO-3 engine trains a step, then ``engine.offload_states(non_blocking=True)`` is timed and the
device memory it freed is read right at its return (``torch.cuda.memory_allocated`` before/after on
CUDA; on any accelerator also the bytes of state storages already freed), then after ``wait``.
Upstream DeepSpeed's own non-blocking ``offload_states`` (no nvme_tier) is measured alike on CUDA.
Expected: host tiers free everything at return; NVMe frees each buffer as its write completes, so
at return only what needs no write (scratch, unchanged files) is freed.

    python benchmarks/nonblocking_release.py --path /local_nvme --out benchmarks/results/nonblocking_release_h100.json
    python benchmarks/nonblocking_release.py --params-b 0.002 --hidden 256 --out /tmp/nbr.json   # CPU, tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch
from measure import linear_stack_engine, machine_info, set_launch_env, train_step

from nvme_tier.types import StateKind

DATA_STATES = [s.value for s in StateKind if s.holds_data]
PLACEMENTS = {
    "pinned_cpu": {"device": "cpu"},
    "cpu": {"device": "cpu", "pin_memory": False},
    "nvme": {"policy": dict.fromkeys(DATA_STATES, "nvme")},
    "nvme_default_policy": {},
}


def sync() -> None:
    from nvme_tier.deepspeed.accelerator import synchronize

    synchronize()


def allocated() -> int | None:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


def state_storages(engine) -> list:
    from nvme_tier.deepspeed.locators import discover_buffers, quiesce

    quiesce(engine)
    return [b for bufs in discover_buffers(engine).values() for b in bufs]


def measure(engine, offload, wait, reload, hidden: int, status=None) -> dict:
    """Time one non-blocking offload's return; device memory freed at return and after ``wait``."""
    train_step(engine, hidden)
    buffers = state_storages(engine)
    state_bytes = sum(b.nbytes for b in buffers)
    if status is None:  # upstream re-points .data: views held here would keep its old storages alive
        buffers = []
    sync()
    before = allocated()
    t0 = time.perf_counter()
    offload()
    returned = time.perf_counter() - t0
    at_return = allocated()
    freed_storages = sum(b.nbytes for b in buffers if b.is_freed)
    snapshot = status() if status is not None else None
    wait()
    done = time.perf_counter() - t0
    sync()
    after_wait = allocated()
    out = {
        "state_bytes": state_bytes,
        "return_ms": round(returned * 1e3, 3),
        "complete_s": round(done, 3),
    }
    if buffers:
        out["state_storage_bytes_freed_at_return"] = freed_storages
    if before is not None:
        out["memory_allocated_freed_at_return"] = before - at_return
        out["memory_allocated_freed_after_wait"] = before - after_wait
    if snapshot is not None:
        out["status_at_return"] = {
            k: {"tier": e.tier, "phase": e.phase, "bytes_in_flight": e.bytes_in_flight}
            for k, e in snapshot.items()
            if e.bytes
        }
    t0 = time.perf_counter()
    reload()
    sync()
    out["reload_s"] = round(time.perf_counter() - t0, 3)
    train_step(engine, hidden)  # it trains on
    return out


def run_nvme_tier(engine, name: str, args) -> dict:
    import nvme_tier

    cfg = {"progress": False, "path": args.path, "backend": args.backend, **PLACEMENTS[name]}
    nvme_tier.attach(engine, cfg)
    rows = []
    for _ in range(args.repeats):
        rows.append(
            measure(
                engine,
                lambda: engine.offload_states(non_blocking=True),
                lambda: nvme_tier.wait(engine),
                engine.reload_states,
                args.hidden,
                status=lambda: nvme_tier.offload_status(engine),
            )
        )
    nvme_tier.detach(engine)
    return {"config": cfg, "runs": rows}


def run_upstream(engine, args) -> dict:
    """DeepSpeed's own non-blocking offload (device=cpu, pinned), as its tests and OpenRLHF call it."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    rows = []
    try:
        for _ in range(args.repeats):
            rows.append(
                measure(
                    engine,
                    lambda: engine.offload_states(
                        device=OffloadDeviceEnum.cpu, pin_memory=True, non_blocking=True
                    ),
                    sync,
                    engine.reload_states,
                    args.hidden,
                )
            )
    except Exception as exc:  # ZeRO-3 upstream needs FusedAdam (CUDA); report why, go on
        return {"error": f"{type(exc).__name__}: {exc}", "runs": rows}
    return {"runs": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--params-b", type=float, default=0.1, help="model size, billions (14 B/param of state)"
    )
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument(
        "--repeats", type=int, default=2, help="offloads per placement (the 1st allocates host copies)"
    )
    parser.add_argument("--path", default=None, help="directory on the NVMe drive (default: a temp dir)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--placements", default=",".join(PLACEMENTS), help="comma-separated subset")
    parser.add_argument("--out", default=None, help="JSON file to write (e.g. benchmarks/results/...)")
    args = parser.parse_args(argv)
    set_launch_env()
    tmp = None
    if args.path is None:
        tmp = tempfile.TemporaryDirectory(prefix="ntier-nbr-", dir="/var/tmp")
        args.path = tmp.name
    engine = linear_stack_engine(args.params_b * 1e9, args.hidden)
    result: dict = {
        "machine": machine_info(args.path),
        "args": vars(args),
        "params": sum(p.ds_numel for p in engine.module.parameters()),
        "nvme_tier": {},
    }
    for name in args.placements.split(","):
        result["nvme_tier"][name] = run_nvme_tier(engine, name, args)
        gc.collect()
    result["upstream_cpu_pinned"] = run_upstream(engine, args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
