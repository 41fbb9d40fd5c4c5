"""What upstream offload_states does not do: ZeRO-Offload (CPU Adam) engines, engines without an
optimizer, skipping unchanged states, and non-blocking offload/prefetching reload."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyNet, ds_config, make_engine, optimizer_states_freed, params_of, snapshot, train

import nvme_tier


def stats(engine, what: str):
    return nvme_tier.controller_of(engine).last_stats[what]


@pytest.mark.parametrize("stage", [2, 3])
def test_cpu_adam_engine_states_go_to_nvme(stage, offload_dir):
    import deepspeed

    def build(path):
        torch.manual_seed(0)
        model = TinyNet()
        cfg = ds_config(stage, path, backend="zarr")
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
        return engine

    engine = build(offload_dir)
    assert "CPUAdam" in type(engine.optimizer.optimizer).__name__
    nvme_tier.attach(engine)
    losses = train(engine, 2)
    before = snapshot(engine)
    engine.offload_states()
    status = nvme_tier.offload_status(engine)
    assert status["optim_states"].tier == "nvme" and status["optim_states"].bytes > 0
    assert optimizer_states_freed(engine)
    engine.reload_states()
    moved = stats(engine, "reload")
    assert moved.bytes_read == status["optim_states"].bytes
    assert moved.bytes_from_host == sum(e.bytes for e in status.values() if e.tier in ("cpu", "pinned_cpu"))
    after = snapshot(engine)
    assert all(torch.equal(v, after[k]) for k, v in before.items() if not k.startswith("contiguous"))
    losses += train(engine, 2, seed=2)
    weights = params_of(engine)
    twin = build(None)
    assert losses == train(twin, 2) + train(twin, 2, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(weights, params_of(twin), strict=True))


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("tier", ["nvme", "pinned_cpu"])
def test_engine_without_optimizer(stage, tier, offload_dir):
    """Reference/reward models: params go to the tier by policy and come back with identical outputs."""
    engine = make_engine(stage, offload_dir, optimizer=None, backend="zarr", policy={"lp_params": tier})
    nvme_tier.attach(engine)
    x = torch.randn(4, 16).to(engine.device, torch.bfloat16)
    with torch.no_grad():
        expected = engine(x).clone()
    engine.offload_states()
    status = nvme_tier.offload_status(engine)
    assert status["lp_params"].tier == tier and status["lp_params"].bytes > 0
    with pytest.raises(nvme_tier.StatesOffloadedError):
        engine(x)
    engine.reload_states()
    with torch.no_grad():
        assert torch.equal(engine(x), expected)


def test_second_offload_without_training_writes_nothing(offload_dir):
    engine = make_engine(3, offload_dir, backend="zarr")
    nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states()
    first = stats(engine, "offload")
    assert first.bytes_written > 0 and first.bytes_skipped == 0
    engine.reload_states()
    engine.offload_states()  # nothing changed in between
    second = stats(engine, "offload")
    assert second.bytes_written == 0 and second.bytes_skipped == first.bytes_written
    engine.reload_states()
    train(engine, 1)  # now the state changed: it must be rewritten
    engine.offload_states()
    third = stats(engine, "offload")
    assert third.bytes_written == first.bytes_written and third.bytes_skipped == 0
    engine.reload_states()


def test_frozen_reference_model_is_written_once(offload_dir):
    engine = make_engine(3, offload_dir, optimizer=None, backend="zarr", policy={"lp_params": "nvme"})
    nvme_tier.attach(engine)
    x = torch.randn(2, 16).to(engine.device, torch.bfloat16)
    for cycle in range(3):
        with torch.no_grad():
            engine(x)
        engine.offload_states()
        written = stats(engine, "offload").bytes_written
        assert (written > 0) if cycle == 0 else (written == 0)
        engine.reload_states()


def test_mark_dirty_forces_rewrite(offload_dir):
    engine = make_engine(2, offload_dir, backend="zarr")
    nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states()
    engine.reload_states()
    nvme_tier.mark_dirty(engine)
    engine.offload_states()
    assert stats(engine, "offload").bytes_written > 0
    engine.reload_states()


def test_skip_unchanged_off_deletes_files_on_reload(offload_dir):
    engine = make_engine(2, offload_dir, backend="zarr", skip_unchanged=False)
    nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states()
    engine.reload_states()
    assert nvme_tier.controller_of(engine)._mover.backend.names() == []
    engine.offload_states()
    assert stats(engine, "offload").bytes_written > 0
    engine.reload_states()


@pytest.mark.parametrize("stage", [2, 3])
def test_non_blocking_offload_and_prefetch(stage, offload_dir):
    engine = make_engine(stage, offload_dir, backend="zarr")
    nvme_tier.attach(engine)
    losses = train(engine, 2)
    engine.offload_states(non_blocking=True)
    with pytest.raises(nvme_tier.StatesOffloadedError):
        train(engine, 1)  # in flight or done: either way no compute on leaving states
    nvme_tier.wait(engine)
    assert nvme_tier.offload_status(engine)["optim_states"].tier == "nvme"
    engine.reload_states(non_blocking=True)
    losses += train(engine, 2, seed=2)  # the first forward waits for the prefetch
    engine.offload_states(non_blocking=True)
    engine.reload_states(non_blocking=True)  # waits for the offload, then prefetches
    losses += train(engine, 1, seed=3)
    twin = make_engine(stage, None)
    assert losses == train(twin, 2) + train(twin, 2, seed=2) + train(twin, 1, seed=3)
