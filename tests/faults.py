"""Fault injection around a REAL storage backend: fail, fill the disk or hang at the k-th write.

The faults themselves are ``nvme_tier.testing.faults`` (a wrapper around the real backend, which
writes real files); this module installs them on a controller and holds the assertions the
reliability tests share::

    inj = faults.install(nvme_tier.controller_of(engine), fail_at=2, errno=errno.EIO)
    engine.offload_states()   # the 2nd tensor write fails
    inj.remove()
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

import torch

from nvme_tier.testing.faults import BALLAST as BALLAST  # re-exported: the tests import it from here
from nvme_tier.testing.faults import FaultPlan
from nvme_tier.testing.faults import fill_filesystem as fill_filesystem


@dataclass
class Injector(FaultPlan):
    """A ``FaultPlan`` installed on a controller, plus host-copy faults (the mover's, not a backend's).

    Storage faults come from ``nvme_tier.testing.faults.FaultInjectingBackend``, served by the
    controller's mover through ``TierMover.wrap_backend``. ``fail_at`` counts tensor writes from 1.
    """

    copy_fail_at: int | None = None  # the k-th device->host copy raises ``copy_exc``
    copy_exc: type[BaseException] = RuntimeError
    copies: int = 0
    _undo: list = field(default_factory=list)

    # -- installation ----------------------------------------------------------------------------
    def install(self, controller: Any) -> Injector:
        mover = controller._mover
        self._undo.append(mover.wrap_backend(self.wrap))
        if self.copy_fail_at is not None:
            copier = mover._copier
            real_copy = copier.copy_async  # copy() goes through it too

            def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
                self.copies += 1
                if self.due(self.copies, self.copy_fail_at):
                    raise self.copy_exc(f"injected fault in host copy #{self.copies}")
                real_copy(dst, src)

            copier.copy_async = copy
            self._undo.append(lambda: copier.__dict__.pop("copy_async", None))
        return self

    def remove(self) -> None:
        """Serve the real backend again, unpatch the copier; the backend keeps working normally."""
        while self._undo:
            self._undo.pop()()


def install(controller: Any, **plan: Any) -> Injector:
    return Injector(**plan).install(controller)


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
    from helpers import snapshot

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
    from helpers import make_engine, params_of, train

    twin = make_engine(**{**engine_kwargs, "path": None})
    twin_losses: list[float] = []
    for steps, seed in TWIN_PLAN:
        twin_losses += train(twin, steps, seed=seed)
    assert losses == twin_losses
    for a, b in zip(weights, params_of(twin), strict=True):
        assert torch.equal(a, b)
