"""Several writers on one path, leftovers of killed processes, and what nvme_tier may touch.

* two engines in one process and two processes on one path each keep their own writer directory;
* a process SIGKILLed mid-offload leaves a directory that the next attach/offload (or scan/clean)
  recognises as stale and removes -- never a live process's files, never a stranger's files;
* files are 0600, directories 0700, a planted symlink is refused or removed, never followed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from faults import assert_resident, data_entries, writer_dirs
from helpers import make_engine, requires_aio, snapshot, train

import nvme_tier
from nvme_tier.errors import TierIOError
from nvme_tier.storage.manifest import OWNER_FILE, OwnerInfo
from nvme_tier.storage.stale_writers import clean_writers, scan_writers
from nvme_tier.types import OffloadPhase

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ["zarr", pytest.param("aio", marks=[requires_aio, pytest.mark.aio])]


def same_states(before: dict, after: dict) -> None:
    assert sorted(before) == sorted(after)
    for name, data in before.items():
        if not name.startswith("contiguous_grad_buffer"):  # scratch: discarded by design
            assert torch.equal(data, after[name]), name


# -- one process, two engines ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_engines_one_path(backend, offload_dir):
    a = make_engine(3, offload_dir, backend=backend, seed=0)
    b = make_engine(3, offload_dir, backend=backend, seed=1)
    snaps = {}
    for engine in (a, b):
        nvme_tier.attach(engine)
        train(engine, 2)
        snaps[id(engine)] = snapshot(engine)
        engine.offload_states()
    dirs = writer_dirs(offload_dir)
    assert len(dirs) == 2
    for engine in (b, a):
        engine.reload_states()
        same_states(snaps[id(engine)], snapshot(engine))
    nvme_tier.release(a)
    assert writer_dirs(offload_dir) == [nvme_tier.controller_of(b)._mover.backend.directory.path]
    train(b, 1)
    b.offload_states()
    b.reload_states()
    nvme_tier.detach(b)
    nvme_tier.detach(a)
    assert writer_dirs(offload_dir) == []


# -- two processes, then a SIGKILL mid-offload -----------------------------------------------------
CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from helpers import make_engine, snapshot, train
import faults, nvme_tier, torch

def say(*words):
    print("@@", *words, flush=True)

def expect(word):
    line = sys.stdin.readline().strip()
    assert line == word, (line, word)

engine = make_engine(3, sys.argv[2], backend=sys.argv[3], seed=7)
controller = nvme_tier.attach(engine)
train(engine, 2)
before = snapshot(engine)
engine.offload_states()
say("OFFLOADED", controller._mover.backend.directory.path)
expect("RELOAD")
engine.reload_states()
after = snapshot(engine)
ok = all(torch.equal(v, after[k]) for k, v in before.items() if not k.startswith("contiguous"))
say("RELOADED", "ok" if ok else "MISMATCH")
expect("HANG")
train(engine, 1)
faults.install(controller, fail_at=2, mode="hang")
engine.offload_states()  # writes optim_states.0, then hangs half-way through optim_states.1
say("NOT REACHED")
"""


class Child:
    """A second process with its own engine on the same path, driven line by line."""

    def __init__(self, path, backend: str, timeout: float = 180):
        env = dict(os.environ)
        env.pop("MASTER_PORT", None)
        env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, HERE, str(path), backend],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.log: list[str] = []
        self._watchdog = threading.Timer(timeout, self.proc.kill)
        self._watchdog.start()

    def read(self, word: str) -> str:
        """The rest of the line where the child says ``word`` (other output kept for failures)."""
        for line in self.proc.stdout:
            self.log.append(line)
            head, _, rest = line.rstrip("\n").partition(" ")
            if head == "@@" and rest.partition(" ")[0] == word:
                return rest.partition(" ")[2]
            if head == word == "HANGING":
                return rest
        raise AssertionError(f"child exited before {word!r}:\n" + "".join(self.log[-60:]))

    def send(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self._watchdog.cancel()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def live_stranger(root):
    """Another live process (no engine) that owns a committed writer directory under ``root``."""
    code = (
        "import sys, time\n"
        "from nvme_tier.storage.manifest import OwnerInfo, WriterDirectory\n"
        "d = WriterDirectory(sys.argv[1], OwnerInfo.current(rank=5, label='stranger'))\n"
        "d.create(); d.commit_manifest({})\n"
        "print(d.path, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_then_sigkill_mid_offload(backend, offload_dir):
    strangers_file = offload_dir / "not-ours.txt"
    strangers_file.write_text("user data")
    child = Child(offload_dir, backend)
    try:
        child_dir = child.read("OFFLOADED")
        # Meanwhile this process offloads to the same path: its clean_writers keeps the live child's files.
        engine = make_engine(3, offload_dir, backend=backend)
        controller = nvme_tier.attach(engine)
        train(engine, 2)
        before = snapshot(engine)
        engine.offload_states()
        mine = controller._mover.backend.directory.path
        assert mine != child_dir and os.path.isdir(child_dir)
        info = {w.path: w for w in scan_writers(str(offload_dir))}
        assert info[child_dir].live and info[mine].live
        child.send("RELOAD")
        assert child.read("RELOADED") == "ok"
        engine.reload_states()
        same_states(before, snapshot(engine))

        child.send("HANG")
        hanging_file = child.read("HANGING")
        assert hanging_file.startswith(child_dir)
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(timeout=30)
    finally:
        child.close()

    # What the killed process left: its directory, half a file, its old manifest.
    assert os.path.isdir(child_dir) and data_entries(child_dir)
    with live_stranger(offload_dir) as stranger_dir:
        info = {w.path: w for w in scan_writers(str(offload_dir))}
        assert not info[child_dir].live and info[child_dir].owner.pid == child.proc.pid
        assert info[mine].live and info[stranger_dir].live
        # The next attach/offload of a new engine cleans the stale directory, and only it.
        newcomer = make_engine(3, offload_dir, backend=backend, seed=3)
        nvme_tier.attach(newcomer)
        train(newcomer, 1)
        newcomer.offload_states()
        assert not os.path.exists(child_dir)
        assert os.path.isdir(mine) and os.path.isdir(stranger_dir)
        newcomer.reload_states()
        assert len(writer_dirs(offload_dir)) == 3  # mine, the stranger's, the newcomer's
        # Our own engine still reloads its files (kept for skip_unchanged) after the cleaning.
        engine.offload_states()
        assert controller.last_stats["offload"].bytes_skipped > 0
        engine.reload_states()
        same_states(before, snapshot(engine))
    assert strangers_file.read_text() == "user data"
    nvme_tier.detach(newcomer)
    nvme_tier.detach(engine)


# -- stale detection on crafted leftovers (no engine) ----------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_writer(root, pid: int, pid_start: float = 0.0, owner: bool = True, **override) -> str:
    """A writer directory named for ``pid`` on this host; owner.json fields can be overridden."""
    token = os.urandom(5).hex()
    writer_id = f"ntier-{socket.gethostname()}-{pid}-{token}-r0"
    path = os.path.join(root, writer_id)
    os.makedirs(path, mode=0o700)
    with open(os.path.join(path, "optim_states.0.bin"), "wb") as fh:
        fh.write(b"x" * 100)
    if owner:
        data = {
            "writer_id": writer_id,
            "host": socket.gethostname(),
            "pid": override.pop("owner_pid", pid),
            "pid_start": pid_start,
            "rank": 0,
            "created": time.time(),
            "label": "",
            **override,
        }
        with open(os.path.join(path, OWNER_FILE), "w") as fh:
            json.dump(data, fh)
    return path


def test_scan_and_clean_recognise_stale_writers(tmp_path):
    me = OwnerInfo.current()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits; not reaped until the end
    while _status(zombie.pid) != "zombie":  # (poll() would reap it)
        time.sleep(0.01)
    try:
        stale = {
            "dead pid": plant_writer(tmp_path, dead_pid()),
            "recycled pid": plant_writer(tmp_path, os.getpid(), pid_start=me.pid_start - 1000),
            "zombie": plant_writer(tmp_path, zombie.pid, pid_start=_start(zombie.pid)),
            "no owner.json, dead pid": plant_writer(tmp_path, dead_pid(), owner=False),
        }
        live = {
            "this process": plant_writer(tmp_path, os.getpid(), pid_start=me.pid_start),
            "other host": plant_writer(tmp_path, dead_pid(), host="elsewhere.example"),
            "no owner.json, live pid": plant_writer(tmp_path, os.getpid(), owner=False),
            "pid is a string": plant_writer(tmp_path, dead_pid(), owner_pid="123"),
            "unknown key": plant_writer(tmp_path, dead_pid(), extra=1),
            "owner.json copied from elsewhere": plant_writer(tmp_path, dead_pid(), writer_id="ntier-x"),
        }
        not_writers = {
            "user dir": tmp_path / "ntier", "user file": tmp_path / "ntier-file.txt",
            "other dir": tmp_path / "checkpoints",
        }  # fmt: skip
        not_writers["user dir"].mkdir()
        not_writers["user file"].write_text("mine")
        not_writers["other dir"].mkdir()
        os.symlink(stale["dead pid"], tmp_path / "ntier-link-to-stale")

        seen = {w.path: w for w in scan_writers(str(tmp_path))}
        for what, path in stale.items():
            assert not seen[path].live, what
        for what, path in live.items():
            assert seen[path].live, what
        removed = {w.path for w in clean_writers(str(tmp_path))}
        assert removed == set(stale.values())
        assert all(os.path.isdir(p) for p in live.values())
        assert all(os.path.exists(p) for p in not_writers.values())
        assert os.path.islink(tmp_path / "ntier-link-to-stale")  # dangling now, never followed
    finally:
        zombie.wait()


def _status(pid: int) -> str:
    import psutil

    return psutil.Process(pid).status()


def _start(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()


# -- permissions and symlinks ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_private_permissions(backend, tmp_path):
    root = tmp_path / "created by nvme_tier"
    engine = make_engine(3, root, backend=backend, policy={"hp_params": "nvme"})
    nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states()
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    entries = 0
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            assert stat.S_IMODE(os.lstat(os.path.join(dirpath, d)).st_mode) == 0o700, d
        for f in files:
            mode = os.lstat(os.path.join(dirpath, f)).st_mode
            assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600, os.path.join(dirpath, f)
            entries += 1
    assert entries >= 4
    engine.reload_states()
    nvme_tier.detach(engine)


def _victim(tmp_path, backend: str) -> tuple[str, bytes]:
    """A stranger's file (aio) or directory (zarr) a symlink will point at."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "c").mkdir()
    precious = b"precious " * 1000
    (victim / "c" / "0").write_bytes(precious)
    (victim / "zarr.json").write_bytes(precious)
    return (str(victim / "c" / "0") if backend == "aio" else str(victim)), precious


def _victim_intact(tmp_path, precious: bytes) -> None:
    victim = tmp_path / "victim"
    assert sorted(os.listdir(victim)) == ["c", "zarr.json"]
    assert os.listdir(victim / "c") == ["0"]
    assert (victim / "c" / "0").read_bytes() == precious
    assert (victim / "zarr.json").read_bytes() == precious


def _data_name(backend: str, state: str) -> str:
    return f"{state}.{'bin' if backend == 'aio' else 'zarr'}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_symlink_planted_at_a_new_data_file_is_refused(backend, offload_dir, tmp_path):
    engine = make_engine(3, offload_dir, backend=backend, policy={"hp_params": "nvme"})
    controller = nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states(include=["optim_states"])
    engine.reload_states()
    before = snapshot(engine)
    target, precious = _victim(tmp_path, backend)
    writer = controller._mover.backend.directory.path
    link = os.path.join(writer, _data_name(backend, "hp_params.0"))
    os.symlink(target, link)
    with pytest.raises(TierIOError, match="symlink") as err:
        engine.offload_states()  # optim_states unchanged (kept); hp_params.0 would go through the link
    assert link in str(err.value)
    assert_resident(engine, before)
    _victim_intact(tmp_path, precious)
    assert not os.path.lexists(link)  # removed like any partial file: the link, not its target
    engine.offload_states()
    engine.reload_states()
    assert_resident(engine, before, scratch=False)
    nvme_tier.detach(engine)
    _victim_intact(tmp_path, precious)


@pytest.mark.parametrize("backend", BACKENDS)
def test_symlink_planted_over_an_old_data_file_is_not_followed(backend, offload_dir, tmp_path):
    engine = make_engine(3, offload_dir, backend=backend)
    controller = nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states()
    engine.reload_states()  # the files stay on disk (skip_unchanged)
    target, precious = _victim(tmp_path, backend)
    writer = controller._mover.backend.directory.path
    old = os.path.join(writer, _data_name(backend, "optim_states.0"))
    shutil.rmtree(old) if os.path.isdir(old) else os.unlink(old)
    os.symlink(target, old)
    train(engine, 1)  # changed: the next offload rewrites optim_states.0
    before = snapshot(engine)
    engine.offload_states()
    assert not os.path.islink(old)
    _victim_intact(tmp_path, precious)
    engine.reload_states()
    same_states(before, snapshot(engine))
    nvme_tier.detach(engine)
    _victim_intact(tmp_path, precious)


@pytest.mark.parametrize("backend", BACKENDS)
def test_symlink_planted_before_reload_is_refused(backend, offload_dir, tmp_path):
    """Even a link to a perfect copy of our own data is refused: we read only what we wrote."""
    engine = make_engine(3, offload_dir, backend=backend)
    controller = nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states()
    writer = controller._mover.backend.directory.path
    real = os.path.join(writer, _data_name(backend, "optim_states.0"))
    moved = str(tmp_path / "moved")
    os.rename(real, moved)
    os.symlink(moved, real)
    with pytest.raises(TierIOError, match="symlink") as err:
        engine.reload_states()
    assert real in str(err.value)
    assert controller.phase is OffloadPhase.failed
