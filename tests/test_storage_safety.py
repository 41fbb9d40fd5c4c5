"""Storage safety (issue 18): nothing is freed unless its bytes are on disk, and the process never
aborts inside DeepSpeed's op.

- aio.block_size is validated at config time (a multiple of 4096, at most 1 GiB) and against the
  logical block size of the device under the path when the backend is chosen.
- Writes the op silently drops (it reports every request done, whatever the kernel said) are
  caught by the size check and the sampled O_DIRECT read-back: the offload raises TierIOError and
  every state stays where it was. Shown with the REAL op and a misaligned block size (every
  request fails with EINVAL inside it), with an op that writes nothing, and, where loop devices can
  be made here, with a real device that returns EIO.
- An exhausted kernel aio budget (fs.aio-max-nr) is a typed error or a zarr fallback, never SIGABRT.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from faults import assert_resident, data_entries
from helpers import make_engine, requires_aio, snapshot, train

import nvme_tier
import nvme_tier.deepspeed.aio_binding as ds
from nvme_tier.config import AioSettings, OffloadStatesConfig
from nvme_tier.deepspeed.ops import aio_compatible
from nvme_tier.errors import BackendUnavailableError, ConfigError, TierIOError
from nvme_tier.storage import AioStore, OwnerInfo, StorageBackend, WriterDirectory
from nvme_tier.storage import aio_handles as aio_mod

AIO = [requires_aio, pytest.mark.aio]


# -- 1a: block size validated at config time and against the device ---------------------------------
@pytest.mark.parametrize("block_size", [5000, 4096 + 512, 2**40])
def test_block_size_must_be_4096_aligned_and_bounded(block_size):
    with pytest.raises(ConfigError, match=r"offload_states\.aio\.block_size"):
        OffloadStatesConfig.parse({"aio": {"block_size": block_size}})


def test_logical_block_size_of_a_real_path(tmp_path):
    from nvme_tier.storage import logical_block_size

    size = logical_block_size(str(tmp_path))
    assert size is None or (size >= 512 and size & (size - 1) == 0)


@pytest.mark.parametrize("backend", ["aio", "auto"])
def test_block_size_checked_against_the_device(backend, tmp_path, monkeypatch):
    from nvme_tier.storage import registry, supports_o_direct

    if not aio_compatible()[0] or not supports_o_direct(str(tmp_path)):
        pytest.skip("aio not usable on this path")
    monkeypatch.setattr(registry, "logical_block_size", lambda path: 1 << 16)  # a 64 KiB-block device
    config = OffloadStatesConfig.parse({"path": str(tmp_path), "aio": {"block_size": 1 << 20}})
    with pytest.raises(ConfigError, match=r"aio\.block_size .*65536"):
        nvme_tier.default_runtime().stores.select(backend, str(tmp_path), config)


# -- 1b: writes that never reached the disk ---------------------------------------------------------
def _misaligned_op(monkeypatch) -> None:
    """Handles made with block_size 5000: the real op, whose O_DIRECT requests all fail (EINVAL)."""
    real_key = aio_mod.handle_key
    monkeypatch.setattr(aio_mod, "handle_key", lambda s: (5000, *real_key(s)[1:]))
    nvme_tier.default_runtime().aio_handles.drop_idle()


def _op_that_writes_nothing(monkeypatch) -> None:
    """An op that takes every write, writes nothing and reports it done (what a device's EIO looks
    like through DeepSpeed's op, which drops per-request errors)."""
    real_wait = ds.aio_wait
    skipped: set[int] = set()

    def pwrite(handle, buffer, fd, path, file_offset):
        skipped.add(id(handle))
        return 0

    def wait(handle):
        if id(handle) in skipped:
            skipped.discard(id(handle))
            return 1
        return real_wait(handle)

    monkeypatch.setattr(ds, "aio_async_pwrite", pwrite)
    monkeypatch.setattr(ds, "aio_wait", wait)


@pytest.mark.parametrize("fault", [_misaligned_op, _op_that_writes_nothing])
@pytest.mark.parametrize("rewrite", [False, True], ids=["new-files", "in-place-rewrite"])
@pytest.mark.aio
@requires_aio
def test_silently_dropped_writes_free_nothing(fault, rewrite, offload_dir, monkeypatch):
    # width 256: states of ~256 KiB, so each op thread's piece spans several 5000 B requests
    engine = make_engine(1, offload_dir, backend="aio", staging_budget_mb=2, width=256)
    controller = nvme_tier.attach(engine)
    train(engine, 2)
    if rewrite:  # files exist from a good cycle; the failing rewrite must not pass for a success
        engine.offload_states()
        engine.reload_states()
        train(engine, 1, seed=2)
        controller._mover.backend.store.close()  # the next write makes new handles
        nvme_tier.default_runtime().aio_handles.drop_idle()
    before = snapshot(engine)
    with monkeypatch.context() as patch:
        fault(patch)
        with pytest.raises(TierIOError, match="offset") as err:
            engine.offload_states()
    assert str(offload_dir) in str(err.value)
    assert_resident(engine, before)
    assert data_entries(offload_dir) == [] or rewrite
    controller._mover.backend.store.close()  # drop the misaligned handles: the fault is gone
    nvme_tier.default_runtime().aio_handles.drop_idle()
    engine.offload_states()  # the fault is gone: a normal cycle works and restores every byte
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    nvme_tier.detach(engine)


@pytest.mark.aio
@requires_aio
def test_backend_write_with_a_misaligned_block_size_raises(tmp_path):
    """The backend alone, the real op: a block size the device refuses is never reported stored."""
    settings = AioSettings.model_construct(**{**AioSettings().model_dump(), "block_size": 5000})
    backend = StorageBackend(
        AioStore(
            WriterDirectory(str(tmp_path), OwnerInfo.current(rank=0, label="t")),
            settings=settings,
            staging_budget_bytes=2 << 20,
        )
    )
    try:
        with pytest.raises(TierIOError, match="offset 0"):
            backend.write("x", torch.arange(300_000, dtype=torch.float32)).result()
        assert backend.names() == []
    finally:
        backend.release()
        nvme_tier.default_runtime().aio_handles.drop_idle()


@pytest.mark.aio
@requires_aio
def test_a_handle_goes_back_under_the_settings_it_was_made_with(tmp_path, monkeypatch):
    """Slots whose handles were made with other settings (here misaligned ones, as the dropped-write
    tests make), freed later to make room for slots of the real settings, keep their handles to
    themselves: filed under the settings asked for at give-back, they were taken for the real
    settings' new slots, whose writes then all failed (a CI failure of the small-ext4 test)."""
    real_key = aio_mod.handle_key
    with nvme_tier.isolated_runtime() as runtime:

        def store(sub: str) -> StorageBackend:
            directory = WriterDirectory(str(tmp_path / sub), OwnerInfo.current(rank=0, label=sub))
            return StorageBackend(
                AioStore(
                    directory,
                    staging_budget_bytes=2 << 20,
                    staging=runtime.staging,
                    handles=runtime.aio_handles,
                )
            )

        good, misaligned = store("good"), store("misaligned")
        data = torch.arange(300_000, dtype=torch.float32)
        try:
            good.write("x", data).result()  # a user of the pool and of the real settings' handles
            with monkeypatch.context() as patch:
                patch.setattr(aio_mod, "handle_key", lambda s: (5000, *real_key(s)[1:]))
                with pytest.raises(TierIOError, match="offset 0"):
                    misaligned.write("x", data).result()
            misaligned.store.close()  # its slots stay idle in the pool, under the misaligned key
            good.write("y", data).result()  # the pool frees them to make room for good's slots
            out = torch.empty_like(data)
            good.read_into("y", out).result()
            assert torch.equal(out, data)
        finally:
            good.release()
            misaligned.release()


@pytest.mark.aio
@requires_aio
def test_verification_cost_is_a_few_pages_per_chunk(tmp_path, monkeypatch):
    """The read-back reads (intra_op_parallelism + 1) pages per chunk, not the data."""
    reads: list[int] = []
    real = os.preadv

    def counting(fd, buffers, offset, *args):
        reads.append(sum(len(b) for b in buffers))
        return real(fd, buffers, offset, *args)

    monkeypatch.setattr(aio_mod.os, "preadv", counting)
    backend = StorageBackend(
        AioStore(
            WriterDirectory(str(tmp_path), OwnerInfo.current(rank=0, label="t")),
            staging_budget_bytes=32 << 20,
        )
    )
    try:
        data = torch.randn(8 << 20)  # 32 MiB: 2 chunks of 16 MiB
        backend.write("x", data).result()
        record = backend.record("x")
        chunks = -(-record.nbytes // record.chunk_bytes)
        assert len(reads) <= chunks * (AioSettings().intra_op_parallelism + 1)
        assert sum(reads) <= chunks * 9 * 4096
        out = torch.empty_like(data)
        backend.read_into("x", out).result()
        assert torch.equal(out, data)
    finally:
        backend.release()


# -- 1b with a real failing device: an ext4 on a loop device shrunk under it (EIO past its end) -----
@contextlib.contextmanager
def shrunk_ext4(tmp_path, size_mb: int = 96, keep_mb: int = 40):
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("losetup", "mkfs.ext4", "mount")):
        pytest.skip("needs root, losetup, mkfs.ext4 and mount")
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(size_mb << 20)

    def sh(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    made = sh("losetup", "--find", "--show", str(image))
    if made.returncode != 0:
        pytest.skip(f"cannot make a loop device here: {made.stderr.strip()}")
    loop = made.stdout.strip()
    try:
        if sh("mkfs.ext4", "-q", "-F", loop).returncode or sh("mount", loop, str(mnt)).returncode:
            pytest.skip("cannot make or mount an ext4 on a loop device here")
        try:
            os.truncate(image, keep_mb << 20)  # the device now ends at keep_mb: EIO past it
            if sh("losetup", "-c", loop).returncode:
                pytest.skip("cannot resize a loop device here")
            yield str(mnt)
        finally:
            sh("umount", "-l", str(mnt))
    finally:
        sh("losetup", "-d", loop)


@pytest.mark.aio
@requires_aio
def test_real_device_eio_is_never_reported_stored(tmp_path):
    with shrunk_ext4(tmp_path) as mnt:
        backend = StorageBackend(
            AioStore(WriterDirectory(mnt, OwnerInfo.current(rank=0, label="t")), staging_budget_bytes=8 << 20)
        )
        try:
            data = torch.randn(16 << 20)  # 64 MiB: its blocks run past the device's new end
            with pytest.raises(TierIOError):
                backend.write("x", data).result()
            assert backend.names() == []
        finally:
            backend.release()


# -- 2: the kernel aio budget -----------------------------------------------------------------------
BUDGET_CHILD = textwrap.dedent(
    """
    import ctypes, ctypes.util, json, sys
    import torch
    from nvme_tier.config import OffloadStatesConfig
    from nvme_tier.errors import BackendUnavailableError
    import nvme_tier
    from nvme_tier.storage import AioStore, OwnerInfo, StorageBackend, WriterDirectory
    from nvme_tier.storage import aio_handles as aio

    path, mode = sys.argv[1], sys.argv[2]
    held = []

    def exhaust():
        if mode == "fake":  # the budget read says the host is nearly out of events
            aio.read_aio_budget = lambda: (65536 - 100, 65536)
            return
        # really io_setup() every event the host has left (again before each step: other
        # processes on this host may have freed some meanwhile)
        lib = ctypes.CDLL(ctypes.util.find_library("aio") or "libaio.so.1")
        for size in (4096, 512, 64, 8, 1):
            while True:
                ctx = ctypes.c_void_p(0)
                if lib.io_setup(size, ctypes.byref(ctx)) != 0:
                    break
                held.append(ctx)

    out = {}
    config = OffloadStatesConfig(staging_budget_mb=8)
    exhaust()
    out["auto"] = nvme_tier.default_runtime().stores.select("auto", path, config)
    try:
        exhaust()
        nvme_tier.default_runtime().stores.select("aio", path, config)
    except BackendUnavailableError as exc:
        out["aio"] = str(exc)
    backend = StorageBackend(AioStore(WriterDirectory(path, OwnerInfo.current(rank=0, label="t")), staging_budget_bytes=8 << 20))
    try:
        exhaust()
        backend.write("x", torch.arange(1000, dtype=torch.float32)).result()
    except BackendUnavailableError as exc:
        out["write"] = str(exc)
    backend.release()
    print("RESULT " + json.dumps(out))
    """
)


def _run_child(code: str, path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path), mode],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # the op's C assert shows here as SIGABRT (-6)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _check_budget_result(out: dict) -> None:
    assert out["auto"][0] == "zarr" and "fs.aio-max-nr" in out["auto"][1]
    assert "fs.aio-max-nr" in out["aio"] and "sysctl -w fs.aio-max-nr" in out["aio"]
    assert "queue_depth" in out["aio"]
    assert "fs.aio-max-nr" in out["write"]


@pytest.mark.aio
@requires_aio
def test_exhausted_aio_budget_is_a_typed_error_not_sigabrt(tmp_path):
    _check_budget_result(_run_child(BUDGET_CHILD, tmp_path, "fake"))


@pytest.mark.slow
@pytest.mark.aio
@requires_aio
@pytest.mark.skipif(
    os.environ.get("NVME_TIER_EXHAUST_AIO") != "1",
    reason="takes the whole host's kernel aio budget for a few seconds (other processes' io_setup "
    "fails meanwhile); set NVME_TIER_EXHAUST_AIO=1 on a machine of your own",
)
def test_really_exhausted_aio_budget_is_a_typed_error(tmp_path):
    """No fake: the child io_setup()s every event the host allows, then tries aio."""
    _check_budget_result(_run_child(BUDGET_CHILD, tmp_path, "real"))


def test_events_per_handle_match_the_op(tmp_path):
    """A handle io_setup()s (intra_op_parallelism + 1) x queue_depth events (measured in fs.aio-nr).

    Other processes on this host may io_setup()/io_destroy() meanwhile: one clean measurement of
    several is enough.
    """
    if not aio_compatible()[0] or aio_mod.read_aio_budget() is None:
        pytest.skip("needs the aio op and /proc/sys/fs/aio-nr")
    settings = AioSettings(queue_depth=7, intra_op_parallelism=3)
    op = aio_mod.load_aio_op()
    seen = []
    handles = []
    for _ in range(5):
        before = aio_mod.read_aio_budget()[0]
        handles.append(op.aio_handle(*aio_mod.handle_key(settings)))
        seen.append(aio_mod.read_aio_budget()[0] - before)
        if seen[-1] == 28:
            break
    assert aio_mod.aio_events_per_handle(settings) == 28 in seen, seen


class _CountingOp:
    """DeepSpeed's real async_io op, counting the handles made through it."""

    def __init__(self, op):
        self.op = op
        self.made = 0

    def aio_handle(self, *args):
        self.made += 1
        return self.op.aio_handle(*args)

    def __getattr__(self, name):
        return getattr(self.op, name)


@pytest.mark.aio
@requires_aio
def test_engines_beyond_the_aio_budget_fall_back_or_refuse(tmp_path, monkeypatch, fresh_storage):
    """Room for 2 handles: two aio engines of one process share them (one staging pool); an
    engine with other aio settings needs handles of its own: under 'auto' it uses zarr, under
    'aio' its offload is a typed error with every state in place; another engine with the shared
    settings needs no new events."""
    settings = AioSettings()
    per_handle = aio_mod.aio_events_per_handle(settings)
    counting = _CountingOp(aio_mod.load_aio_op())
    limit = 1 << 20
    # Pools of its own (fresh_storage): idle slots of earlier tests hold handles this count must not see.
    monkeypatch.setattr(aio_mod, "load_aio_op", lambda: counting)
    monkeypatch.setattr(
        aio_mod, "read_aio_budget", lambda: (limit - 2 * per_handle + counting.made * per_handle, limit)
    )

    def engine_on(backend: str, sub: str, **aio):
        path = tmp_path / sub
        path.mkdir()
        engine = make_engine(1, path, backend=backend, staging_budget_mb=8, aio=aio)  # 2 handles each
        nvme_tier.attach(engine)
        train(engine, 1)
        return engine

    first, second = engine_on("auto", "a"), engine_on("auto", "b")
    for engine in (first, second):
        engine.offload_states()
        engine.reload_states()
    assert [nvme_tier.controller_of(e).site.backend_name for e in (first, second)] == ["aio", "aio"]
    assert counting.made == 2  # one ring of the shared pool served both engines

    third = engine_on("auto", "c", queue_depth=16)
    before = snapshot(third)
    third.offload_states()
    third.reload_states()
    assert nvme_tier.controller_of(third).site.backend_name == "zarr"
    assert_resident(third, before, scratch=False)

    strict = engine_on("aio", "d", queue_depth=16)
    before = snapshot(strict)
    with pytest.raises(BackendUnavailableError, match="fs.aio-max-nr"):
        strict.offload_states()
    assert_resident(strict, before)

    shared = engine_on("aio", "e")  # the pool's idle slots hold its handles: no new events
    before = snapshot(shared)
    shared.offload_states()
    shared.reload_states()
    assert_resident(shared, before, scratch=False)
    assert counting.made == 2
    for engine in (first, second, third, strict, shared):
        nvme_tier.detach(engine)
