"""Errors knowable at attach arrive at attach (not an hour later at the first offload), and the
upstream call arguments are checked for type, not truthiness.

One real engine serves the module; every refusal leaves it unattached and its states untouched.
"""

from __future__ import annotations

import logging
import os

import pytest
from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum
from faults import assert_resident, mounted, writer_dirs
from helpers import make_engine, snapshot, train

import nvme_tier
from nvme_tier import mounts
from nvme_tier.errors import ConfigError, NvmeTierError


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
    now = snapshot(engine)
    assert sorted(now) == sorted(snap)


def attached(engine, **block):
    return nvme_tier.attach(engine, {"progress": False, "backend": "zarr", **block})


def refused_at_attach(engine, before, *needles, **block) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        attached(engine, **block)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    with pytest.raises(NvmeTierError, match="not attached"):
        nvme_tier.controller_of(engine)
    return err.value


# -- offload_states.path ---------------------------------------------------------------------------
def test_nvme_without_path(engine, before):
    refused_at_attach(engine, before, "offload_states.path is required", "optim_states", device="nvme")
    refused_at_attach(
        engine,
        before,
        "offload_states.path is required",
        "hp_params",
        device="cpu",
        policy={"hp_params": "nvme"},
    )
    attached(engine, device="cpu")  # the CPU path needs no disk
    engine.offload_states()
    engine.reload_states()
    assert_resident(engine, before, scratch=False)


def test_no_optimizer_needs_no_path():
    """A reference model has no optimizer states: the nvme policy puts nothing on disk, no path needed."""
    ref = make_engine(3, None, optimizer=None)
    nvme_tier.attach(ref, {"device": "nvme", "progress": False})
    ref.offload_states()
    assert nvme_tier.offload_status(ref)["lp_params"].tier == "pinned_cpu"
    ref.reload_states()
    nvme_tier.detach(ref)


def test_path_is_a_file(engine, before, tmp_path):
    target = tmp_path / "a_file"
    target.write_bytes(b"precious")
    refused_at_attach(engine, before, "offload_states.path", repr(str(target)), "is a file", path=str(target))
    assert target.read_bytes() == b"precious"


def test_path_below_a_file(engine, before, tmp_path):
    parent = tmp_path / "a_file"
    parent.write_bytes(b"precious")
    target = parent / "sub" / "deeper"
    refused_at_attach(
        engine,
        before,
        "offload_states.path",
        repr(str(target)),
        f"{str(parent)!r} is a file",
        path=str(target),
    )
    assert parent.read_bytes() == b"precious"


def test_missing_parent_is_not_created(engine, before, tmp_path):
    target = tmp_path / "no" / "such" / "dir"
    refused_at_attach(
        engine,
        before,
        "offload_states.path",
        repr(str(target)),
        f"parent {str(tmp_path / 'no' / 'such')!r} does not exist",
        path=str(target),
    )
    assert not (tmp_path / "no").exists()


def test_missing_leaf_is_created_at_attach(engine, before, tmp_path):
    target = tmp_path / "fresh"
    attached(engine, path=str(target))
    assert target.is_dir() and (target.stat().st_mode & 0o777) == 0o700
    engine.offload_states()
    assert nvme_tier.offload_status(engine)["optim_states"].tier == "nvme"
    engine.reload_states()
    assert_resident(engine, before, scratch=False)


@pytest.mark.parametrize("below", [False, True], ids=["mountpoint", "below"])
def test_read_only_path(engine, before, tmp_path, below):
    with mounted(tmp_path / "ro", "tmpfs", "ro,size=1M") as ro:
        target = os.path.join(ro, "sub") if below else ro
        why = "Read-only file system" if below else "not writable"
        refused_at_attach(engine, before, "offload_states.path", repr(target), why, path=target)
        assert os.listdir(ro) == []


def test_attach_logs_filesystem_once(engine, before, tmp_path, caplog):
    mount = mounts.mount_of(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="nvme_tier"):
        attached(engine, path=str(tmp_path))
        nvme_tier.detach(engine)
        attached(engine, path=str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if "filesystem" in r.getMessage()]
    assert len(lines) == 1, lines
    assert mount.fs_type in lines[0] and mount.source in lines[0] and mount.mount_point in lines[0]
    assert repr(str(tmp_path)) in lines[0]


def test_attach_warns_on_ram_filesystem(engine, before, tmp_path, caplog):
    with mounted(tmp_path / "ram dir", "tmpfs", "size=4M") as ram:
        with caplog.at_level(logging.INFO, logger="nvme_tier"):
            attached(engine, path=ram)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("tmpfs" in w and "RAM" in w for w in warnings), warnings
        nvme_tier.detach(engine)


# -- mounts.mount_of -------------------------------------------------------------------------------
def test_mount_of_root_and_nested(tmp_path):
    root = mounts.mount_of("/")
    assert root.mount_point == "/" and root.fs_type
    here = mounts.mount_of(str(tmp_path / "not" / "yet"))  # a path that does not exist yet
    assert os.path.ismount(here.mount_point)
    assert str(tmp_path).startswith(here.mount_point)


def test_mount_of_escaped_mount_point(tmp_path):
    """/proc/self/mountinfo escapes spaces as \\040: the mount point comes back as typed."""
    with mounted(tmp_path / "with space", "tmpfs", "size=1M") as where:
        info = mounts.mount_of(os.path.join(where, "x"))
        assert info == mounts.MountInfo(where, "tmpfs", "tmpfs")
        assert info.not_a_disk


# -- the call's arguments --------------------------------------------------------------------------
@pytest.mark.parametrize("include", ["optim_states", OffloadStateTypeEnum.optim_states])
def test_single_include_is_one_state(engine, before, tmp_path, include):
    attached(engine, path=str(tmp_path))
    engine.offload_states(include=include)
    status = nvme_tier.offload_status(engine)
    assert status["optim_states"].tier == "nvme"
    assert all(e.tier == "device" for k, e in status.items() if k != "optim_states"), status
    engine.reload_states()
    assert_resident(engine, before, scratch=False)


@pytest.mark.parametrize(
    "call, kwargs, culprit",
    [
        ("offload_states", {"non_blocking": "no"}, "non_blocking"),
        ("offload_states", {"non_blocking": 1}, "non_blocking"),
        ("offload_states", {"pin_memory": "yes"}, "pin_memory"),
        ("reload_states", {"non_blocking": "no"}, "non_blocking"),
    ],
)
def test_flags_must_be_bool(engine, before, tmp_path, call, kwargs, culprit):
    attached(engine, path=str(tmp_path))
    if call == "reload_states":
        engine.offload_states()
    with pytest.raises(ConfigError, match=f"{culprit} must be True or False, got {kwargs[culprit]!r}"):
        getattr(engine, call)(**kwargs)
    if call == "reload_states":
        assert nvme_tier.offload_status(engine)["optim_states"].tier == "nvme"
        engine.reload_states()
    assert_resident(engine, before, scratch=False)
    assert call == "reload_states" or writer_dirs(tmp_path) == []


def test_path_not_writable_by_permissions(engine, before, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root from writing (read-only mounts are tested)")
    target = tmp_path / "locked"
    target.mkdir(mode=0o500)
    try:
        refused_at_attach(
            engine, before, "offload_states.path", repr(str(target)), "not writable", path=str(target)
        )
    finally:
        target.chmod(0o700)


# -- `nvme-tier check` gives attach's verdict ------------------------------------------------------
def _bad_input(case: str, tmp_path, stack) -> tuple[dict, bool]:
    """(the DeepSpeed config's top-level keys for nvme_tier, whether attach accepts it) for ``case``."""
    base = {"progress": False, "backend": "zarr"}
    if case == "missing parent":
        return {"offload_states": {**base, "path": str(tmp_path / "no" / "such" / "dir")}}, False
    if case == "missing leaf":
        return {"offload_states": {**base, "path": str(tmp_path / "fresh")}}, True
    if case == "nvme without path":
        return {"offload_states": {**base, "device": "nvme"}}, False
    if case == "cpu without path":
        return {"offload_states": {**base, "device": "cpu"}}, True
    if case == "misspelled block":
        return {"offload_state": {**base, "path": str(tmp_path)}}, False
    if case == "absent block":
        return {}, False  # the defaults put optimizer states on nvme, and there is no path
    if case == "path is a file":
        (tmp_path / "file").write_text("x")
        return {"offload_states": {**base, "path": str(tmp_path / "file")}}, False
    if case == "under /proc":
        return {"offload_states": {**base, "path": "/proc/nvme_tier_x"}}, False
    if case == "read-only":
        ro = stack.enter_context(mounted(tmp_path / "ro", "tmpfs", "ro,size=1M"))
        return {"offload_states": {**base, "path": os.path.join(ro, "sub")}}, False
    raise AssertionError(case)


AGREEMENT_CASES = [
    "missing parent",
    "missing leaf",
    "nvme without path",
    "cpu without path",
    "misspelled block",
    "absent block",
    "path is a file",
    "under /proc",
    "read-only",
]


@pytest.mark.parametrize("case", AGREEMENT_CASES)
def test_check_and_attach_give_the_same_verdict(engine, before, tmp_path, monkeypatch, case, capsys):
    """`check --config` exits 0 exactly when attach (reading the engine's config) accepts the file."""
    import contextlib
    import json

    from nvme_tier import cli

    with contextlib.ExitStack() as stack:
        keys, accepted = _bad_input(case, tmp_path, stack)
        config_file = tmp_path / "ds_config.json"
        config_file.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, **keys}))
        params = dict(engine._config._param_dict)
        params.pop("offload_states", None)
        monkeypatch.setattr(engine._config, "_param_dict", {**params, **keys})

        leaf_existed = os.path.exists(tmp_path / "fresh")
        code = cli.main(["check", "--config", str(config_file)])
        out = capsys.readouterr()
        assert (tmp_path / "fresh").exists() == leaf_existed  # check leaves no directory behind
        if accepted:
            assert code == 0, out.out + out.err
            nvme_tier.attach(engine)
        else:
            assert code != 0, out.out
            with pytest.raises(ConfigError) as err:
                nvme_tier.attach(engine)
            shown = out.out + out.err
            if case == "misspelled block":
                assert "'offload_state'" in str(err.value) and "'offload_state'" in shown
                assert "path is required" not in str(err.value)
            if case == "absent block":
                assert "no 'offload_states' block" in str(err.value), str(err.value)
            if "[FAIL]" in out.out:
                assert "fix:" in out.out.split("[FAIL]", 1)[1], out.out


@pytest.mark.parametrize("non_blocking", [True, False])
def test_attach_with_another_config_while_offloaded_says_what_to_do(offload_dir, non_blocking):
    """Issue 23: attach(engine, other_cfg) during a non-blocking offload was refused with a message
    about detach(). It names attach, waiting for the operation in flight and reload_states; the old
    attachment stays and works."""
    from nvme_tier.errors import StatesOffloadedError

    eng = make_engine(1, offload_dir, backend="zarr")
    controller = nvme_tier.attach(eng)
    train(eng, 1)
    before = snapshot(eng)
    eng.offload_states(non_blocking=non_blocking)
    other = {**controller.config.model_dump(), "checksum": not controller.config.checksum}
    with pytest.raises(StatesOffloadedError) as err:
        nvme_tier.attach(eng, other)
    message = str(err.value)
    assert "attach(" in message and "detach()" not in message, message
    assert "nvme_tier.wait(engine)" in message and "reload_states()" in message, message
    assert nvme_tier.controller_of(eng) is controller
    eng.reload_states()
    assert_resident(eng, before, scratch=False)
    assert nvme_tier.attach(eng, other) is not controller  # once resident, the new config is taken
    nvme_tier.detach(eng)
