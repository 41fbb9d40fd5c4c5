"""What a new user meets in the first hour: where the offload path really is, DeepSpeed's noise."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_engine, train

import nvme_tier
from nvme_tier import mounts

SHM = Path("/dev/shm")
requires_shm = pytest.mark.skipif(
    not (SHM.is_dir() and os.access(SHM, os.W_OK)), reason="no writable /dev/shm (tmpfs) here"
)


@pytest.fixture
def shm_path():
    path = SHM / f"nvme_tier_test_{os.getpid()}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@requires_shm
def test_offload_path_on_tmpfs_is_logged_once(shm_path, monkeypatch, caplog):
    monkeypatch.setattr(mounts, "_warned_mounts", set())
    engines = [make_engine(2, shm_path, backend="zarr") for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="nvme_tier"):
        for engine in engines:
            nvme_tier.attach(engine)
            train(engine, 1)
            for _ in range(2):
                engine.offload_states()
                engine.reload_states()
            nvme_tier.release(engine)
    warned = [r.getMessage() for r in caplog.records if "RAM, not a disk" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "tmpfs at /dev/shm" in warned[0] and str(shm_path) in warned[0]
