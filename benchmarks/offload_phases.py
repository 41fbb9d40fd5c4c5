"""offload_gpu's phases on the engine: nvme_tier's nvme and pinned_cpu tiers, checksum on/off,
non-blocking offload, the zarr backend, naive torch.save/load, and DeepSpeed's own offload_states.
Each returns the JSON entries it measured; every reload is checked bit for bit against the run's
reference snapshot."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import torch
from measure import (
    GB,
    MiB,
    RssSampler,
    drop_page_cache,
    fsync_tree,
    gbps,
    median,
    pinned_bytes,
    rnd,
    rss,
    sync_device,
    timed,
)
from offload_engine import (
    OffloadRun,
    check_exact,
    fresh_baseline,
    offload_call,
    offload_cfg,
    reload_call,
    train_step,
)

from nvme_tier.snapshot import copy_states


def phase_nvme(run: OffloadRun) -> dict[str, Any]:
    """The default nvme policy: first call, steady cycles, skip-unchanged, each state alone."""
    import nvme_tier
    from nvme_tier.types import StateKind

    args, engine, ref, sizes = run.args, run.engine, run.ref, run.sizes
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
        # what the first offload may add to host RSS: 1.1 x the staging budget + the pinned_cpu copies
        "host_allowance_bytes": int(1.1 * args.staging_mb * MiB) + pinned_policy,
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
        "pinned_bytes": pinned_bytes(ctl),
    }
    return {"nvme": res}


def phase_checksum(run: OffloadRun) -> dict[str, Any]:
    """NVMe-only (include optim_states) with checksum on/off, alternated; fresh attach each time."""
    import nvme_tier

    args, engine, ref, sizes = run.args, run.engine, run.ref, run.sizes
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
    return {
        "checksum": {
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
    }


def phase_non_blocking(run: OffloadRun) -> dict[str, Any]:
    """How long offload_states(non_blocking=True) takes to return, and the whole offload."""
    import nvme_tier

    args, engine, ref = run.args, run.engine, run.ref
    path = os.path.join(args.path, "nb")
    fresh_baseline(engine)  # the previous phase's files are deleted (and discarded) before the clock runs
    os.sync()
    nvme_tier.attach(engine, offload_cfg(args, path))
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
    found: dict[str, Any] = {}
    if args.profile_non_blocking:
        found["non_blocking_profile_rep0"] = profile_text.splitlines()[:60]
    found["non_blocking"] = {
        "rows": rows,
        "note": "rep 0 is the first offload of a freshly attached controller (backend start, pinned buffers)",
        "offload_return_ms_max": max(r["offload_return_ms"] for r in rows),
        "exact": check_exact(engine, ref),
    }
    return found


def phase_zarr(run: OffloadRun) -> dict[str, Any]:
    """The zarr backend on optim_states: write, write + fsync, cold read."""
    import nvme_tier

    args, engine, ref, sizes = run.args, run.engine, run.ref, run.sizes
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
    found = {
        "zarr": {
            "rows": rows,
            "write_GBps": median([r["write_GBps"] for r in rows]),
            "write_plus_sync_GBps": median([r["write_plus_sync_GBps"] for r in rows]),
            "read_GBps": median([r["read_GBps"] for r in rows]),
            "note": "page-cache writes; write_plus_sync adds fsync of every chunk file; reads after drop_caches when cold_read",
            "exact": check_exact(engine, ref),
        }
    }
    nvme_tier.detach(engine)
    return found


def phase_torch_save(run: OffloadRun) -> dict[str, Any]:
    """torch.save of the optimizer-state tensors as a dict, torch.load + copy back into place."""
    from nvme_tier.deepspeed import locators as ds
    from nvme_tier.types import StateKind

    args, engine, ref = run.args, run.engine, run.ref
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
    return {
        "torch_save": {
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
    }


def phase_pinned_cpu(run: OffloadRun) -> dict[str, Any]:
    """The pinned_cpu tier for every state (device='cpu' policy). After training, the new states
    become the run's reference."""
    import nvme_tier

    args, engine, sizes = run.args, run.engine, run.sizes
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
            run.ref = copy_states(engine)
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
            "pinned_bytes": pinned_bytes(ctl),
            "exact": check_exact(engine, run.ref),
        }
        nvme_tier.detach(engine)
    return {"pinned_cpu": res}


def phase_upstream(run: OffloadRun) -> dict[str, Any]:
    """DeepSpeed's own offload_states(device=cpu, pin_memory=True) after nvme_tier.detach."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    import nvme_tier

    engine, ref, sizes = run.engine, run.ref, run.sizes
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
        return {
            "upstream_cpu": {
                "rows": rows,
                "first_over_steady": rnd(rows[0]["offload_s"] / steady, 2) if steady else None,
                "exact": check_exact(engine, ref),
            }
        }
    except Exception as exc:  # upstream may refuse (e.g. CPU accelerator)
        return {"upstream_cpu": {"rows": rows, "error": f"{type(exc).__name__}: {exc}"}}
