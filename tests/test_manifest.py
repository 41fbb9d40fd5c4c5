"""Unit tests of storage/manifest.py: writer identity and liveness, scanning and cleaning writer
directories, tensor-name checks and the atomic JSON write the manifest relies on."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import subprocess
import sys

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvme_tier.errors import ConfigError, IntegrityError, TierIOError
from nvme_tier.storage.manifest import (
    MANIFEST_FILE,
    OWNER_FILE,
    OwnerInfo,
    TensorRecord,
    WriterDirectory,
    check_name,
)
from nvme_tier.storage.safe_files import atomic_write_json, read_json
from nvme_tier.storage.stale_writers import clean_writers, scan_writers


@pytest.fixture(scope="module")
def dead_owner() -> OwnerInfo:
    """The identity of a process that ran, was seen alive, and has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        started = psutil.Process(proc.pid).create_time()
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    me = OwnerInfo.current(label="dead")
    token = me.writer_id.rsplit("-", 2)[-2]
    return dataclasses.replace(
        me,
        writer_id=f"ntier-{socket.gethostname()}-{proc.pid}-{token}-r0",
        pid=proc.pid,
        pid_start=started,
    )


# -- OwnerInfo.is_alive ------------------------------------------------------------------------------
def test_current_process_is_alive():
    me = OwnerInfo.current(rank=3, label="x")
    assert me.pid == os.getpid() and me.rank == 3 and me.writer_id.endswith("-r3")
    assert me.is_alive()


def test_finished_subprocess_is_stale(dead_owner):
    if psutil.pid_exists(dead_owner.pid):  # the pid was recycled already: then start times differ
        assert psutil.Process(dead_owner.pid).create_time() != dead_owner.pid_start
    assert not dead_owner.is_alive()


def test_recycled_pid_is_stale():
    me = OwnerInfo.current()
    assert not dataclasses.replace(me, pid_start=me.pid_start - 3600).is_alive()


def test_other_host_counts_as_alive(dead_owner):
    assert dataclasses.replace(dead_owner, host="some-other-node.example").is_alive()


def test_writer_ids_are_unique():
    assert len({OwnerInfo.current().writer_id for _ in range(50)}) == 50


# -- scan_writers / clean_writers --------------------------------------------------------------------
def make_writer(root, owner: OwnerInfo, payload: bytes = b"x" * 1000, commit: bool = False) -> str:
    directory = WriterDirectory(str(root), owner)
    directory.create()
    with open(os.path.join(directory.path, "data.bin"), "wb") as fh:
        fh.write(payload)
    if commit:
        directory.commit_manifest({})
    if owner.pid != os.getpid():
        directory._close_fds()  # a dead writer's flock went with its process
    return directory.path


def test_scan_reports_live_and_stale(tmp_path, dead_owner):
    live = make_writer(tmp_path, OwnerInfo.current(), commit=True)
    stale = make_writer(tmp_path, dead_owner, payload=b"y" * 5000)
    (tmp_path / "not-a-writer").mkdir()
    (tmp_path / "ntier-a-file").write_text("user data")
    seen = {w.path: w for w in scan_writers(str(tmp_path))}
    assert set(seen) == {live, stale}
    assert seen[live].live and not seen[stale].live
    assert seen[live].committed and not seen[stale].committed
    assert seen[stale].bytes >= 5000
    assert seen[stale].owner == dead_owner
    assert seen[live].age_s >= 0


def test_clean_removes_stale_keeps_live(tmp_path, dead_owner):
    live = make_writer(tmp_path, OwnerInfo.current())
    stale = make_writer(tmp_path, dead_owner)
    other = tmp_path / "checkpoints"
    other.mkdir()
    removed = clean_writers(str(tmp_path))
    assert [w.path for w in removed] == [stale]
    assert not os.path.exists(stale)
    assert os.path.isdir(live) and other.is_dir()
    assert clean_writers(str(tmp_path)) == []  # idempotent


def test_clean_include_live_removes_live_too(tmp_path, dead_owner):
    live = make_writer(tmp_path, OwnerInfo.current())
    stale = make_writer(tmp_path, dead_owner)
    removed = {w.path for w in clean_writers(str(tmp_path), include_live=True)}
    assert removed == {live, stale}
    assert not os.path.exists(live) and not os.path.exists(stale)
    assert os.path.isdir(tmp_path)


def test_unreadable_owner_counts_as_live(tmp_path):
    path = make_writer(tmp_path, OwnerInfo.current())
    with open(os.path.join(path, OWNER_FILE), "w") as fh:
        fh.write("{not json")
    (info,) = scan_writers(str(tmp_path))
    assert info.live and info.owner is None
    assert clean_writers(str(tmp_path)) == []
    assert os.path.isdir(path)


def test_scan_of_a_missing_root_is_empty(tmp_path):
    assert list(scan_writers(str(tmp_path / "nope"))) == []
    assert clean_writers(str(tmp_path / "nope")) == []


def test_symlinked_writer_dir_is_never_followed(tmp_path, dead_owner):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(victim, root / dead_owner.writer_id)
    assert list(scan_writers(str(root))) == []
    clean_writers(str(root), include_live=True)
    assert (victim / "precious").read_text() == "keep"


# -- WriterDirectory ---------------------------------------------------------------------------------
def test_writer_directory_is_private_and_owned(tmp_path):
    owner = OwnerInfo.current()
    directory = WriterDirectory(str(tmp_path / "new root"), owner)
    assert not os.path.exists(directory.root)  # constructor does no I/O
    directory.create()
    directory.create()  # idempotent
    assert stat.S_IMODE(os.stat(directory.path).st_mode) == 0o700
    assert OwnerInfo(**read_json(directory.file_path(OWNER_FILE))) == owner
    record = TensorRecord("a", "a.bin", 10, "uint8", (10,), 4096, (123,))
    directory.commit_manifest({"a": record})
    assert directory.load_manifest() == {"a": record}
    assert stat.S_IMODE(os.stat(directory.file_path(MANIFEST_FILE)).st_mode) == 0o600
    stranger = WriterDirectory(str(tmp_path / "new root"), OwnerInfo.current())
    stranger.create()
    os.replace(directory.file_path(MANIFEST_FILE), stranger.file_path(MANIFEST_FILE))
    with pytest.raises(IntegrityError, match="belongs to writer"):
        stranger.load_manifest()
    directory.remove()
    assert not os.path.exists(directory.path) and os.path.isdir(stranger.path)


def test_tensor_record_json_round_trip():
    for rec in (
        TensorRecord("a", "a.bin", 10, "bfloat16", (5,), 4096, (1, 2)),
        TensorRecord("b", "", 0, "float32", (0, 3), 0, None),
        TensorRecord("c", "c.zarr", 8, "float64", (), 8, (7,)),
        TensorRecord("d", "d.bin", 8, "uint8", (8,), 8, (7,), fingerprint="0123456789abcdef" * 2),
    ):
        assert TensorRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec


def test_tensor_record_without_fingerprint_key_reads_as_none():
    """Manifests written before records had a fingerprint stay readable (then nothing is skipped)."""
    data = TensorRecord("a", "a.bin", 10, "uint8", (10,), 4096, (1,), fingerprint="ab").to_json()
    del data["fingerprint"]
    assert TensorRecord.from_json(data).fingerprint is None


def test_manifest_with_an_extra_key_per_record_still_loads(tmp_path):
    """Manifests of nvme_tier 0.1.0 hold an (always empty) "extra" object per record: ignored on load."""
    directory = WriterDirectory(str(tmp_path / "root"), OwnerInfo.current())
    directory.create()
    record = TensorRecord("a", "a.bin", 10, "uint8", (10,), 4096, (1,), fingerprint="ab")
    directory.commit_manifest({"a": record})
    path = directory.file_path(MANIFEST_FILE)
    data = read_json(path)
    assert "extra" not in data["records"]["a"]
    data["records"]["a"]["extra"] = {"k": "v"}
    with open(path, "w") as fh:
        json.dump(data, fh)
    assert directory.load_manifest() == {"a": record}
    directory.remove()


# -- check_name ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["..", "../x", "a/..", "a..b", "/", "a/b", "/etc/passwd", "", ".", ".hidden", "-x", "a b", "a\x00b",
     "x" * 129, "ü", None, 3],
)  # fmt: skip
def test_check_name_rejects(name):
    with pytest.raises(ConfigError) as info:
        check_name(name)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["a", "optim_states.0", "hp-params_1.bin", "A9", "x" * 128])
def test_check_name_accepts(name):
    assert check_name(name) == name


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_check_name_never_lets_a_path_through(name):
    try:
        check_name(name)
    except ConfigError:
        return
    assert "/" not in name and "\x00" not in name and ".." not in name and name not in ("", ".")
    assert os.path.basename(name) == name


# -- atomic_write_json ---------------------------------------------------------------------------
def test_atomic_write_json_writes_private_file(tmp_path):
    path = str(tmp_path / "m.json")
    atomic_write_json(path, {"a": 1, "b": [1, 2]})
    assert read_json(path) == {"a": 1, "b": [1, 2]}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    atomic_write_json(path, {"a": 2})
    assert read_json(path) == {"a": 2}
    assert os.listdir(tmp_path) == ["m.json"]  # no tmp file left behind


def test_atomic_write_json_failure_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "m.json")
    atomic_write_json(path, {"version": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"version": 2, "bad": object()})
    assert read_json(path) == {"version": 1}
    assert os.listdir(tmp_path) == ["m.json"]


def test_atomic_write_json_into_a_missing_directory(tmp_path):
    with pytest.raises(TierIOError) as info:
        atomic_write_json(str(tmp_path / "missing" / "m.json"), {})
    assert "missing" in str(info.value)


def test_read_json_refuses_symlinks_and_garbage(tmp_path):
    real = tmp_path / "real.json"
    real.write_text('{"a": 1}')
    os.symlink(real, tmp_path / "link.json")
    with pytest.raises(TierIOError):
        read_json(str(tmp_path / "link.json"))
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        read_json(str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(IntegrityError, match="not a JSON object"):
        read_json(str(tmp_path / "list.json"))
    with pytest.raises(IntegrityError, match="missing"):
        read_json(str(tmp_path / "nope.json"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_atomic_write_json_round_trips(tmp_path_factory, data):
    path = str(tmp_path_factory.mktemp("j") / "x.json")
    atomic_write_json(path, data)
    assert read_json(path) == data


# -- tampered metadata: typed errors, a truthful status (issue 23, item 6) -----------------------------
DEEP = '{"a": ' + "[" * 200_000 + "]" * 200_000 + "}"  # well below the 1 MiB metadata limit


def test_deeply_nested_json_is_an_integrity_error_naming_the_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text(DEEP)
    with pytest.raises(IntegrityError, match="deep.json") as info:
        read_json(str(path))
    assert info.value.filename == str(path) and "nested" in str(info.value)


def _committed_with_record(root) -> tuple[WriterDirectory, TensorRecord]:
    directory = WriterDirectory(str(root), OwnerInfo.current())
    directory.create()
    record = TensorRecord("a", "a.bin", 10, "uint8", (10,), 4096, (1,))
    directory.commit_manifest({"a": record})
    return directory, record


def test_manifest_nbytes_out_of_range_is_an_integrity_error(tmp_path):
    directory, _record = _committed_with_record(tmp_path / "root")
    path = directory.file_path(MANIFEST_FILE)
    with open(path) as fh:
        text = fh.read().replace('"nbytes": 10', '"nbytes": 1e400')
    assert "1e400" in text
    with open(path, "w") as fh:
        fh.write(text)
    with pytest.raises(IntegrityError, match="manifest.json") as info:
        directory.load_manifest()
    assert info.value.filename == path and "nbytes" in str(info.value)
    directory.remove()


@pytest.mark.parametrize("value", ["1e400", "-1", "true", '"10"', "1.5"])
def test_manifest_sizes_must_be_natural_numbers(tmp_path, value):
    directory, _record = _committed_with_record(tmp_path / "root")
    path = directory.file_path(MANIFEST_FILE)
    with open(path) as fh:
        text = fh.read().replace('"nbytes": 10', f'"nbytes": {value}')
    with open(path, "w") as fh:
        fh.write(text)
    with pytest.raises(IntegrityError, match="nbytes"):
        directory.load_manifest()
    directory.remove()


def test_deeply_nested_manifest_is_an_integrity_error(tmp_path):
    directory, _record = _committed_with_record(tmp_path / "root")
    with open(directory.file_path(MANIFEST_FILE), "w") as fh:
        fh.write(DEEP)
    with pytest.raises(IntegrityError, match="manifest.json"):
        directory.load_manifest()
    directory.remove()


def test_scan_status_and_clean_survive_a_deeply_nested_owner_json(tmp_path, dead_owner, capsys):
    """Another same-uid writer's owner.json nested deeply: status lists it (an unknown owner, so
    live: nothing unreadable is deleted), clean keeps it, nothing raises RecursionError."""
    from nvme_tier import cli

    path = make_writer(tmp_path, dead_owner)
    with open(os.path.join(path, OWNER_FILE), "w") as fh:
        fh.write(DEEP)
    (info,) = scan_writers(str(tmp_path))
    assert info.live and info.owner is None
    assert clean_writers(str(tmp_path)) == []
    assert cli.main(["status", str(tmp_path)]) == 0
    assert os.path.basename(path) in capsys.readouterr().out
    assert cli.main(["status", "--json", str(tmp_path)]) == 0
    (row,) = json.loads(capsys.readouterr().out)["writers"]
    assert row["state"] == "unknown owner"


def _damage_in_place(path: str) -> None:
    """What a writer SIGKILLed mid-rewrite leaves: the kept file partly overwritten in place."""
    with open(path, "r+b") as fh:
        fh.write(b"\xff" * 100)


def _damage_truncate(path: str) -> None:
    os.truncate(path, 10)


def _damage_remove(path: str) -> None:
    os.unlink(path)


@pytest.mark.parametrize("damage", [_damage_in_place, _damage_truncate, _damage_remove])
def test_status_tells_when_files_no_longer_match_the_manifest(tmp_path, damage, capsys):
    import torch

    from nvme_tier import cli
    from nvme_tier.storage import StorageBackend, ZarrStore

    root = str(tmp_path / "root")
    backend = StorageBackend(ZarrStore(WriterDirectory(root, OwnerInfo.current())))
    backend.write("a", torch.arange(50_000, dtype=torch.int32)).result()
    backend.commit()
    (info,) = scan_writers(root)
    assert info.committed
    damage(os.path.join(backend.directory.path, "a.zarr", "c", "0"))
    (info,) = scan_writers(root)
    assert not info.committed and "a.zarr" in info.note
    assert cli.main(["status", "--json", root]) == 0
    (row,) = json.loads(capsys.readouterr().out)["writers"]
    assert row["committed"] is False and "a.zarr" in row["note"]
    backend.release()
