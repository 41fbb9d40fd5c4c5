"""Fault injection around a REAL storage backend: fail, fill the disk or hang at the k-th write.

Nothing is mocked: the wrapped backend writes real files; at the chosen write it either raises the
``OSError`` a failing disk would (after really writing part of the file, so there is something to
clean up), fills the filesystem with a ballast file so the real write hits a real ENOSPC, or
blocks mid-file so another process can SIGKILL it. Installed through the controller's mover::

    inj = faults.install(nvme_tier.controller_of(engine), fail_at=2, errno=errno.EIO)
    engine.offload_states()   # the 2nd tensor write fails
    inj.remove()
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

BALLAST = "ballast.fill"


@dataclass
class Injector:
    """What to break and how often it was reached. ``fail_at`` counts tensor writes from 1."""

    fail_at: int | None = None
    errno: int = _errno.EIO
    partial: bool = True  # really write half of the tensor before failing
    mode: str = "raise"  # raise | fill | hang
    fail_commit: bool = False  # the manifest commit raises instead (after every data write)
    copy_fail_at: int | None = None  # the k-th device->host copy raises ``copy_exc``
    copy_exc: type[BaseException] = RuntimeError
    read_fail_at: int | None = None  # the k-th tensor read raises ``errno`` (after a real read)
    remove_fails: bool = False  # removing a stored tensor's files raises ``errno`` (files stay)
    once: bool = True
    writes: int = 0
    copies: int = 0
    reads: int = 0
    fired: int = 0
    hanging: threading.Event = field(default_factory=threading.Event)
    _undo: list = field(default_factory=list)

    # -- installation ----------------------------------------------------------------------------
    def install(self, controller: Any) -> Injector:
        mover = controller._mover
        if mover.has_backend:
            self._wrap_backend(mover._backend)
        factory = mover._backend_factory

        def wrapped_factory():
            return self._wrap_backend(factory())

        mover._backend_factory = wrapped_factory
        self._undo.append(lambda: setattr(mover, "_backend_factory", factory))
        if self.copy_fail_at is not None:
            copier = mover._copier
            real_copy = copier.copy_async  # copy() goes through it too

            def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
                self.copies += 1
                if self._due(self.copies, self.copy_fail_at):
                    raise self.copy_exc(f"injected fault in host copy #{self.copies}")
                real_copy(dst, src)

            copier.copy_async = copy
            self._undo.append(lambda: copier.__dict__.pop("copy_async", None))
        return self

    def remove(self) -> None:
        """Restore every patched method; the backend keeps working normally afterwards."""
        while self._undo:
            self._undo.pop()()

    def _due(self, count: int, at: int | None) -> bool:
        """Fire at the ``at``-th event (``once``) or at every event from it on."""
        due = at is not None and (count == at and not self.fired if self.once else count >= at)
        if due:
            self.fired += 1
        return due

    def _wrap_backend(self, backend: Any) -> Any:
        real_write = backend._write_bytes
        directory = backend.directory

        def write_bytes(name: str, src: torch.Tensor):
            self.writes += 1
            if not self._due(self.writes, self.fail_at):
                return real_write(name, src)
            file_path = directory.file_path(backend.file_name(name))
            if self.mode == "fill":
                fill_filesystem(directory.root)
                return real_write(name, src)  # hits a real ENOSPC
            if self.partial and src.numel() > 1:
                real_write(name, src[: src.numel() // 2])
            if self.mode == "hang":
                print(f"HANGING {file_path}", flush=True)
                sys.stdout.flush()
                self.hanging.set()
                threading.Event().wait()  # until SIGKILL
            raise OSError(self.errno, os.strerror(self.errno), file_path)

        backend._write_bytes = write_bytes
        self._undo.append(lambda: backend.__dict__.pop("_write_bytes", None))
        if self.read_fail_at is not None:
            real_read = backend._read_bytes

            def read_bytes(record, dst: torch.Tensor) -> None:
                self.reads += 1
                real_read(record, dst)  # the destination really is overwritten
                if self._due(self.reads, self.read_fail_at):
                    raise OSError(self.errno, os.strerror(self.errno), directory.file_path(record.file))

            backend._read_bytes = read_bytes
            self._undo.append(lambda: backend.__dict__.pop("_read_bytes", None))
        if self.remove_fails:

            def remove(record) -> None:
                self.fired += 1
                raise OSError(self.errno, os.strerror(self.errno), directory.file_path(record.file))

            backend._remove = remove
            self._undo.append(lambda: backend.__dict__.pop("_remove", None))
        if self.fail_commit:
            real_commit = directory.commit_manifest

            def commit_manifest(records):
                if self._due(self.writes, self.writes):
                    raise OSError(self.errno, os.strerror(self.errno), directory.file_path("manifest.json"))
                return real_commit(records)

            directory.commit_manifest = commit_manifest
            self._undo.append(lambda: directory.__dict__.pop("commit_manifest", None))
        return backend


def install(controller: Any, **plan: Any) -> Injector:
    return Injector(**plan).install(controller)


def fill_filesystem(root: str) -> str:
    """Write zeros to ``root/ballast.fill`` until the filesystem is full (a real ENOSPC)."""
    path = os.path.join(root, BALLAST)
    block = b"\0" * (1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno not in (_errno.ENOSPC, _errno.EFBIG):
                    raise
                block = block[: len(block) // 2]
                if not block:
                    break
    finally:
        os.close(fd)
    return path


# -- assertions shared by the reliability tests ------------------------------------------------------
DATA_SUFFIXES = (".bin", ".zarr")


def data_entries(root) -> list[str]:
    """Data files/arrays (not owner/manifest metadata) in every writer directory under ``root``."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        found += [os.path.join(dirpath, n) for n in dirs + files if n.endswith(DATA_SUFFIXES)]
    return sorted(found)


def writer_dirs(root) -> list[str]:
    try:
        return sorted(e.path for e in os.scandir(root) if e.name.startswith("ntier-"))
    except FileNotFoundError:
        return []


def assert_resident(engine: Any, before: dict, scratch: bool = True) -> None:
    """Every state is where it was: same buffers (none freed), same bytes, status 'device'.

    ``scratch=False`` skips the contents of the contiguous grad buffer, which a successful cycle
    discards (zeroed on reload) by design.
    """
    from conftest import snapshot

    import nvme_tier
    from nvme_tier.types import OffloadPhase

    controller = nvme_tier.controller_of(engine)
    assert controller.phase is OffloadPhase.resident, controller.phase
    assert not controller._placed
    now = snapshot(engine)
    assert sorted(now) == sorted(before), "a state buffer was freed or lost"
    for name, data in before.items():
        if not scratch and name.startswith("contiguous_grad_buffer"):
            continue
        assert torch.equal(data, now[name]), (
            f"{name} changed: {(data != now[name]).sum().item()} of {data.numel()} bytes"
        )
    assert all(e.tier == "device" for e in nvme_tier.offload_status(engine).values())


@contextlib.contextmanager
def mounted(where, fstype: str = "tmpfs", options: str = "size=1M"):
    """A real small filesystem at ``where`` (tmpfs/ramfs); skips the test when mounting is not permitted."""
    import pytest

    os.makedirs(where, exist_ok=True)
    cmd = ["mount", "-t", fstype, "-o", options, fstype, str(where)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"mounting a {fstype} is not permitted here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield str(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


TWIN_PLAN = ((2, 1), (2, 2), (1, 3))  # (steps, seed) before the fault, after it, after a good cycle


def assert_twin(engine_kwargs: dict, losses: list[float], weights: list[torch.Tensor]) -> None:
    """A never-offloaded twin, run afterwards on the same batches, ends bit-identical."""
    from conftest import make_engine, params_of, train

    twin = make_engine(**{**engine_kwargs, "path": None})
    twin_losses: list[float] = []
    for steps, seed in TWIN_PLAN:
        twin_losses += train(twin, steps, seed=seed)
    assert losses == twin_losses
    for a, b in zip(weights, params_of(twin), strict=True):
        assert torch.equal(a, b)
