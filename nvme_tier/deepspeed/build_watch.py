"""Watching DeepSpeed's JIT builds: a leftover torch build lock, and a heartbeat while ninja runs.

torch.utils.cpp_extension guards each build directory with ``<extensions_dir>/<op>/lock``, made with
O_CREAT|O_EXCL (``FileBaton``) and kept open by the building process until it is done. A process
killed mid-build leaves the file, and every later load of that op (cached or not, DeepSpeed's or
nvme_tier's) spins in ``FileBaton.wait()`` forever, silently. A lock is left over when no process
on this machine has it open (``/proc/<pid>/fd``).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from ..errors import BuildLockError

log = logging.getLogger("nvme_tier")

FIX_COMMAND = "remove it: nvme-tier build-ops --fix (or rm the file; no build is running)"
LOCK_NAME = "lock"  # torch.utils.cpp_extension._jit_compile's FileBaton file


def lock_file(extensions_dir: str, op_name: str) -> str:
    return os.path.join(extensions_dir, op_name, LOCK_NAME)


def lock_holders(lock: str) -> list[int] | None:
    """Pids with ``lock`` open; None when a process that may hold it cannot be inspected.

    Only processes of the lock file's owner can hold it (the creator keeps it open), so other
    users' processes, whose fds are unreadable without root, do not make the answer unknown.
    """
    target = os.stat(lock)
    holders: list[int] = []
    unknown = False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid not in (target.st_uid, os.geteuid()):
                continue
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except FileNotFoundError:  # exited meanwhile
            continue
        except PermissionError:
            unknown = True
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{entry.name}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                holders.append(int(entry.name))
                break
    return None if unknown and not holders else holders


def is_left_over(lock: str) -> bool:
    try:
        return lock_holders(lock) == []
    except FileNotFoundError:  # the build finished meanwhile
        return False


def leftover_locks(extensions_dir: str) -> list[str]:
    """Every build lock under ``extensions_dir`` that no live process holds."""
    return [lock for lock in sorted(glob.glob(lock_file(extensions_dir, "*"))) if is_left_over(lock)]


def remove_leftover_locks(extensions_dir: str) -> list[str]:
    removed = []
    for lock in leftover_locks(extensions_dir):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
            removed.append(lock)
    return removed


def refuse_leftover_lock(extensions_dir: str, op_names: list[str]) -> None:
    """Before a load of ``op_names``: BuildLockError for a leftover lock instead of waiting forever;
    a line naming the process when a live one is building (torch then waits for it, as it should)."""
    for name in op_names:
        lock = lock_file(extensions_dir, name)
        try:
            holders = lock_holders(lock)
        except FileNotFoundError:
            continue
        if holders == []:
            raise BuildLockError(
                f"DeepSpeed op {name} cannot load: its build lock {lock} was left by a killed build "
                f"(no live process holds it) and torch would wait for it forever; {FIX_COMMAND}"
            )
        who = f"process {', '.join(map(str, holders))}" if holders else "another process"
        log.warning("nvme_tier: waiting for %s, which is building DeepSpeed %s (lock %s)", who, name, lock)


@contextlib.contextmanager
def heartbeat(report: Callable[[float], None], every_s: float) -> Iterator[None]:
    """Call ``report(elapsed seconds)`` every ``every_s`` while the body runs (a build says nothing)."""
    done = threading.Event()
    started = time.perf_counter()

    def beat() -> None:
        while not done.wait(every_s):
            report(time.perf_counter() - started)

    thread = threading.Thread(target=beat, name="nvme_tier-build-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
