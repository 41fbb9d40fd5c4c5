"""A non-blocking offload frees device memory when it returns, as upstream's does.

Host tiers (cpu, pinned_cpu) and discard: every device storage is freed when the call returns (the
copies are stream-ordered; on the CPU accelerator they are done by then). NVMe: each buffer is
freed once its write has completed, and a write failing later restores the freed ones from their
complete files before the error surfaces. Status shows the phase and the bytes still in flight.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
import torch
from faults import TWIN_PLAN, assert_resident, assert_twin, data_entries
from helpers import make_engine, params_of, requires_aio, snapshot, train

import nvme_tier
from nvme_tier.deepspeed.locators import discover_buffers
from nvme_tier.errors import TierIOError
from nvme_tier.types import StateKind


def hold_worker(controller) -> threading.Event:
    """Occupy the controller's worker thread, so anything handed to it visibly has not run yet."""
    release = threading.Event()
    controller._background._worker().submit(release.wait, 60)
    return release


class WriteGate:
    """Wraps the real backend's tensor writes: records names, holds or fails the k-th one."""

    def __init__(self, controller, hold_at: int | None = None, fail_at: int | None = None):
        self.names: list[str] = []
        self.hold_at, self.fail_at = hold_at, fail_at
        self.reached = threading.Event()
        self.go = threading.Event()
        self.before_fault = lambda: None
        mover = controller._mover
        factory = mover._backend_factory
        self._undo: list = [lambda: setattr(mover, "_backend_factory", factory)]

        def wrapped_factory():
            backend = factory()
            real = backend._write_bytes
            # Undone by remove(): left in place, backend -> wrapper -> backend is a cycle, and a
            # released aio backend collected later by the cyclic GC was seen to abort the process.
            self._undo.append(lambda: backend.__dict__.pop("_write_bytes", None))

            def write_bytes(key, src, chunk, reuse):
                name = key.removesuffix(backend.store.suffix)
                self.names.append(name)
                if len(self.names) == self.hold_at:
                    self.reached.set()
                    self.go.wait(60)
                if len(self.names) == self.fail_at:
                    self.before_fault()
                    half = src[: src.numel() // 2]
                    real(key, half, backend.store.chunk_for(half.numel()), reuse)  # a real, partial file
                    raise OSError(errno.EIO, os.strerror(errno.EIO), name)
                return real(key, src, chunk, reuse)

            backend._write_bytes = write_bytes
            return backend

        mover._backend_factory = wrapped_factory

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("tier", ["pinned_cpu", "cpu"])
def test_host_tiers_and_discard_freed_at_return(stage, tier, tmp_path):
    policy = {s.value: tier for s in StateKind if s.holds_data}  # contiguous_grad_buffer: discard
    kwargs = {"stage": stage, "device": "cpu", "policy": policy}
    engine = make_engine(**kwargs)
    controller = nvme_tier.attach(engine)
    steps, seed = TWIN_PLAN[0]
    losses = train(engine, steps, seed=seed)
    before = snapshot(engine)
    buffers = [b for bufs in discover_buffers(engine).values() for b in bufs]
    if stage == 3:  # ZeRO-2 allocates its reduce bucket only while reducing
        assert any(b.kind is StateKind.contiguous_grad_buffer for b in buffers)
    release = hold_worker(controller)
    try:
        engine.offload_states(non_blocking=True)
        still = [b.name for b in buffers if b.view.untyped_storage().nbytes() != 0]
    finally:
        release.set()
    assert still == [], f"not freed when offload_states(non_blocking=True) returned: {still}"
    nvme_tier.wait(engine)
    scratch = ["discard"] if stage == 3 else []
    assert {e.tier for e in nvme_tier.offload_status(engine).values() if e.bytes} == {tier, *scratch}
    engine.reload_states(non_blocking=True)
    nvme_tier.wait(engine)
    assert_resident(engine, before, scratch=False)
    for steps, seed in TWIN_PLAN[1:]:
        losses += train(engine, steps, seed=seed)
    weights = params_of(engine)
    nvme_tier.detach(engine)
    assert_twin(kwargs, losses, weights)


def test_failing_host_copy_frees_nothing(tmp_path):
    """Queuing the copies happens in the call: a failure there raises at once, nothing freed."""
    from faults import install

    engine = make_engine(3, device="cpu")
    controller = nvme_tier.attach(engine)
    train(engine, 2)
    before = snapshot(engine)
    injector = install(controller, copy_fail_at=2)
    with pytest.raises(RuntimeError, match="injected"):
        engine.offload_states(non_blocking=True)
    injector.remove()
    assert_resident(engine, before)
    engine.offload_states(non_blocking=True)
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    nvme_tier.detach(engine)


# optim_states.0/.1, hp_params.0, lp_params.* on nvme: the 3rd write fails after two were written.
MULTI = {"policy": {"hp_params": "nvme", "lp_params": "nvme"}}


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("backend", ["zarr", pytest.param("aio", marks=[requires_aio, pytest.mark.aio])])
def test_nvme_frees_each_buffer_as_written_and_restores_on_failure(stage, backend, offload_dir):
    kwargs = {"stage": stage, "path": offload_dir, "backend": backend, **MULTI}
    engine = make_engine(**kwargs)
    controller = nvme_tier.attach(engine)
    steps, seed = TWIN_PLAN[0]
    losses = train(engine, steps, seed=seed)
    before = snapshot(engine)
    by_name = {b.name: b for bufs in discover_buffers(engine).values() for b in bufs}
    gate = WriteGate(controller, fail_at=3)
    freed_before_fault: list[bool] = []
    # The 3rd write fails only once the first two buffers were freed, as their writes completed.
    gate.before_fault = lambda: freed_before_fault.append(
        wait_until(lambda: all(by_name[n].is_freed for n in gate.names[:2]))
    )
    engine.offload_states(non_blocking=True)
    with pytest.raises(TierIOError, match="nothing was lost"):
        nvme_tier.wait(engine)
    gate.remove()
    assert freed_before_fault == [True], "a written buffer was not freed before the offload ended"
    assert data_entries(offload_dir) == [], "partial or restored-from files left behind"
    assert_resident(engine, before, scratch=False)  # restored from the complete files, bit-exact
    for steps, seed in TWIN_PLAN[1:]:
        losses += train(engine, steps, seed=seed)
        engine.offload_states(non_blocking=True)  # and a good non-blocking cycle still works
        engine.reload_states(non_blocking=True)
    nvme_tier.wait(engine)  # params_of reads the buffers directly: no guard waits for it
    weights = params_of(engine)
    nvme_tier.detach(engine)
    assert_twin(kwargs, losses, weights)


def test_status_shows_phase_and_bytes_in_flight(offload_dir):
    engine = make_engine(2, offload_dir, backend="zarr")
    controller = nvme_tier.attach(engine)
    train(engine, 1)
    gate = WriteGate(controller, hold_at=1)
    engine.offload_states(non_blocking=True)
    try:
        assert gate.reached.wait(30)
        status = nvme_tier.offload_status(engine)
        optim = status["optim_states"]
        assert optim.tier == "nvme" and optim.phase == "offloading"
        assert optim.bytes_in_flight == optim["bytes_in_flight"] == optim.bytes > 0
        assert status["hp_params"].tier == "pinned_cpu" and status["hp_params"].bytes_in_flight == 0
        table = nvme_tier.format_status(engine)
        assert table.splitlines()[0].startswith("phase: offloading")
        assert "in flight" in table.splitlines()[0]
    finally:
        gate.go.set()
    nvme_tier.wait(engine)
    gate.remove()
    status = nvme_tier.offload_status(engine)
    assert status["optim_states"].phase == "offloaded"
    assert all(e.bytes_in_flight == 0 for e in status.values())
    assert nvme_tier.format_status(engine).splitlines()[0].startswith("phase: offloaded")
    engine.reload_states()
    status = nvme_tier.offload_status(engine)
    assert {e.phase for e in status.values()} == {"resident"}
    assert nvme_tier.format_status(engine).splitlines()[0].startswith("phase: resident")
    nvme_tier.detach(engine)


@pytest.mark.parametrize("stage", [1, 2])
def test_host_tier_weights_readable_when_nonblocking_reload_returns(stage, offload_dir):
    """ZeRO-1/2 parameters are views into flat buffers no guard sees: a weight sync reading p.data
    right after reload_states(non_blocking=True) must find the weights, as after upstream's
    stream-ordered reload. The host-tier copies are queued in the call (ordered before the caller's
    later work); only the NVMe reads (optimizer states here) finish in the background."""
    engine = make_engine(stage, offload_dir, backend="zarr")  # default policy: lp_params pinned_cpu
    controller = nvme_tier.attach(engine)
    train(engine, 2)
    weights = [p.detach().clone() for p in engine.module.parameters()]
    before = snapshot(engine)
    engine.offload_states()
    release = hold_worker(controller)
    try:
        engine.reload_states(non_blocking=True)
        seen = [p.detach().clone() for p in engine.module.parameters()]  # the worker has not run yet
    finally:
        release.set()
    nvme_tier.wait(engine)
    assert all(torch.equal(a, b) for a, b in zip(weights, seen, strict=True))
    assert_resident(engine, before, scratch=False)
