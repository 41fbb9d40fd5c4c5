"""Attach, detach and recovery: nothing half-done, hooks never stacked, errors that say what to do.

``detach()`` while offloaded is refused before anything changes; re-attaching with another config
replaces the old controller cleanly; after a failed reload every refusal names the way out
(restore from a checkpoint with ``engine.load_checkpoint``, which is allowed then, and ``release``).
"""

from __future__ import annotations

import os

import pytest
from faults import assert_resident, writer_dirs
from helpers import make_engine, optimizer_states_freed, params_of, snapshot, train
from test_corruption import ZARR_CHUNK, flip

import nvme_tier
from nvme_tier.deepspeed.hooks import GUARDED_METHODS
from nvme_tier.errors import IntegrityError, StatesOffloadedError
from nvme_tier.types import OffloadPhase


def forward_pre_hooks(engine) -> tuple[int, int]:
    return len(engine.module._forward_pre_hooks), len(engine._forward_pre_hooks)


def assert_hooked_once(engine, unhooked: tuple[int, int]) -> None:
    """Every guarded method is one wrapper around DeepSpeed's own bound method; one forward guard each."""
    assert forward_pre_hooks(engine) == (unhooked[0] + 1, unhooked[1] + 1)
    cls = type(engine)
    for name in (n for n in GUARDED_METHODS if hasattr(cls, n)):
        wrapper = engine.__dict__[name]
        inner = wrapper.__wrapped__
        assert getattr(inner, "__func__", None) is getattr(cls, name), f"{name} wrapped more than once"
    # offload_states: one wrapper (it re-links DeepSpeed's accessors' guards) around the controller's
    assert engine.offload_states.__wrapped__.__self__ is nvme_tier.controller_of(engine)
    assert engine.reload_states.__self__ is nvme_tier.controller_of(engine)


def assert_unhooked(engine, unhooked: tuple[int, int]) -> None:
    """DeepSpeed's originals, reached through the class again, and DeepSpeed's own forward hooks only."""
    cls = type(engine)
    for name in (n for n in (*GUARDED_METHODS, "offload_states", "reload_states") if hasattr(cls, n)):
        assert name not in engine.__dict__, name
        assert getattr(engine, name).__func__ is getattr(cls, name)
    assert forward_pre_hooks(engine) == unhooked


def test_detach_while_offloaded_changes_nothing(offload_dir):
    engine = make_engine(2, offload_dir, backend="zarr")
    unhooked = forward_pre_hooks(engine)
    controller = nvme_tier.attach(engine)
    train(engine, 1)
    before = snapshot(engine)
    engine.offload_states()
    with pytest.raises(StatesOffloadedError, match=r"reload_states\(\) first, then .*detach"):
        nvme_tier.detach(engine)
    assert nvme_tier.controller_of(engine) is controller  # still attached
    assert nvme_tier.offload_status(engine)["optim_states"].tier == "nvme"
    assert_hooked_once(engine, unhooked)
    with pytest.raises(StatesOffloadedError):  # still guarded
        train(engine, 1)
    with pytest.raises(StatesOffloadedError):  # a different config cannot replace it either
        nvme_tier.attach(
            engine, {"path": str(offload_dir), "backend": "zarr", "progress": False, "checksum": False}
        )
    assert nvme_tier.controller_of(engine) is controller
    assert_hooked_once(engine, unhooked)
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    nvme_tier.detach(engine)
    assert_unhooked(engine, unhooked)
    assert writer_dirs(offload_dir) == []
    nvme_tier.detach(engine)  # detaching twice is a no-op
    train(engine, 1)


def test_reattach_never_stacks_hooks(offload_dir):
    engine = make_engine(2, offload_dir, backend="zarr")
    unhooked = forward_pre_hooks(engine)
    first = nvme_tier.attach(engine)
    assert_hooked_once(engine, unhooked)
    train(engine, 1)
    engine.offload_states()
    with pytest.raises(StatesOffloadedError):
        nvme_tier.detach(engine)
    engine.reload_states()
    second = nvme_tier.attach(
        engine, {"path": str(offload_dir), "backend": "zarr", "progress": False, "checksum": False}
    )
    assert second is not first
    assert_hooked_once(engine, unhooked)
    assert nvme_tier.controller_of(engine) is second
    assert len(writer_dirs(offload_dir)) <= 1  # the first controller's files went with it
    nvme_tier.detach(engine)
    assert_unhooked(engine, unhooked)
    third = nvme_tier.attach(engine)
    assert_hooked_once(engine, unhooked)
    train(engine, 1)
    engine.offload_states()
    engine.reload_states()
    nvme_tier.detach(engine)
    assert_unhooked(engine, unhooked)
    assert third is not second


# -- after a failed reload --------------------------------------------------------------------------
WAY_OUT = ("unusable", "load_checkpoint", "nvme_tier.release(engine)")


def assert_says_what_to_do(err: BaseException) -> None:
    message = str(err)
    for needle in WAY_OUT:
        assert needle in message, message
    assert "IntegrityError" in message and ZARR_CHUNK.split("/")[0] in message, message
    assert "reload_states() first" not in message, message


def test_failed_reload_errors_say_what_to_do_and_load_checkpoint_recovers(offload_dir, tmp_path):
    kwargs = {"stage": 2, "path": offload_dir, "backend": "zarr"}
    engine = make_engine(**kwargs)
    nvme_tier.attach(engine)
    losses = train(engine, 2)
    ckpt = str(tmp_path / "ckpt")
    engine.save_checkpoint(ckpt, tag="t")
    losses += train(engine, 1, seed=2)  # moves on past the checkpoint, then the disk copy goes bad
    engine.offload_states()
    (writer,) = writer_dirs(offload_dir)
    flip(os.path.join(writer, ZARR_CHUNK))
    with pytest.raises(IntegrityError):
        engine.reload_states()
    controller = nvme_tier.controller_of(engine)
    assert controller.phase is OffloadPhase.failed

    for call in (
        lambda: train(engine, 1),
        lambda: engine.step(),
        lambda: engine.save_checkpoint(ckpt, tag="bad"),
        engine.offload_states,
        lambda: nvme_tier.release(engine),
        lambda: nvme_tier.detach(engine),
    ):
        with pytest.raises(StatesOffloadedError) as err:
            call()
        assert_says_what_to_do(err.value)
    assert optimizer_states_freed(engine)
    assert nvme_tier.controller_of(engine) is controller
    assert not os.path.exists(os.path.join(ckpt, "bad"))

    # The way out: load the checkpoint (allowed now), release the unusable files, train on.
    load_path, _ = engine.load_checkpoint(ckpt, tag="t")
    assert load_path is not None
    assert controller.phase is OffloadPhase.resident
    assert all(e.tier == "device" for e in nvme_tier.offload_status(engine).values())
    nvme_tier.release(engine)
    assert writer_dirs(offload_dir) == []
    # (No offload here: on the CPU accelerator load_checkpoint leaves optimizer states in the
    # checkpoint file's non-resizable storages, which nvme_tier refuses to free in place.)
    resumed = train(engine, 2, seed=3) + train(engine, 1, seed=4)
    weights = params_of(engine)
    nvme_tier.detach(engine)

    # A never-offloaded twin that takes the same path (train, save, train, load, train) ends
    # identical. (Not a fresh engine loading the checkpoint: DeepSpeed's own resume is not
    # bit-identical to that, with or without nvme_tier.)
    twin = make_engine(**{**kwargs, "path": None})
    twin_losses = train(twin, 2)
    twin.save_checkpoint(str(tmp_path / "twin"), tag="t")
    twin_losses += train(twin, 1, seed=2)
    twin.load_checkpoint(str(tmp_path / "twin"), tag="t")
    assert train(twin, 2, seed=3) + train(twin, 1, seed=4) == resumed
    assert twin_losses == losses
    for a, b in zip(weights, params_of(twin), strict=True):
        assert a.equal(b)
