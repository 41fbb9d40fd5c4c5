"""Ctrl-C (a real SIGINT or a KeyboardInterrupt) anywhere in an offload or a reload loses nothing.

Afterwards the phase and the status describe where the states really are, ``reload_states()``
brings every state back bit for bit, and training goes on identical to a never-offloaded twin run
afterwards. The interrupt lands where it used to do harm: while device memory is being freed after
the manifest commit, and in the middle of a reload.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from faults import TWIN_PLAN, assert_resident, assert_twin
from helpers import make_engine, params_of, run_child, snapshot, train

import nvme_tier
from nvme_tier.buffers import StateBuffer
from nvme_tier.types import OffloadPhase

# A shell starts background jobs (`pytest ... &` from a script) with SIGINT ignored: os.kill then
# delivers nothing, so the tests that send a real one cannot run there.
needs_sigint = pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
    reason="SIGINT is ignored in this process (started in the background by a shell?): a real SIGINT cannot be delivered",
)

KWARGS = {"stage": 3, "backend": "zarr", "policy": {"hp_params": "nvme"}}


def interrupted_cycle(path, monkeypatch, break_offload=None, break_reload=None) -> None:
    """Train, offload (``break_offload`` patches it), reload (``break_reload``), check, go on, twin."""
    kwargs = {**KWARGS, "path": path}
    engine = make_engine(**kwargs)
    controller = nvme_tier.attach(engine)
    steps, seed = TWIN_PLAN[0]
    losses = train(engine, steps, seed=seed)
    before = snapshot(engine)

    with monkeypatch.context() as patch:
        if break_offload is not None:
            break_offload(patch, controller)
            with pytest.raises(KeyboardInterrupt):
                engine.offload_states()
        else:
            engine.offload_states()
    assert_truthful(engine, controller, before)

    with monkeypatch.context() as patch:
        if break_reload is not None:
            break_reload(patch, controller)
            with pytest.raises(KeyboardInterrupt):
                engine.reload_states()
            assert_truthful(engine, controller, before)
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    for steps, seed in TWIN_PLAN[1:]:
        losses += train(engine, steps, seed=seed)
        engine.offload_states()
        engine.reload_states()
    assert_twin(kwargs, losses, params_of(engine))
    nvme_tier.detach(engine)


def assert_truthful(engine, controller, before) -> None:
    """The phase and the status agree with the memory: a freed state is never reported on the device."""
    status = nvme_tier.offload_status(engine)
    if controller.phase is OffloadPhase.resident:
        assert all(e.tier == "device" for e in status.values()), status
        assert not controller._placed
    else:
        assert controller.phase is OffloadPhase.offloaded, controller.phase
        assert status["optim_states"].tier == "nvme" and status["hp_params"].tier == "nvme", status
        with pytest.raises(nvme_tier.StatesOffloadedError, match="reload_states"):
            train(engine, 1)


def free_fails_at(n: int, action):
    """Patch StateBuffer.free so that its n-th call runs ``action`` (before or instead of freeing)."""

    def patch(mp, _controller) -> None:
        real = StateBuffer.free
        calls = {"n": 0}

        def free(self) -> None:
            calls["n"] += 1
            if calls["n"] == n:
                action()
            real(self)

        mp.setattr(StateBuffer, "free", free)

    return patch


def raise_interrupt() -> None:
    raise KeyboardInterrupt


def send_sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_keyboard_interrupt_while_freeing(offload_dir, monkeypatch):
    """A KeyboardInterrupt out of the 2nd free: the commit is done, so the states count as offloaded."""
    interrupted_cycle(offload_dir, monkeypatch, break_offload=free_fails_at(2, raise_interrupt))


@needs_sigint
def test_real_sigint_while_freeing(offload_dir, monkeypatch):
    """A real SIGINT after the first free is held until every state is freed and recorded, then raised."""
    interrupted_cycle(offload_dir, monkeypatch, break_offload=free_fails_at(2, send_sigint))


@needs_sigint
def test_real_sigint_at_manifest_commit(offload_dir, monkeypatch):
    """SIGINT as the manifest is committed: either nothing moved or everything did, never half."""

    def patch(mp, controller) -> None:
        backend = controller._mover.backend
        real = backend.commit

        def commit() -> None:
            send_sigint()
            real()

        mp.setattr(backend, "commit", commit)

    interrupted_cycle(offload_dir, monkeypatch, break_offload=patch)


def sigint_while_recording(patch, controller) -> None:
    """A real SIGINT while the offload's placements are recorded: it is held to the end of that
    step, when the job must already have an owner (the caller's blocking run, or the worker)."""
    real = controller._record_offloaded

    def record(placed) -> None:
        send_sigint()
        real(placed)

    patch.setattr(controller, "_record_offloaded", record)


@needs_sigint
def test_sigint_while_the_offload_is_recorded(offload_dir, monkeypatch):
    """Blocking: nothing is freed yet, so the offload is undone and every state stays on the device;
    it used to leave a job nobody finished, whose uncommitted files made the next reload fail and
    free the intact states."""
    interrupted_cycle(offload_dir, monkeypatch, break_offload=sigint_while_recording)


@needs_sigint
def test_sigint_while_a_non_blocking_offload_is_recorded(offload_dir, monkeypatch):
    """Non-blocking: the worker owns the job when the held Ctrl-C reaches the caller; it finishes."""
    engine = make_engine(**KWARGS, path=offload_dir)
    controller = nvme_tier.attach(engine)
    train(engine, 2)
    before = snapshot(engine)
    with monkeypatch.context() as patch:
        sigint_while_recording(patch, controller)
        with pytest.raises(KeyboardInterrupt):
            engine.offload_states(non_blocking=True)
    nvme_tier.wait(engine)
    assert controller.phase is OffloadPhase.offloaded
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    nvme_tier.detach(engine)


def test_keyboard_interrupt_mid_reload(offload_dir, monkeypatch):
    """Interrupted after the first NVMe read: not a failure, the copies are intact and a retry works."""

    def patch(mp, controller) -> None:
        backend = controller._mover.backend
        real = backend.read_into

        def read_into(name, out):
            if name == "hp_params.0":  # queued after optim_states.*: some reads are in flight
                raise KeyboardInterrupt
            return real(name, out)

        mp.setattr(backend, "read_into", read_into)

    interrupted_cycle(offload_dir, monkeypatch, break_reload=patch)


@needs_sigint
def test_real_sigint_at_end_of_reload(offload_dir, monkeypatch):
    """SIGINT as the last host copy lands: the reload either completes (resident) or is undone (offloaded)."""

    def patch(mp, controller) -> None:
        copier = controller._mover._copier
        real = copier.synchronize

        sent = []

        def synchronize() -> None:
            real()
            if not sent:
                sent.append(True)
                send_sigint()

        mp.setattr(copier, "synchronize", synchronize)

    interrupted_cycle(offload_dir, monkeypatch, break_reload=patch)


@needs_sigint
def test_ctrl_c_while_waiting_for_a_non_blocking_offload(offload_dir, monkeypatch):
    """Ctrl-C in wait(): the background offload goes on, and the next wait still waits for it."""
    kwargs = {**KWARGS, "path": offload_dir}
    engine = make_engine(**kwargs)
    controller = nvme_tier.attach(engine)
    steps, seed = TWIN_PLAN[0]
    losses = train(engine, steps, seed=seed)
    before = snapshot(engine)
    real_finish = controller._mover.finish_offload

    def slow_finish(job, free_as_written):  # the worker's wait for the writes takes a while
        time.sleep(1.0)
        return real_finish(job, free_as_written)

    monkeypatch.setattr(controller._mover, "finish_offload", slow_finish)
    engine.offload_states(non_blocking=True)
    threading.Timer(0.3, send_sigint).start()
    with pytest.raises(KeyboardInterrupt):
        nvme_tier.wait(engine)
    assert controller.phase in (OffloadPhase.offloading, OffloadPhase.offloaded)
    nvme_tier.wait(engine)  # still waits for the offload that is running
    assert controller.phase is OffloadPhase.offloaded
    assert_truthful(engine, controller, before)
    monkeypatch.undo()
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    for steps, seed in TWIN_PLAN[1:]:
        losses += train(engine, steps, seed=seed)
        engine.offload_states()
        engine.reload_states()
    assert_twin(kwargs, losses, params_of(engine))
    nvme_tier.detach(engine)


def test_sigint_tests_skip_where_sigint_is_ignored():
    """Run under a parent that ignores SIGINT (as `&` in a script does): skipped with the reason."""
    ignore_then_run = (
        "import signal, subprocess, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "sys.exit(subprocess.call([sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', "
        f"{__file__!r}, '-k', 'real_sigint or ctrl_c']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", ignore_then_run], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 skipped" in proc.stdout and "SIGINT is ignored" in proc.stdout, proc.stdout


EXIT_CHILD = r"""
import os, sys, time
sys.path.insert(0, os.path.join(os.environ["NVME_TIER_REPO"], "tests"))
from helpers import make_engine, train
import nvme_tier
from nvme_tier.storage.base import StorageBackend

real_write = StorageBackend._write_bytes
def slow_write(self, *args):  # the offload is surely still in flight at sys.exit
    time.sleep(0.5)
    return real_write(self, *args)
StorageBackend._write_bytes = slow_write

engine = make_engine(1, sys.argv[1], backend="zarr")
nvme_tier.attach(engine)
train(engine, 1)
engine.offload_states(non_blocking=True)
sys.exit(3)
"""


def test_sys_exit_during_a_non_blocking_offload_is_an_ordered_shutdown(tmp_path):
    """Issue 23: sys.exit right after offload_states(non_blocking=True) logged only "cannot schedule
    new futures after shutdown" (the offload failed half-way, its undo too). Now the in-flight
    operation is finished first, with a message saying so, and the writer directory is removed."""
    proc = run_child(EXIT_CHILD, str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "cannot schedule new futures" not in out and "Traceback" not in out, out[-3000:]
    assert "could not remove" not in out, out[-3000:]
    assert "exiting while a non-blocking" in out and "nvme_tier.wait(engine)" in out, out[-3000:]
    assert [n for n in os.listdir(tmp_path) if n.startswith("ntier-")] == []
