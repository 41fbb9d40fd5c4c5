"""Host first, disk for the rest (issue 24), on real engines: a host budget of half the states fills
the host to the budget and writes only the rest to disk; reload is bit-exact, training goes on like
a never-offloaded twin; faults and Ctrl-C in a split offload leave every byte where it was.
"""

from __future__ import annotations

import pytest
import torch
from faults import assert_resident, data_entries, install
from helpers import (
    SCRATCH,
    assert_same_states,
    budget_of_its_own,
    make_engine,
    params_of,
    requires_aio,
    snapshot,
    train,
)

import nvme_tier
from nvme_tier.deepspeed.locators import buffers_present
from nvme_tier.errors import ConfigError, TierIOError
from nvme_tier.policy import SPLIT_ALIGN
from nvme_tier.units import MiB

STAGING_MB = 2
WIDTH = 2048  # ~4.2 M parameters: states of tens of MiB, so one SPLIT_ALIGN per state is a small error
BACKENDS = ["zarr", pytest.param("aio", marks=[requires_aio, pytest.mark.aio])]


@pytest.fixture
def fresh_budget():
    """A process budget and staging pool of this test only (engines of other tests do not count)."""
    with budget_of_its_own() as pair:
        yield pair


def by_tier(engine, tier: str) -> int:
    return sum(e.bytes_by_tier.get(tier, 0) for e in nvme_tier.offload_status(engine).values())


def half_budget_engine(path, backend: str, made: list, **offload):
    """A trained engine attached with a host budget of half its data states (plus staging)."""
    kwargs = {"stage": 3, "path": path, "width": WIDTH, "backend": backend, "staging_budget_mb": STAGING_MB}
    engine = make_engine(**kwargs)
    made.append(engine)
    losses = train(engine, 2, seed=1)
    wanted = sum(n for kind, n in buffers_present(engine).items() if kind.value != SCRATCH)
    host_mb = STAGING_MB + wanted // 2 // MiB
    block = {"path": str(path), "backend": backend, "staging_budget_mb": STAGING_MB, "progress": False}
    controller = nvme_tier.attach(engine, {**block, "host_budget_mb": host_mb, **offload})
    return engine, controller, kwargs, losses, wanted, (host_mb - STAGING_MB) * MiB


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", ["auto", "cpu", "nvme"])
def test_half_budget_host_holds_the_budget_and_disk_the_rest(device, backend, offload_dir, fresh_budget):
    _budget, made = fresh_budget
    engine, controller, kwargs, losses, wanted, host_room = half_budget_engine(
        offload_dir, backend, made, device=device
    )
    before = snapshot(engine)
    engine.offload_states()
    status = nvme_tier.offload_status(engine)
    assert controller.last_stats["offload"].bytes_to_host == by_tier(engine, "pinned_cpu")
    host, disk = by_tier(engine, "pinned_cpu"), by_tier(engine, "nvme")
    states = sum(1 for e in status.values() if e.state != SCRATCH)
    if device == "nvme":  # optim_states go to disk by policy; the rest fits the host
        assert host <= host_room and disk == wanted - host
    else:
        assert host_room - states * SPLIT_ALIGN < host <= host_room, (host, host_room)
        assert disk == wanted - host  # only the bytes over the budget are written
        split = [e for e in status.values() if len(e.bytes_by_tier) > 1]
        assert split and all(e.spilled and e.tier == "nvme" for e in split), status
        assert all(sum(e.bytes_by_tier.values()) == e.bytes for e in status.values())
    assert controller.last_stats["offload"].bytes_written == disk
    table = nvme_tier.format_status(engine)
    assert "host budget" in table and "pinned_cpu" in table
    engine.reload_states()
    assert_same_states(before, snapshot(engine))
    assert controller.last_stats["reload"].bytes_read == disk

    # skip_unchanged: an unchanged state's NVMe part is not written again
    engine.offload_states()
    assert controller.last_stats["offload"].bytes_written == 0
    assert controller.last_stats["offload"].bytes_skipped == disk
    engine.reload_states()
    assert_same_states(before, snapshot(engine))
    losses += train(engine, 2, seed=2)
    engine.offload_states()  # changed by the steps: written again
    assert controller.last_stats["offload"].bytes_written == disk
    engine.reload_states()
    losses += train(engine, 1, seed=3)

    twin = make_engine(**{**kwargs, "path": None})
    twin_losses = train(twin, 2, seed=1) + train(twin, 2, seed=2) + train(twin, 1, seed=3)
    assert losses == twin_losses
    for a, b in zip(params_of(engine), params_of(twin), strict=True):
        assert torch.equal(a, b)


def test_nvme_ratio_puts_that_share_of_the_state_on_disk(offload_dir, fresh_budget):
    _budget, made = fresh_budget
    engine = make_engine(3, offload_dir, width=WIDTH, backend="zarr", nvme_ratio={"optim_states": 0.5})
    made.append(engine)
    nvme_tier.attach(engine)
    train(engine, 2)
    before = snapshot(engine)
    engine.offload_states()
    optim = nvme_tier.offload_status(engine)["optim_states"]
    assert (
        optim.bytes_by_tier["nvme"] >= optim.bytes // 2 > optim.bytes_by_tier["pinned_cpu"] - 2 * SPLIT_ALIGN
    )
    assert not optim.spilled and optim.tier == "nvme"  # split: its reload needs the disk
    engine.reload_states()
    assert_same_states(before, snapshot(engine))


def test_auto_without_path_is_refused_at_attach(fresh_budget):
    engine = make_engine(1, None, device="auto")
    with pytest.raises(ConfigError, match=r"offload_states\.path"):
        nvme_tier.attach(engine)


def test_auto_budget_defaults_to_half_the_available_memory(offload_dir, fresh_budget, monkeypatch):
    budget, made = fresh_budget
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    engine = make_engine(1, offload_dir, device="auto", backend="zarr")
    made.append(engine)
    controller = nvme_tier.attach(engine)
    assert budget.limit is not None and 0 < budget.limit <= controller.host_limit
    table = nvme_tier.format_status(engine)
    assert "host budget" in table and "auto" in table and "2 local ranks" in table, table


# NVMe writes of the half-budget engine: optim_states.0, optim_states.1, then the split lp_grads'
# disk part (its host part is copied meanwhile, and freed at return when non-blocking).
@pytest.mark.parametrize("fail_at", [1, 3])
@pytest.mark.parametrize("non_blocking", [False, True])
def test_failed_split_write_leaves_every_byte_where_it_was(non_blocking, fail_at, offload_dir, fresh_budget):
    _budget, made = fresh_budget
    engine, controller, kwargs, *_ = half_budget_engine(offload_dir, "zarr", made, device="auto")
    before = snapshot(engine)
    injector = install(controller, fail_at=fail_at)
    with pytest.raises(TierIOError):
        engine.offload_states(non_blocking=non_blocking)
        nvme_tier.wait(engine)
    assert data_entries(offload_dir) == []
    assert_resident(engine, before, scratch=not non_blocking)
    injector.remove()
    engine.offload_states()
    engine.reload_states()
    assert_same_states(before, snapshot(engine))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_fault_in_a_host_part_copy_while_its_disk_part_is_written(exc, offload_dir, fresh_budget):
    _budget, made = fresh_budget
    engine, controller, *_ = half_budget_engine(offload_dir, "zarr", made, device="auto")
    before = snapshot(engine)
    injector = install(controller, copy_fail_at=3, copy_exc=exc)  # hp, lp, then lp_grads' host part
    with pytest.raises(exc, match="injected fault"):
        engine.offload_states()
    assert data_entries(offload_dir) == []
    assert_resident(engine, before)
    injector.remove()


def test_ctrl_c_while_freeing_a_split_state_loses_nothing(offload_dir, fresh_budget, monkeypatch):
    """The interrupt is held through the frees: the split state ends offloaded and comes back whole."""
    from nvme_tier.buffers import StateBuffer

    _budget, made = fresh_budget
    engine, _controller, *_ = half_budget_engine(offload_dir, "zarr", made, device="auto")
    before = snapshot(engine)
    real, calls = StateBuffer.free, {"n": 0}

    def free(self) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(self)

    with monkeypatch.context() as patch:
        patch.setattr(StateBuffer, "free", free)
        with pytest.raises(KeyboardInterrupt):
            engine.offload_states()
    status = nvme_tier.offload_status(engine)
    assert any(len(e.bytes_by_tier) > 1 for e in status.values()), status
    engine.reload_states()
    assert_same_states(before, snapshot(engine))


def test_a_split_point_that_moves_rewrites_the_disk_part(offload_dir, fresh_budget):
    """Another engine takes host room between cycles: the cut moves, the disk part is rewritten whole."""
    budget, made = fresh_budget
    engine, controller, *_ = half_budget_engine(offload_dir, "zarr", made, device="auto")
    before = snapshot(engine)
    engine.offload_states()
    first = by_tier(engine, "nvme")
    entries = data_entries(offload_dir)
    engine.reload_states()
    assert budget.reserve(3 * MiB)  # as if another engine's host copies held 3 MiB
    engine.offload_states()
    assert by_tier(engine, "nvme") == first + 3 * MiB
    assert controller.last_stats["offload"].bytes_written > 0
    engine.reload_states()
    assert_same_states(before, snapshot(engine))
    budget.release(3 * MiB)
    assert len(data_entries(offload_dir)) == len(entries)  # the same files, none left over
