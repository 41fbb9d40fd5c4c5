"""Whose files are these (issue 18): a forked child, a live writer in another PID namespace, a root
owned by someone else, a writer directory swapped between offloads, planted metadata, space this
writer already owns, a path near PATH_MAX.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from faults import assert_resident, writer_dirs
from helpers import make_engine, requires_aio, snapshot, train

import nvme_tier
import nvme_tier.storage.site as site_mod
from nvme_tier.errors import ConfigError, IntegrityError, TierIOError
from nvme_tier.storage import supports_o_direct
from nvme_tier.storage.manifest import (
    OWNER_FILE,
    OwnerInfo,
    WriterDirectory,
    ensure_root,
)
from nvme_tier.storage.safe_files import read_json
from nvme_tier.storage.stale_writers import clean_writers, scan_writers

BACKENDS = ["zarr", pytest.param("aio", marks=[requires_aio, pytest.mark.aio])]
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown files to another user")


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}


# -- 3: a forked child exits -----------------------------------------------------------------------
def _fork_and_exit_normally() -> int:
    """os.fork(); the child runs what a normal interpreter exit runs (atexit: weakref finalizers)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            atexit._run_exitfuncs()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forked_child_exit_keeps_the_parents_files(backend, offload_dir):
    engine = make_engine(1, offload_dir, backend=backend)
    nvme_tier.attach(engine)
    train(engine, 2)
    before = snapshot(engine)
    engine.offload_states()
    dirs = writer_dirs(offload_dir)
    assert len(dirs) == 1
    assert _fork_and_exit_normally() == 0
    assert writer_dirs(offload_dir) == dirs, "the child's exit removed the parent's writer directory"
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    nvme_tier.detach(engine)
    assert writer_dirs(offload_dir) == []  # the owner still cleans up


def test_forked_child_release_keeps_the_parents_directory(tmp_path):
    directory = WriterDirectory(str(tmp_path), OwnerInfo.current(rank=0, label="t"))
    directory.create()
    pid = os.fork()
    if pid == 0:
        try:
            directory.remove()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.isdir(directory.path)
    directory.remove()
    assert not os.path.exists(directory.path)


# -- 4: a live writer whose pid we cannot see (another PID namespace) -------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@contextlib.contextmanager
def writer_in_another_pid_namespace(root):
    """A live process holding its writer directory, whose owner.json (as seen from here) names a
    pid that is gone: what a writer in a container's PID namespace looks like to this process."""
    fake_pid = _dead_pid()
    code = (
        "import dataclasses, sys, socket, time\n"
        "from nvme_tier.storage.manifest import OwnerInfo, WriterDirectory\n"
        "me = OwnerInfo.current(rank=0, label='container')\n"
        f"pid = {fake_pid}\n"
        "token = me.writer_id.rsplit('-', 2)[-2]\n"
        "me = dataclasses.replace(me, pid=pid, pid_start=1.0,\n"
        "    writer_id=f'ntier-{socket.gethostname()}-{pid}-{token}-r0')\n"
        "d = WriterDirectory(sys.argv[1], me)\n"
        "d.create(); d.commit_manifest({})\n"
        "open(d.path + '/optim_states.0.bin', 'wb').write(b'live data')\n"
        "print(d.path, flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()


def test_live_writer_in_another_pid_namespace_is_not_cleaned(tmp_path):
    with writer_in_another_pid_namespace(tmp_path) as path:
        assert os.path.isdir(path)
        info = {w.path: w for w in scan_writers(str(tmp_path))}
        assert info[path].live, "a writer holding its lock was taken for stale"
        assert clean_writers(str(tmp_path)) == []
        assert os.path.isfile(os.path.join(path, "optim_states.0.bin"))
    # Its process is gone now: the lock went with it, and the pid is dead too.
    assert [w.path for w in clean_writers(str(tmp_path))] == [path]
    assert not os.path.exists(path)


def test_engine_offload_keeps_a_live_writer_of_another_pid_namespace(offload_dir):
    with writer_in_another_pid_namespace(offload_dir) as path:
        engine = make_engine(1, offload_dir, backend="zarr")
        nvme_tier.attach(engine)
        train(engine, 1)
        engine.offload_states()  # its stale scan must keep the other job's directory
        assert os.path.isfile(os.path.join(path, "optim_states.0.bin"))
        engine.reload_states()
        nvme_tier.detach(engine)


# -- 5: the root and the writer directory ---------------------------------------------------------
@as_root
def test_root_owned_by_another_user_is_refused(tmp_path):
    root = tmp_path / "shared"
    root.mkdir(mode=0o755)
    os.chown(root, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=r"owned by uid 65534"):
        ensure_root(str(root))


def test_root_writable_by_others_needs_the_sticky_bit(tmp_path):
    root = tmp_path / "scratch"
    root.mkdir()
    os.chmod(root, 0o777)
    with pytest.raises(ConfigError, match="sticky"):
        ensure_root(str(root))
    os.chmod(root, 0o1777)  # like /tmp
    ensure_root(str(root))


@as_root
def test_engine_refuses_a_root_owned_by_another_user(offload_dir):
    os.chown(offload_dir, NOBODY, NOBODY)
    engine = make_engine(1, offload_dir, backend="zarr")
    with pytest.raises(ConfigError, match="owned by uid"):  # known at attach: refused there
        nvme_tier.attach(engine)
    os.chown(offload_dir, 0, 0)
    nvme_tier.attach(engine)
    train(engine, 1)
    before = snapshot(engine)
    os.chown(offload_dir, NOBODY, NOBODY)  # handed to another user after attach
    with pytest.raises(ConfigError, match="owned by uid"):
        engine.offload_states()
    assert_resident(engine, before)
    nvme_tier.detach(engine)


@pytest.mark.parametrize("swap", ["symlink", "directory"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_writer_directory_swapped_between_offloads(backend, swap, offload_dir, tmp_path):
    """Someone renames the writer directory away and puts a symlink (to a directory only root may
    write) or a directory of their own in its place: nothing is written or read there."""
    engine = make_engine(1, offload_dir, backend=backend)
    controller = nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states()
    engine.reload_states()
    train(engine, 1, seed=2)  # changed: the next offload rewrites every file
    before = snapshot(engine)
    writer = controller._mover.backend.directory.path
    target = tmp_path / "root-only"
    target.mkdir(mode=0o700)
    os.rename(writer, str(tmp_path / "moved-away"))
    if swap == "symlink":
        os.symlink(target, writer)
    else:
        os.mkdir(writer, 0o700)
    with pytest.raises(TierIOError, match="replaced|gone") as err:
        engine.offload_states()
    assert writer in str(err.value)
    assert os.listdir(target) == []
    if swap == "directory":
        assert os.listdir(writer) == []
    assert_resident(engine, before)
    nvme_tier.detach(engine)


@pytest.mark.parametrize("backend", BACKENDS)
def test_writer_directory_swapped_before_reload_is_refused(backend, offload_dir, tmp_path):
    engine = make_engine(1, offload_dir, backend=backend)
    controller = nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states()
    writer = controller._mover.backend.directory.path
    moved = str(tmp_path / "moved-away")
    os.rename(writer, moved)
    shutil.copytree(moved, writer)  # same bytes, another directory (another inode)
    with pytest.raises(TierIOError, match="replaced"):
        engine.reload_states()
    shutil.rmtree(writer)
    os.rename(moved, writer)  # put the real one back: now a retried reload works
    engine.reload_states()
    nvme_tier.detach(engine)


# -- 5: planted metadata ----------------------------------------------------------------------------
def _planted_writer(root, owner_uid: int | None = None) -> str:
    path = os.path.join(str(root), f"ntier-{socket.gethostname()}-{_dead_pid()}-0123456789-r0")
    os.mkdir(path, 0o700)
    if owner_uid is not None:
        os.chown(path, owner_uid, owner_uid)
    return path


def _finishes(fn, timeout: float = 20.0):
    out: list = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "hung (blocked on a planted FIFO?)"
    return out[0]


@pytest.mark.parametrize("uid", [None, pytest.param(NOBODY, marks=as_root)], ids=["mine", "another-user"])
def test_planted_fifo_owner_json_does_not_hang_the_scan(tmp_path, uid):
    planted = _planted_writer(tmp_path)
    os.mkfifo(os.path.join(planted, OWNER_FILE))
    if uid is not None:
        os.chown(planted, uid, uid)
    seen = _finishes(lambda: {w.path: w for w in scan_writers(str(tmp_path))})
    if uid is None:
        assert seen[planted].live  # unreadable: nobody's to delete
    else:
        assert planted not in seen  # another user's directory is not ours to judge
    assert _finishes(lambda: clean_writers(str(tmp_path))) == []
    assert os.path.isdir(planted)


def test_planted_owner_json_directory_or_huge_file_is_harmless(tmp_path):
    as_dir = _planted_writer(tmp_path)
    os.mkdir(os.path.join(as_dir, OWNER_FILE))
    huge = _planted_writer(tmp_path)
    with open(os.path.join(huge, OWNER_FILE), "wb") as fh:
        fh.truncate(2 << 30)  # 2 GiB, sparse
    seen = _finishes(lambda: {w.path: w for w in scan_writers(str(tmp_path))})
    assert seen[as_dir].live and seen[huge].live
    for planted, what in ((as_dir, "directory"), (huge, "bytes")):
        path = os.path.join(planted, OWNER_FILE)
        with pytest.raises(IntegrityError, match=what) as err:
            read_json(path)
        assert path in str(err.value)


@as_root
def test_planted_fifo_does_not_hang_an_offload(offload_dir):
    planted = _planted_writer(offload_dir, owner_uid=NOBODY)
    os.mkfifo(os.path.join(planted, OWNER_FILE))
    os.chown(os.path.join(planted, OWNER_FILE), NOBODY, NOBODY)
    engine = make_engine(1, offload_dir, backend="zarr")
    nvme_tier.attach(engine)
    train(engine, 1)
    _finishes(engine.offload_states, timeout=300)
    engine.reload_states()
    nvme_tier.detach(engine)
    assert os.path.isdir(planted)


# -- 6: re-offload into space this writer already owns ---------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_reoffload_counts_its_own_files_as_free_space(backend, offload_dir, monkeypatch):
    engine = make_engine(1, offload_dir, backend=backend)
    controller = nvme_tier.attach(engine)
    train(engine, 2)
    engine.offload_states()
    engine.reload_states()  # files kept (skip_unchanged)
    stored = controller._mover.backend.stored_bytes()
    assert stored > 0
    train(engine, 1, seed=2)  # every state changed: the offload rewrites all of its files
    real = shutil.disk_usage(offload_dir)
    # The disk is full but for the margin: only the space of the files being replaced is left.
    full = real._replace(free=site_mod.FREE_SPACE_MARGIN)
    monkeypatch.setattr(site_mod.shutil, "disk_usage", lambda path: full)
    before = snapshot(engine)
    engine.offload_states()
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    nvme_tier.detach(engine)


@contextlib.contextmanager
def small_ext4(tmp_path, size_mb: int):
    """A real ext4 of ``size_mb`` (no root reserve) on a loop device; skips where that cannot be made."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("mkfs.ext4", "mount", "umount")):
        pytest.skip("needs root, mkfs.ext4 and mount")
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(size_mb << 20)

    def sh(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    if sh("mkfs.ext4", "-q", "-F", "-m", "0", str(image)).returncode:
        pytest.skip("cannot make an ext4 image here")
    mounted = sh("mount", "-o", "loop", str(image), str(mnt))
    if mounted.returncode:
        pytest.skip(f"cannot loop-mount an ext4 here: {mounted.stderr.strip()}")
    try:
        os.chmod(mnt, 0o700)
        yield mnt
    finally:
        sh("umount", "-l", str(mnt))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_reoffload_fits_on_a_real_small_filesystem(backend, tmp_path):
    """~35 MB of optimizer states on a 128 MB ext4: the second offload (after a step) rewrites
    them into the space they hold; counting only free space, it was refused."""
    with small_ext4(tmp_path, 128) as mnt:
        engine = make_engine(1, mnt, backend=backend, width=2048)
        controller = nvme_tier.attach(engine)
        train(engine, 1)
        engine.offload_states()
        engine.reload_states()
        stored = controller._mover.backend.stored_bytes()
        free = shutil.disk_usage(mnt).free
        assert free < stored + site_mod.FREE_SPACE_MARGIN, (free, stored)  # the old check refused
        train(engine, 1, seed=2)
        before = snapshot(engine)
        engine.offload_states()
        engine.reload_states()
        assert_resident(engine, before, scratch=False)
        nvme_tier.detach(engine)


# -- 7: a path near PATH_MAX ------------------------------------------------------------------------
def test_path_near_path_max_is_a_config_error(tmp_path):
    path = str(tmp_path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while len(path) < os.pathconf(str(tmp_path), "PC_PATH_MAX") - 25:
            name = "d" * min(200, os.pathconf(str(tmp_path), "PC_PATH_MAX") - 25 - len(path))
            os.mkdir(name, dir_fd=fd)
            new = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, path = new, os.path.join(path, name)
    finally:
        os.close(fd)
    with pytest.raises(ConfigError) as err:
        supports_o_direct(path)
    assert path in str(err.value)


def test_scan_leaves_no_fd_behind(tmp_path):
    for _ in range(3):
        _planted_writer(tmp_path)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        list(scan_writers(str(tmp_path)))
        clean_writers(str(tmp_path), dry_run=True)
    time.sleep(0.01)
    assert len(os.listdir("/proc/self/fd")) == before


def test_files_of_a_directory_without_held_fds_go_by_full_path(tmp_path, monkeypatch):
    """Never relative to the working directory (e.g. after the lock fds were given up)."""
    monkeypatch.chdir(tmp_path)
    directory = WriterDirectory(str(tmp_path / "root"), OwnerInfo.current(rank=0, label="t"))
    directory.create()
    directory._close_fds()
    os.close(directory.open("x.bin", write=True))
    assert os.path.isfile(os.path.join(directory.path, "x.bin")) and not os.path.exists("x.bin")
    directory.remove_file("x.bin")
    assert not os.path.exists(os.path.join(directory.path, "x.bin"))


def test_another_writers_deeply_nested_owner_json_does_not_fail_an_offload(offload_dir):
    """Issue 23: a same-uid writer's owner.json nested deeply made every engine's first NVMe offload
    on that root fail with RecursionError (the stale scan). It is an unreadable owner: kept, skipped."""
    planted = _planted_writer(offload_dir)
    with open(os.path.join(planted, OWNER_FILE), "w") as fh:
        fh.write('{"pid": ' + "[" * 200_000 + "]" * 200_000 + "}")
    engine = make_engine(1, offload_dir, backend="zarr")
    nvme_tier.attach(engine)
    train(engine, 1)
    before = snapshot(engine)
    engine.offload_states()
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    nvme_tier.detach(engine)
    assert os.path.isdir(planted)


# -- issue 23, item 1: never write through a file nvme_tier did not create ----------------------------
def kept_files(offload_dir, backend: str):
    """An attached ZeRO-1 engine after one step, one offload and one reload: its files kept on disk
    (skip_unchanged); returns it and its writer directory."""
    engine = make_engine(1, offload_dir, backend=backend)
    nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states()
    engine.reload_states()
    (writer,) = writer_dirs(offload_dir)
    return engine, writer


def _plant_hard_link(kept: str, outside) -> bytes:
    """Replace ``kept`` by a hard link to ``outside``, a file of the same size with other bytes."""
    payload = bytes(range(256)) * (os.path.getsize(kept) // 256 + 1)
    payload = payload[: os.path.getsize(kept)]
    outside.write_bytes(payload)
    os.unlink(kept)
    os.link(outside, kept)
    return payload


@requires_aio
@pytest.mark.aio
@pytest.mark.parametrize("changed", [True, False], ids=["state-changed", "state-unchanged"])
def test_hard_link_at_a_kept_file_is_never_written_through(changed, offload_dir, tmp_path):
    """A kept .bin replaced by a hard link to a file outside (same size): the next offload writes a
    new file of its own; the outside file keeps its bytes. (Before: rewritten in place, through it.)"""
    engine, writer = kept_files(offload_dir, "aio")
    outside = tmp_path / "outside.bin"
    payload = _plant_hard_link(os.path.join(writer, "optim_states.0.bin"), outside)
    if changed:
        train(engine, 1, seed=2)
    before = snapshot(engine)
    engine.offload_states()
    assert outside.read_bytes() == payload
    assert os.stat(outside).st_nlink == 1  # our name is a new file now
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    nvme_tier.detach(engine)


def _aio_backend_with_a_kept_file(tmp_path):
    import torch

    from nvme_tier.storage import AioStore, StorageBackend

    backend = StorageBackend(AioStore(WriterDirectory(str(tmp_path / "root"), OwnerInfo.current())))
    data = torch.arange(300_000, dtype=torch.int32)
    backend.write("a", data).result()
    return backend, data


@requires_aio
@pytest.mark.aio
def test_a_file_swapped_between_the_check_and_the_open_is_not_written_through(tmp_path):
    """The fd opened for an in-place rewrite is checked (fstat: same inode, one link) before a byte moves."""
    import torch

    backend, data = _aio_backend_with_a_kept_file(tmp_path)
    kept = backend.directory.file_path("a.bin")
    outside = tmp_path / "outside.bin"
    real_open = backend.store._open_for_rewrite
    planted: list[bytes] = []

    def swap_then_open(*args):  # the race: after _reusable's check, before the open
        planted.append(_plant_hard_link(kept, outside))
        return real_open(*args)

    backend.store._open_for_rewrite = swap_then_open
    backend.write("a", data + 1).result()
    assert planted and outside.read_bytes() == planted[0]
    out = torch.empty_like(data)
    backend.read_into("a", out).result()
    assert torch.equal(out, data + 1)
    backend.release()


@requires_aio
@pytest.mark.aio
def test_an_untouched_kept_file_is_still_rewritten_in_place(tmp_path):
    """The fast path stays: our own untouched file is rewritten in place (same inode, new stamp)."""
    backend, data = _aio_backend_with_a_kept_file(tmp_path)
    inode = os.stat(backend.directory.file_path("a.bin")).st_ino
    old_stamp = backend.record("a").stamps
    backend.write("a", data + 1).result()
    assert os.stat(backend.directory.file_path("a.bin")).st_ino == inode
    assert backend.record("a").stamps[0].ino == inode and backend.record("a").stamps != old_stamp
    assert backend.holds_written_bytes(backend.record("a"))
    backend.release()


@requires_aio
@pytest.mark.aio
def test_a_record_without_stamps_is_never_rewritten_in_place(tmp_path):
    """A record from a manifest written before stamps existed: its file is replaced, not reused."""
    import dataclasses

    backend, data = _aio_backend_with_a_kept_file(tmp_path)
    record = backend.record("a")
    assert record.stamps
    assert backend._reusable(record, data.numel() * 4) is not None
    assert backend._reusable(dataclasses.replace(record, stamps=None), data.numel() * 4) is None
    backend.release()


def test_manifest_tmp_hard_link_is_never_written_through(tmp_path):
    from nvme_tier.storage.safe_files import atomic_write_json

    outside = tmp_path / "outside.json"
    outside.write_text("theirs")
    (tmp_path / "d").mkdir()
    os.link(outside, tmp_path / "d" / "m.json.tmp")
    atomic_write_json(str(tmp_path / "d" / "m.json"), {"a": 1})
    assert outside.read_text() == "theirs"
    assert read_json(str(tmp_path / "d" / "m.json")) == {"a": 1}


def test_zarr_never_chmods_or_writes_a_hard_linked_file(offload_dir, tmp_path):
    """The writer directory's zarr.json (zarr's root group) replaced by a hard link to a file outside:
    neither its mode nor its bytes change at the next offload."""
    engine, writer = kept_files(offload_dir, "zarr")
    outside = tmp_path / "outside.json"
    outside.write_text('{"zarr_format": 3, "node_type": "group"}')
    os.chmod(outside, 0o644)
    for rel in ("zarr.json", "optim_states.0.zarr/c/0"):
        os.unlink(os.path.join(writer, rel))
        os.link(outside, os.path.join(writer, rel))
    train(engine, 1, seed=2)
    before = snapshot(engine)
    engine.offload_states()
    assert outside.read_text() == '{"zarr_format": 3, "node_type": "group"}'
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o644
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    nvme_tier.detach(engine)


SIGKILL_CHILD = r"""
import os, sys, time
sys.path.insert(0, os.path.join(os.environ["NVME_TIER_REPO"], "tests"))
from helpers import make_engine, train
import nvme_tier
import nvme_tier.deepspeed.aio_binding as ds

engine = make_engine(1, sys.argv[1], backend="aio", width=256)
nvme_tier.attach(engine)
train(engine, 1)
engine.offload_states()
engine.reload_states()
train(engine, 1, seed=2)
real = ds.aio_async_pwrite
def pwrite_then_stall(*args):  # the first chunk of the in-place rewrite lands, then SIGKILL
    done = real(*args)
    print("REWRITING", flush=True)
    time.sleep(600)
    return done
ds.aio_async_pwrite = pwrite_then_stall
engine.offload_states()
"""


@requires_aio
@pytest.mark.aio
@pytest.mark.multiproc
def test_status_after_a_sigkill_mid_rewrite_says_not_committed(offload_dir):
    """Issue 23: after a SIGKILL in the middle of an in-place rewrite, `nvme-tier status` called the
    directory "committed: yes" (the old manifest) though its files no longer match it."""
    import signal

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**child_env(), "NVME_TIER_REPO": repo}
    env.pop("MASTER_PORT", None)  # the child picks its own rendezvous port (ours may be in use)
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGKILL_CHILD, str(offload_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        for line in proc.stdout:
            if line.startswith("REWRITING"):
                break
        time.sleep(0.5)  # the op's threads finish writing the chunk
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    (info,) = scan_writers(str(offload_dir))
    assert not info.live
    assert not info.committed and "optim_states" in info.note, info
    assert os.path.exists(os.path.join(info.path, "manifest.json"))
