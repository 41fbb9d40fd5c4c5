"""offload_gpu's engine: the ZeRO-3 bf16 model it measures, its state snapshots and bit-exactness
check, the offload_states block, and one timed offload/reload call with its figures.

``OffloadRun`` is what every phase gets (benchmarks/offload_gpu.py registers the phases).
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from measure import GB, MiB, RssSampler, gbps, pinned_bytes, rnd, rss, sync_device, timed

from nvme_tier.snapshot import copy_states, state_buffers

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda") if CUDA else torch.device("cpu")


@dataclass
class OffloadRun:
    """What the phases share: the arguments and, for the engine phases, one engine and its reference."""

    args: argparse.Namespace
    engine: Any = None
    ref: dict[str, torch.Tensor] = field(default_factory=dict)  # device snapshot every reload must equal
    sizes: dict[str, int] = field(default_factory=dict)  # state bytes by StateKind value


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


def start_engine(run: OffloadRun) -> dict[str, Any]:
    """Build the engine, train one step, take the reference snapshot; returns the "model" entry."""
    args = run.args
    t = time.perf_counter()
    run.engine = build_engine(args)
    init_s = time.perf_counter() - t
    t = time.perf_counter()
    train_step(run.engine, args)
    step_s = time.perf_counter() - t
    run.sizes = state_sizes(run.engine)
    run.ref = copy_states(run.engine)
    params = sum(p.ds_numel for p in run.engine.module.parameters())
    return {
        "params_B": round(params / 1e9, 3),
        "hidden": args.hidden,
        "init_s": round(init_s, 1),
        "first_step_s": round(step_s, 2),
        "state_bytes": run.sizes,
        "state_GB_total": round(sum(run.sizes.values()) / GB, 2),
        "device_allocated_GB": round(torch.cuda.memory_allocated() / GB, 2) if CUDA else None,
        "optimizer": "torch.optim.Adam (DeepSpeed torch_adam)" if args.optimizer == "torch" else "FusedAdam",
    }


def state_sizes(engine) -> dict[str, int]:
    from nvme_tier.deepspeed import locators as ds

    return {k.value: v for k, v in ds.buffers_present(engine).items()}


def check_exact(engine, ref: dict[str, torch.Tensor]) -> dict:
    """torch.equal of every state buffer against its snapshot, plus crc32c of a sample of each."""
    from nvme_tier.storage.base import crc32c

    now = state_buffers(engine)
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


def offload_call(engine, ctl, label: str, baseline: int | None = None, **kw) -> dict:
    """One timed offload_states call with RSS sampling; returns its figures."""
    before_dev = torch.cuda.memory_allocated() if CUDA else 0
    sampler = RssSampler(baseline=baseline, extra=lambda: pinned_bytes(ctl))
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
        "pinned_bytes_after": pinned_bytes(ctl),
        "pinned_bytes_peak": max(sampler.extra_peak, pinned_bytes(ctl)),
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
