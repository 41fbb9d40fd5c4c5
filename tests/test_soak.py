"""Soak: ~30 train/offload/reload cycles on a tiny engine; fds, threads, pinned/host bytes, RSS and
disk usage stay flat after warm-up, every cycle rewrites the states, and the run ends bit-identical
to a never-offloaded twin. The long version (hundreds of cycles, JSON figures) is
benchmarks/soak.py."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from helpers import make_engine, params_of, requires_aio

import nvme_tier

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from soak import disk_usage, leak_verdict, soak, twin_losses  # noqa: E402

CYCLES = 30


@pytest.mark.parametrize(
    "backend", ["zarr", pytest.param("aio", marks=[requires_aio, pytest.mark.aio, pytest.mark.slow])]
)
def test_soak_resources_stay_flat(backend, offload_dir):
    kwargs = {"stage": 3, "path": offload_dir, "backend": backend}
    engine = make_engine(**kwargs)
    nvme_tier.attach(engine)
    summary, losses = soak(engine, CYCLES, str(offload_dir))
    verdict = leak_verdict(summary)
    failed = [k for k, ok in verdict.items() if not ok]
    assert not failed, {
        k: summary[k]
        for k in (
            "fds",
            "other_threads",
            "pool_threads",
            "pinned_bytes",
            "disk_bytes",
            "disk_files",
            "rss_mb",
        )
    }
    assert summary["disk_bytes"]["end"] > 0  # the states really were on disk
    weights = params_of(engine)
    # Control: no training (DeepSpeed's step creeps a little on its own); nvme_tier alone is flat.
    control, _ = soak(engine, CYCLES, str(offload_dir), train_steps=0)
    assert control["rss_mb"]["growth_after_warmup"] < 2, control["rss_mb"]
    assert (
        control["fds"]["max_growth_after_warmup"] <= 0
        and control["pinned_bytes"]["max_growth_after_warmup"] <= 0
    )
    nvme_tier.detach(engine)
    assert disk_usage(str(offload_dir)) == (0, 0)
    twin, twin_weights = twin_losses(kwargs, CYCLES)
    assert losses == twin
    assert all(torch.equal(a, b) for a, b in zip(weights, twin_weights, strict=True))
