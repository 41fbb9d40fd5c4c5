"""Faults in the middle of an offload: the call raises a typed error naming the path, removes what
it wrote, leaves every state where it was, and training goes on bit-identically to a twin.

Faults are real: an injected errno at the k-th tensor write of a real backend (after really writing
half of it), a filesystem filled to a real ENOSPC, a real EFBIG from RLIMIT_FSIZE in a subprocess,
a failing manifest commit, an exception (even KeyboardInterrupt) in a host copy while NVMe writes
are in flight, and a non-blocking offload that fails in the background.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from faults import (
    BALLAST,
    TWIN_PLAN,
    assert_resident,
    assert_twin,
    data_entries,
    install,
    mounted,
    writer_dirs,
)
from helpers import make_engine, params_of, requires_aio, snapshot, train

import nvme_tier
from nvme_tier.errors import TierIOError
from nvme_tier.storage import supports_o_direct
from nvme_tier.types import OffloadPhase

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ["zarr", pytest.param("aio", marks=[requires_aio, pytest.mark.aio])]
# Several NVMe files per offload, so a fault can land in the middle of a multi-state offload:
# optim_states.0/.1, hp_params.0, lp_params.* on nvme; lp_grads to pinned host memory.
MULTI = {"policy": {"hp_params": "nvme", "lp_params": "nvme"}}


def run_with_fault(kwargs: dict, expect_exc, match: str | None = None, after_fault=None, **plan):
    """Train, offload under ``plan`` (expecting ``expect_exc``), check nothing moved, go on, twin."""
    engine = make_engine(**kwargs)
    controller = nvme_tier.attach(engine)
    steps, seed = TWIN_PLAN[0]
    losses = train(engine, steps, seed=seed)
    before = snapshot(engine)
    injector = install(controller, **plan)
    with pytest.raises(expect_exc) as err:
        engine.offload_states()
    assert injector.fired == 1
    if match is not None:
        assert match in str(err.value), str(err.value)
    assert data_entries(kwargs["path"]) == [], "partial files left behind"
    assert_resident(engine, before)
    injector.remove()
    if after_fault is not None:
        after_fault()
    for steps, seed in TWIN_PLAN[1:]:
        losses += train(engine, steps, seed=seed)
        engine.offload_states()  # the fault is gone: a normal cycle works
        engine.reload_states()
    assert_twin(kwargs, losses, params_of(engine))
    nvme_tier.detach(engine)
    assert writer_dirs(kwargs["path"]) == []
    return err.value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3])
def test_io_error_at_kth_write(backend, k, offload_dir):
    err = run_with_fault(
        {"stage": 3, "path": offload_dir, "backend": backend, **MULTI}, TierIOError, fail_at=k
    )
    assert err.errno == errno.EIO
    assert err.filename and err.filename.startswith(str(offload_dir)) and err.filename in str(err)


@pytest.mark.parametrize("stage", [1, 2])
def test_io_error_other_stages(stage, offload_dir):
    err = run_with_fault(
        {"stage": stage, "path": offload_dir, "backend": "zarr", **MULTI}, TierIOError, fail_at=2
    )
    assert err.errno == errno.EIO and str(offload_dir) in str(err)


def test_manifest_commit_fails(offload_dir):
    err = run_with_fault(
        {"stage": 3, "path": offload_dir, "backend": "zarr", **MULTI},
        TierIOError,
        fail_commit=True,
        errno=errno.ENOSPC,
    )
    assert err.errno == errno.ENOSPC and "manifest.json" in str(err)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_in_host_copy_while_nvme_writes_in_flight(exc, offload_dir):
    """optim_states are queued to NVMe, then copying a later state to host memory blows up."""
    run_with_fault(
        {"stage": 3, "path": offload_dir, "backend": "zarr", "policy": {"hp_params": "nvme"}},
        exc,
        match="injected fault",
        copy_fail_at=2,
        copy_exc=exc,
    )


def test_fault_keeps_files_of_unchanged_states(offload_dir):
    """A failed write of one state must not drop the (skipped, unchanged) file of another."""
    kwargs = {"stage": 3, "path": offload_dir, "backend": "zarr", "policy": {"hp_params": "nvme"}}
    engine = make_engine(**kwargs)
    controller = nvme_tier.attach(engine)
    train(engine, 2)
    before = snapshot(engine)
    engine.offload_states(include=["optim_states"])
    engine.reload_states()  # files kept (skip_unchanged)
    optim_files = data_entries(offload_dir)
    assert optim_files and all("optim_states" in f for f in optim_files)
    injector = install(controller, fail_at=1)
    with pytest.raises(TierIOError, match="hp_params"):
        engine.offload_states()  # optim_states unchanged -> skipped; hp_params write fails
    assert data_entries(offload_dir) == optim_files
    assert_resident(engine, before)
    injector.remove()
    engine.offload_states()
    assert controller.last_stats["offload"].bytes_skipped > 0
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    nvme_tier.detach(engine)


def test_non_blocking_offload_failure_surfaces_on_wait(offload_dir):
    kwargs = {"stage": 3, "path": offload_dir, "backend": "zarr", **MULTI}
    engine = make_engine(**kwargs)
    controller = nvme_tier.attach(engine)
    train(engine, 2)
    before = snapshot(engine)
    injector = install(controller, fail_at=2)
    engine.offload_states(non_blocking=True)
    with pytest.raises(TierIOError):
        nvme_tier.wait(engine)
    assert data_entries(offload_dir) == []
    # The scratch buffer was freed at return (non-blocking release) and comes back zeroed, as
    # after any reload; every state holding data is restored bit-exact.
    assert_resident(engine, before, scratch=False)
    injector.remove()
    engine.offload_states(non_blocking=True)
    engine.reload_states(non_blocking=True)
    train(engine, 1)  # waits for the prefetch
    nvme_tier.detach(engine)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disk_full_mid_offload(backend, tmp_path):
    """A real ENOSPC: another writer fills the filesystem between the free-space check and our write."""
    with mounted(tmp_path / "mnt", "tmpfs", "size=80M") as mnt:
        if backend == "aio" and not supports_o_direct(mnt):
            pytest.skip("this kernel's tmpfs has no O_DIRECT")
        path = os.path.join(mnt, "offload")
        err = run_with_fault(
            {"stage": 3, "path": path, "backend": backend, **MULTI},
            TierIOError,
            fail_at=2,
            mode="fill",
            after_fault=lambda: os.unlink(os.path.join(path, BALLAST)),
        )
        assert err.errno == errno.ENOSPC and path in str(err)


def test_zarr_metadata_write_failing_late_leaves_no_directory(offload_dir, monkeypatch):
    """zarr writes an array's metadata and its root group's side by side (asyncio.gather), and a
    failure of one does not stop the other: the array's write went on creating its directory after
    nvme_tier had removed the failed array (an empty ``*.zarr`` folder left behind, seen under load
    with a full disk). Here the root group's write fails at once and the array's fails later."""
    import threading
    import time

    import zarr.storage._local as zarr_local

    real_put = zarr_local._put
    done: list[threading.Event] = []

    def put(path, value, exclusive=False):
        if path.name != "zarr.json":
            return real_put(path, value, exclusive=exclusive)
        if path.parent.name.endswith(".zarr"):  # an array's metadata: fails after making its directory
            made = threading.Event()
            done.append(made)
            time.sleep(0.3)
            path.parent.mkdir(parents=True, exist_ok=True)
            made.set()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    engine = make_engine(3, offload_dir, backend="zarr", **MULTI)
    nvme_tier.attach(engine)
    train(engine, 1)
    before = snapshot(engine)
    monkeypatch.setattr(zarr_local, "_put", put)
    with pytest.raises(TierIOError):
        engine.offload_states()
    monkeypatch.undo()
    assert done and all(d.wait(5) for d in done)
    assert data_entries(offload_dir) == [], "a failed array's directory came back after its removal"
    assert_resident(engine, before)
    nvme_tier.detach(engine)


CHILD = r"""
import errno, json, os, resource, signal, sys
sys.path.insert(0, sys.argv[1])
from helpers import make_engine, params_of, snapshot, train
from faults import BALLAST, TWIN_PLAN, assert_resident, assert_twin, data_entries
import nvme_tier

path, backend = sys.argv[2], sys.argv[3]
kwargs = {"stage": 3, "path": path, "backend": backend, "policy": {"hp_params": "nvme"}}
engine = make_engine(**kwargs)
nvme_tier.attach(engine)
steps, seed = TWIN_PLAN[0]
losses = train(engine, steps, seed=seed)
before = snapshot(engine)
if backend == "aio":
    from nvme_tier.deepspeed.ops import load_aio_op
    load_aio_op()  # JIT-loading the op writes to ~/.cache: do it before the limit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, resource.RLIM_INFINITY))
try:
    engine.offload_states()
except nvme_tier.TierIOError as exc:
    error = {"errno": exc.errno, "message": str(exc), "filename": exc.filename}
else:
    error = None
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
leftovers = data_entries(path)
assert_resident(engine, before)
for steps, seed in TWIN_PLAN[1:]:
    losses += train(engine, steps, seed=seed)
    engine.offload_states()
    engine.reload_states()
assert_twin(kwargs, losses, params_of(engine))
print("RESULT " + json.dumps({"error": error, "leftovers": leftovers}))
"""


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("MASTER_PORT", None)  # the child picks its own free port (helpers.py)
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("backend", BACKENDS)
def test_file_size_limit_efbig(backend, offload_dir):
    """RLIMIT_FSIZE (SIGXFSZ ignored) turns the first big write into a real EFBIG."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, HERE, str(offload_dir), backend],
        capture_output=True,
        text=True,
        timeout=240,
        env=child_env(),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    error = result["error"]
    assert error is not None, "the offload did not fail under RLIMIT_FSIZE"
    assert error["errno"] == errno.EFBIG
    assert error["filename"].startswith(str(offload_dir)) and error["filename"] in error["message"]
    assert result["leftovers"] == []


# -- faults while reloading ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_transient_read_error_then_retry(backend, offload_dir):
    """A read error fails the reload (typed, naming the file) without losing anything: a retry works."""
    kwargs = {"stage": 3, "path": offload_dir, "backend": backend, **MULTI}
    engine = make_engine(**kwargs)
    controller = nvme_tier.attach(engine)
    steps, seed = TWIN_PLAN[0]
    losses = train(engine, steps, seed=seed)
    before = snapshot(engine)
    engine.offload_states()
    injector = install(controller, read_fail_at=2)
    with pytest.raises(TierIOError) as err:
        engine.reload_states()
    assert err.value.errno == errno.EIO and err.value.filename and err.value.filename in str(err.value)
    assert controller.phase is OffloadPhase.failed
    with pytest.raises(nvme_tier.StatesOffloadedError):
        train(engine, 1)
    injector.remove()
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    for steps, seed in TWIN_PLAN[1:]:
        losses += train(engine, steps, seed=seed)
        engine.offload_states()
        engine.reload_states()
    assert_twin(kwargs, losses, params_of(engine))
    nvme_tier.detach(engine)


def test_file_removal_failure_after_reload_is_not_fatal(offload_dir, caplog):
    """skip_unchanged=False deletes files after a reload; a failing delete is a leftover, not a failure."""
    kwargs = {"stage": 3, "path": offload_dir, "backend": "zarr", "skip_unchanged": False}
    engine = make_engine(**kwargs)
    controller = nvme_tier.attach(engine)
    train(engine, 2)
    before = snapshot(engine)
    engine.offload_states()
    injector = install(controller, remove_fails=True)
    engine.reload_states()
    assert injector.fired >= 1
    assert any("could not remove" in r.getMessage() for r in caplog.records)
    assert_resident(engine, before, scratch=False)
    injector.remove()
    train(engine, 1)
    engine.offload_states()
    engine.reload_states()
    nvme_tier.detach(engine)
    assert writer_dirs(offload_dir) == []
