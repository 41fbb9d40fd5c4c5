"""The measuring tools every benchmark shares: clocks, host memory, the machine, tables, JSON.

The package holds one copy of each (``nvme_tier.bench.common``: ``RssSampler``/``rss``,
``machine_info``, ``timed``/``sync_device``/``drop_page_cache``; ``nvme_tier.tables.format_rows``;
``nvme_tier.demo.set_launch_env``, the single-process torch.distributed rendezvous); this module
re-exports them beside the scripts' own numbers, ``fsync_tree`` and ``write_json``.
GB = 1e9 bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from collections.abc import Sequence
from typing import Any

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:  # a script in benchmarks/ imports the nvme_tier of this checkout
    sys.path.insert(0, ROOT)

# One copy of these, in the package (nvme-tier bench uses them too); re-exported for the scripts.
from nvme_tier.bench.common import (  # noqa: E402, F401  (after the path is set; re-exports)
    GB,
    PROC,
    RssSampler,
    drop_page_cache,
    machine_info,
    rss,
    sync_caller_stream,
    sync_device,
    timed,
)
from nvme_tier.demo import set_launch_env  # noqa: E402, F401
from nvme_tier.tables import format_rows  # noqa: E402, F401
from nvme_tier.units import MiB  # noqa: E402, F401


# -- numbers ---------------------------------------------------------------------------------------
def gbps(nbytes: float, seconds: float | None) -> float | None:
    """GB/s, 3 decimals; None when there is no time to divide by."""
    return round(nbytes / seconds / GB, 3) if seconds else None


def rnd(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(x, n)


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


# -- clocks and caches -----------------------------------------------------------------------------
def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` (what a page-cache writer owes before its data is on disk)."""
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def raw_aio_bandwidth(path: str, nbytes: int, rounds: int = 2) -> dict[str, Any] | None:
    """The disk's own speed under ``path``: DeepSpeed's aio op writing, then reading, one page-locked
    buffer of ``nbytes`` in one request (O_DIRECT, default aio settings), best of ``rounds``.
    None where the op does not load (no libaio)."""
    import torch

    from nvme_tier.bench.swap_methods import RawAio

    nbytes = max(64 * MiB, nbytes // (64 * MiB) * (64 * MiB))  # O_DIRECT split over the op's threads

    class Inputs:  # what the method takes from a runner: the same bytes out and back
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        dst = src
        staging = 0

    Inputs.nbytes = nbytes
    workdir = os.path.join(path, "raw_aio_probe")
    os.makedirs(workdir, exist_ok=True)
    method = RawAio(Inputs, workdir)
    try:
        method.setup()
    except Exception as exc:  # no libaio / the op does not build: no disk bound, said why
        print(f"raw aio bandwidth not measured: {exc}", flush=True)
        return None
    writes, reads = [], []
    try:
        for _ in range(rounds):
            method.prepare_write()
            writes.append(timed(method.write))
            method.prepare_read()
            reads.append(timed(method.read))
        if not method.result_ok():
            raise RuntimeError("the raw aio probe read back other bytes than it wrote")
    finally:
        method.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"nbytes": nbytes, "write_Bps": nbytes / min(writes), "read_Bps": nbytes / min(reads)}


# -- engines ---------------------------------------------------------------------------------------
def linear_stack_engine(params: float, hidden: int):
    """A ZeRO-3 bf16 engine of square Linears (about ``params`` parameters) with Adam, untrained."""
    import deepspeed
    import torch

    layers = max(1, round(params / (hidden * hidden)))
    model = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden, bias=False) for _ in range(layers)])
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 1 << 24},
        "bf16": {"enabled": True},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-4}},
    }
    engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
    return engine


def train_step(engine, hidden: int) -> None:
    """One step on random input: the optimizer states exist from here on."""
    import torch

    x = torch.randn(4, hidden, device=engine.device, dtype=torch.bfloat16)
    engine.backward(engine(x).float().pow(2).mean())
    engine.step()


# -- reporting -------------------------------------------------------------------------------------
def pinned_bytes(controller) -> int:
    """Page-locked host bytes behind ``controller``: its engine's pinned copies and the process's
    staging pool (shared by every engine of the process)."""
    return controller._mover.host.pinned_bytes + controller.runtime.staging.allocated_bytes


def write_json(path: str, data: Any) -> None:
    """Write ``data`` to ``path`` atomically (a cut-off run keeps the previous complete file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
        fh.write("\n")
    os.replace(tmp, path)
