"""Figures for what upstream cannot do: skipping unchanged states and non-blocking overlap.

1. A frozen model (no optimizer, e.g. an RLHF reference model) with its params on NVMe: the
   first offload writes them, the second (no training in between) must write ~0 bytes.
2. Engine A offloads to NVMe with non_blocking=True while engine B trains: how much of A's
   I/O hides behind B's compute.

    python benchmarks/beyond_upstream.py --params-b 1.0 --path /local_nvme --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from measure import machine_info, set_launch_env, write_json


def stack(params: float, hidden: int) -> torch.nn.Module:
    layers = max(1, round(params / (hidden * hidden)))
    return torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden, bias=False) for _ in range(layers)])


def engine_for(model: torch.nn.Module, path: str, backend: str, optimizer: bool, stage: int):
    import deepspeed

    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 1 << 22},
        "bf16": {"enabled": True},
        "offload_states": {
            "path": path,
            "backend": backend,
            "progress": False,
            "policy": {"lp_params": "nvme"},
        },
    }
    if optimizer:
        cfg["optimizer"] = {"type": "Adam", "params": {"lr": 1e-4}}
        engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
    else:
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
    return engine


def frozen_model(args) -> dict:
    import nvme_tier

    engine = engine_for(
        stack(args.params_b * 1e9, args.hidden), args.path, args.backend, optimizer=False, stage=3
    )
    nvme_tier.attach(engine)
    ctl = nvme_tier.controller_of(engine)
    out = {"params": sum(p.ds_numel for p in engine.module.parameters())}
    for cycle in ("first", "second", "third"):
        t = time.perf_counter()
        engine.offload_states()
        dt = time.perf_counter() - t
        s = ctl.last_stats["offload"]
        out[f"{cycle}_offload"] = {
            "s": round(dt, 3),
            "bytes_written": s.bytes_written,
            "bytes_skipped": s.bytes_skipped,
        }
        t = time.perf_counter()
        engine.reload_states()
        out[f"{cycle}_reload_s"] = round(time.perf_counter() - t, 3)
    nvme_tier.release(engine)
    return out


def overlap(args) -> dict:
    import nvme_tier

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    size = args.overlap_params_b * 1e9
    a = engine_for(stack(size, args.hidden), args.path, args.backend, optimizer=True, stage=3)
    b = engine_for(stack(size, args.hidden), args.path, args.backend, optimizer=True, stage=3)
    nvme_tier.attach(a)
    x = torch.randn(args.batch, args.hidden, device=dev, dtype=torch.bfloat16)

    def steps(engine, n):
        for _ in range(n):
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    steps(a, 1)
    steps(b, 1)
    t = time.perf_counter()
    steps(b, args.steps)
    b_alone = time.perf_counter() - t

    a.offload_states()  # warm-up: backend, directory, staging pool
    a.reload_states()
    nvme_tier.mark_dirty(a)
    t = time.perf_counter()
    a.offload_states()
    a_alone = time.perf_counter() - t
    a.reload_states()
    nvme_tier.mark_dirty(a)

    t = time.perf_counter()
    a.offload_states(non_blocking=True)
    returned = time.perf_counter() - t
    steps(b, args.steps)
    nvme_tier.wait(a)
    both = time.perf_counter() - t
    a.reload_states()
    return {
        "offload_alone_s": round(a_alone, 3),
        "train_alone_s": round(b_alone, 3),
        "both_s": round(both, 3),
        "non_blocking_return_ms": round(returned * 1e3, 2),
        "hidden_fraction": round(min(1.0, max(0.0, (a_alone + b_alone - both) / min(a_alone, b_alone))), 3),
        "bytes_offloaded": nvme_tier.controller_of(a).last_stats["offload"].bytes_written,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params-b", type=float, default=1.0, help="frozen model size, billions of params")
    parser.add_argument("--overlap-params-b", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--path", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    set_launch_env()
    tmp = None
    if args.path is None:
        tmp = tempfile.TemporaryDirectory(prefix="ntier-bench-", dir="/var/tmp")
        args.path = tmp.name
    result = {
        "machine": machine_info(args.path),
        "args": vars(args),
        "frozen_model": frozen_model(args),
        "overlap": overlap(args),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
