"""Bad input raises a typed error that names the culprit (and what is allowed) BEFORE anything moves.

One real engine serves the whole module: every case attaches its config, provokes the error, and
then checks that every state buffer is still allocated with the same bytes and that nothing was
written to disk. Paths are real: a file, a file used as a parent, a read-only mount, a 1 MiB
tmpfs, a filesystem without O_DIRECT.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil

import pytest
import torch
from faults import assert_resident, mounted, writer_dirs
from helpers import make_engine, requires_aio, snapshot, train

import nvme_tier
from nvme_tier.errors import ConfigError, NvmeTierError, TierIOError
from nvme_tier.storage import supports_o_direct


@pytest.fixture(scope="module")
def engine():
    eng = make_engine(3, None)
    train(eng, 2)
    return eng


@pytest.fixture
def before(engine):
    snap = snapshot(engine)
    yield snap
    nvme_tier.detach(engine)


def attached(engine, **block):
    return nvme_tier.attach(engine, {"progress": False, **block})


def assert_unmoved(engine, before: dict) -> None:
    """States untouched, whether or not a controller is attached."""
    now = snapshot(engine)
    assert sorted(now) == sorted(before)
    assert all(torch.equal(v, now[k]) for k, v in before.items())


# -- the config block: refused at attach ------------------------------------------------------------
@pytest.mark.parametrize(
    "block, culprit, allowed",
    [
        ({"device": "gpu"}, "offload_states.device", "'nvme', 'cpu' or 'auto'"),
        ({"backend": "spdk"}, "offload_states.backend", "'auto', 'aio' or 'zarr'"),
        ({"policy": {"optim_states": "tape"}}, "offload_states.policy.optim_states", "'pinned_cpu', 'nvme'"),
        ({"policy": {"moments": "nvme"}}, "moments", "'optim_states', 'hp_params'"),
        ({"include": ["moments"]}, "offload_states.include.0", "'lp_grads'"),
        ({"devise": "nvme"}, "offload_states.devise: unknown key", "allowed: device, path"),
        ({"aio": {"depth": 8}}, "offload_states.aio.depth: unknown key", "allowed: block_size, queue_depth"),
        ({"policy": {"optim_states": "discard"}}, "policy.optim_states", "would lose data"),
        ({"policy": {"hp_params": "discard"}}, "policy.hp_params", "only 'contiguous_grad_buffer'"),
        ({"staging_budget_mb": 1}, "offload_states.staging_budget_mb", "greater than or equal to 2"),
        ({"path": "bad\x00path"}, "offload_states.path", "NUL"),
    ],
)
def test_bad_config_refused_at_attach(engine, before, block, culprit, allowed):
    with pytest.raises(ConfigError) as err:
        attached(engine, **block)
    assert culprit in str(err.value) and allowed in str(err.value), str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(NvmeTierError, match="not attached"):
        nvme_tier.controller_of(engine)
    assert_unmoved(engine, before)


def test_bad_config_keeps_the_previous_attachment(engine, before, tmp_path):
    controller = attached(engine, path=str(tmp_path), backend="zarr")
    with pytest.raises(ConfigError):
        attached(engine, backend="spdk")
    assert nvme_tier.controller_of(engine) is controller
    assert_resident(engine, before)


# -- the call's arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        ({"device": "gpu"}, "unknown offload device 'gpu' (allowed: nvme, cpu, none)"),
        ({"include": ["moments"]}, "unknown state 'moments' (allowed: optim_states, hp_params"),
    ],
)
def test_bad_call_arguments(engine, before, tmp_path, kwargs, culprit):
    attached(engine, path=str(tmp_path), backend="zarr")
    with pytest.raises(ConfigError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        engine.offload_states(**kwargs)
    assert_resident(engine, before)
    assert writer_dirs(tmp_path) == []


# -- paths ----------------------------------------------------------------------------------------
def offload_refused(engine, before, exc_type, path, *needles, **block):
    attached(engine, path=str(path), **{"backend": "zarr", **block})
    with pytest.raises(exc_type) as err:
        engine.offload_states()
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    assert_resident(engine, before)
    return err.value


# A missing path, a file, a path below a file, a missing parent, a read-only or unwritable
# directory are refused at attach: tests/test_attach_checks.py.


def test_too_little_free_space(engine, before, tmp_path):
    with mounted(tmp_path / "tiny", "tmpfs", "size=1M") as tiny:
        target = os.path.join(tiny, "offload")
        err = offload_refused(engine, before, TierIOError, target, repr(target), "needs", "KiB", "free")
        assert err.errno == errno.ENOSPC
        assert writer_dirs(target) == []


def no_o_direct_dir(tmp_path):
    """/dev/shm when its tmpfs lacks O_DIRECT (kernels < 6.6), else a ramfs mount (never has it)."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) and not supports_o_direct("/dev/shm"):
        return contextlib.nullcontext("/dev/shm")
    return mounted(tmp_path / "ramfs", "ramfs", "mode=0700")


@requires_aio
@pytest.mark.aio
def test_aio_without_o_direct_is_refused_auto_falls_back(engine, before, tmp_path, caplog):
    with no_o_direct_dir(tmp_path) as base:
        target = os.path.join(base, f"ntier-test-{os.getpid()}")
        try:
            offload_refused(
                engine, before, ConfigError, target, repr(target), "O_DIRECT", "'auto'/'zarr'", backend="aio"
            )
            assert writer_dirs(target) == []
            nvme_tier.detach(engine)
            with caplog.at_level(logging.WARNING, logger="nvme_tier"):
                controller = attached(engine, path=target, backend="auto")
                engine.offload_states()
            assert controller.site.backend_name == "zarr"
            assert any(
                "falls back to zarr" in r.getMessage() and "O_DIRECT" in r.getMessage()
                for r in caplog.records
            )
            assert nvme_tier.offload_status(engine)["optim_states"].tier == "nvme"
            engine.reload_states()
            assert_resident(engine, before, scratch=False)
        finally:
            nvme_tier.detach(engine)
            if base == "/dev/shm":
                shutil.rmtree(target, ignore_errors=True)
