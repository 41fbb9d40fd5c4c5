"""skip_unchanged must never hand back stale bytes, whatever wrote the states in between.

Each test offloads and reloads (the files stay on disk for skip_unchanged), edits the states through
one write path that bypasses backward/step/load_checkpoint, offloads and reloads again, and checks
that every reloaded state holds the edited bytes. The policy puts every data state on nvme, so
weight edits reach files that skip_unchanged could wrongly keep.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import deepspeed
import pytest
import torch
from helpers import make_engine, snapshot, train

import nvme_tier
import nvme_tier.tiers as tiers_module
from nvme_tier.deepspeed.locators import discover_buffers
from nvme_tier.fingerprint import fingerprint

ALL_ON_NVME = {"optim_states": "nvme", "hp_params": "nvme", "lp_params": "nvme", "lp_grads": "nvme"}


def weights(engine) -> list[torch.Tensor]:
    """The tensors that hold the weights between steps (ZeRO-3: each rank's partition)."""
    params = list(engine.module.parameters())
    return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in params]


def edit_gathered(engine) -> None:
    """How a reference model is synced from the actor on ZeRO-3: gather, write on rank 0, re-partition."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
        for i, p in enumerate(params):
            p.data.copy_(torch.full_like(p.data, 0.25 * (i + 1)))


def edit_ema(engine) -> None:
    with torch.no_grad():
        for w in weights(engine):
            w.mul_(0.5).add_(torch.ones_like(w), alpha=0.5)


def edit_copy(engine) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for w in weights(engine):
            w.copy_(torch.randn(w.shape, generator=g).to(w.dtype))


def edit_load_state_dict(engine) -> None:
    """Load other weights into the module (ZeRO-3: under GatheredParameters, as checkpoint code does)."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        source = {k: torch.randn_like(v) for k, v in engine.module.state_dict().items()}
        engine.module.load_state_dict(source)


def edit_optimizer_load_state_dict(engine) -> None:
    """Roll the optimizer back to a state_dict taken one step earlier (stashed by the test)."""
    engine.optimizer.load_state_dict(
        state_dict_list=[engine.earlier_optimizer_state],
        load_optimizer_states=True,
        load_from_fp32_weights=True,
    )


WEIGHT_EDITS: dict[str, Callable] = {
    "gathered_modifier_rank0": edit_gathered,
    "ema_in_place": edit_ema,
    "data_copy": edit_copy,
    "module_load_state_dict": edit_load_state_dict,
}
# ZeRO-0 bf16 runs without an optimizer only (with one, DeepSpeed 0.19 picks FP16_Optimizer, which
# nvme_tier does not support); ZeRO-1/2 require one.
CASES = [(stage, True, name) for stage in (1, 2, 3) for name in [*WEIGHT_EDITS, "optimizer_load_state_dict"]]
CASES += [(stage, False, name) for stage in (0, 3) for name in WEIGHT_EDITS]


def cloned(obj):
    """A deep copy of a state_dict whose tensors need not be graph leaves (ZeRO-1/2's are not)."""
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: cloned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cloned(v) for v in obj)
    return copy.deepcopy(obj)


def data_states(snap: dict) -> dict:
    return {k: v for k, v in snap.items() if not k.startswith("contiguous_grad_buffer")}


@pytest.mark.parametrize(("stage", "with_optimizer", "path"), CASES)
def test_edit_outside_training_is_written_back(stage, with_optimizer, path, offload_dir):
    engine = make_engine(
        stage, offload_dir, optimizer="Adam" if with_optimizer else None, backend="zarr", policy=ALL_ON_NVME
    )
    nvme_tier.attach(engine)
    if with_optimizer:
        train(engine, 1)
        engine.earlier_optimizer_state = cloned(engine.optimizer.state_dict())
        train(engine, 1, seed=2)
    engine.offload_states()
    engine.reload_states()  # the files stay on disk (skip_unchanged)
    before = data_states(snapshot(engine))
    (WEIGHT_EDITS.get(path) or edit_optimizer_load_state_dict)(engine)
    edited = data_states(snapshot(engine))
    changed = [k for k, v in edited.items() if not torch.equal(v, before[k])]
    assert changed, f"{path} changed no state: the test would prove nothing"
    engine.offload_states()
    assert (
        nvme_tier.offload_status(engine)["lp_params" if not with_optimizer else "optim_states"].tier == "nvme"
    )
    engine.reload_states()
    after = data_states(snapshot(engine))
    stale = [k for k, v in edited.items() if not torch.equal(v, after[k])]
    assert not stale, f"reloaded the old bytes of {stale} after {path}"
    engine.offload_states()  # nothing changed since: only now may everything be skipped
    assert nvme_tier.controller_of(engine).last_stats["offload"].bytes_written == 0
    engine.reload_states()
    assert all(torch.equal(v, edited[k]) for k, v in data_states(snapshot(engine)).items())


def test_manifest_keeps_the_fingerprint_of_the_written_bytes(offload_dir):
    engine = make_engine(3, offload_dir, optimizer=None, backend="zarr", policy={"lp_params": "nvme"})
    controller = nvme_tier.attach(engine)
    engine.offload_states()
    engine.reload_states()
    backend = controller._mover.backend
    on_disk = backend.directory.load_manifest()
    live = {b.name: b.view for bufs in discover_buffers(engine).values() for b in bufs}
    assert on_disk and set(on_disk) <= set(live)
    for name, record in on_disk.items():
        assert record.fingerprint == fingerprint(live[name])


@pytest.mark.parametrize("non_blocking", [False, True])
def test_edit_between_non_blocking_cycles_is_written_back(non_blocking, offload_dir):
    """The fingerprint is taken on the worker thread of a non-blocking offload too."""
    engine = make_engine(2, offload_dir, backend="zarr", policy=ALL_ON_NVME)
    nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states(non_blocking=non_blocking)
    engine.reload_states(non_blocking=non_blocking)
    nvme_tier.wait(engine)
    edit_ema(engine)
    edited = data_states(snapshot(engine))
    engine.offload_states(non_blocking=non_blocking)
    engine.reload_states(non_blocking=non_blocking)
    nvme_tier.wait(engine)
    after = data_states(snapshot(engine))
    assert all(torch.equal(v, after[k]) for k, v in edited.items())


def test_no_fingerprint_means_no_skip(offload_dir, monkeypatch):
    """Out of device memory for the fingerprint's temporaries: every state is written, never skipped."""
    engine = make_engine(3, offload_dir, optimizer=None, backend="zarr", policy={"lp_params": "nvme"})
    controller = nvme_tier.attach(engine)
    engine.offload_states()
    engine.reload_states()

    def out_of_memory(tensors, chunk_bytes=None):
        raise torch.cuda.OutOfMemoryError("injected")

    monkeypatch.setattr(tiers_module, "fingerprints", out_of_memory)
    edit_copy(engine)
    edited = data_states(snapshot(engine))
    engine.offload_states()
    stats = controller.last_stats["offload"]
    assert stats.bytes_skipped == 0 and stats.bytes_written > 0
    engine.reload_states()
    assert all(torch.equal(v, edited[k]) for k, v in data_states(snapshot(engine)).items())
    assert all(r.fingerprint is None for r in controller._mover.backend.directory.load_manifest().values())
    engine.offload_states()  # still no fingerprint: written again, not trusted
    assert controller.last_stats["offload"].bytes_skipped == 0
    engine.reload_states()


def test_skip_unchanged_off_takes_no_fingerprint(offload_dir, monkeypatch):
    engine = make_engine(
        3, offload_dir, optimizer=None, backend="zarr", policy={"lp_params": "nvme"}, skip_unchanged=False
    )
    nvme_tier.attach(engine)
    monkeypatch.setattr(tiers_module, "fingerprints", lambda *a, **k: pytest.fail("fingerprinted"))
    engine.offload_states()
    engine.reload_states()
