"""Stale writer directories: what ``nvme-tier status`` lists and ``clean`` (and attach) removes.

A writer killed mid-run leaves its directory behind; here it is told from a live one (flock and
owner pid) and removed while its lock is held. The directory's own layout is manifest.py's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import IntegrityError, TierIOError
from .file_stamps import first_change
from .manifest import (
    MANIFEST_FILE,
    OWNER_FILE,
    WRITER_PREFIX,
    OwnerInfo,
    TensorRecord,
    process_start,
    try_flock,
)
from .safe_files import read_json

_WRITER_NAME = re.compile(r"^ntier-(?P<host>.+)-(?P<pid>[0-9]+)-[0-9a-f]{10}-r[0-9]+$")


def _dead_by_name(name: str) -> bool:
    """For a writer killed before its owner.json existed: its name says host and pid."""
    m = _WRITER_NAME.match(name)
    if m is None or m["host"] != socket.gethostname():
        return False
    return process_start(int(m["pid"])) is None


@dataclass(frozen=True)
class WriterInfo:
    """What ``status``/``clean`` see of a writer directory on disk."""

    path: str
    owner: OwnerInfo | None
    live: bool
    bytes: int
    age_s: float
    committed: bool  # a manifest, and every file it names as it was written
    note: str = ""  # why a directory with a manifest does not count as committed


def scan_writers(root: str) -> Iterator[WriterInfo]:
    """Writer directories of this user under ``root`` (others' are not ours to judge or delete).

    A directory counts as stale only when (1) no process holds its flock (a live writer holds it
    for as long as its directory exists, whatever PID namespace it runs in) and (2) its owner
    process is provably gone: from a valid owner.json, or from its name when owner.json was never
    written (killed right after mkdir, before the lock). Anything unreadable or ambiguous is live.
    """
    for info, _lock_fd, _root_fd in _scan(root):
        yield info


def _scan(root: str) -> Iterator[tuple[WriterInfo, int, int]]:
    """(info, fd holding the directory's flock when taken (else -1), root fd) per writer directory.

    Each fd stays open, and the lock held, until the consumer asks for the next one.
    """
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        names = sorted(n for n in os.listdir(root_fd) if n.startswith(WRITER_PREFIX))
        for name in names:
            try:
                fd = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd
                )
            except OSError:  # not a directory, a symlink, or gone
                continue
            try:
                st = os.fstat(fd)
                if st.st_uid != os.geteuid():
                    continue
                unlocked = try_flock(fd)  # False: a live writer holds it
                yield (
                    _writer_info(os.path.join(root, name), fd, st, unlocked),
                    fd if unlocked else -1,
                    root_fd,
                )
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)


def _writer_info(path: str, fd: int, st: os.stat_result, unlocked: bool) -> WriterInfo:
    name = os.path.basename(path)
    owner: OwnerInfo | None = None
    has_owner_file = True
    try:
        owner = OwnerInfo.from_json(read_json(os.path.join(path, OWNER_FILE), dir_fd=fd))
    except IntegrityError as exc:
        has_owner_file = exc.errno != errno.ENOENT
    except (TierIOError, TypeError, ValueError):
        pass
    if owner is not None and owner.writer_id != name:
        owner = None  # an owner.json copied from elsewhere proves nothing about this directory
    size = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(dirpath, f)).st_size
    created = owner.created if owner else st.st_mtime
    dead = (
        owner is not None
        and not owner.is_alive()
        or owner is None
        and not has_owner_file
        and _dead_by_name(name)
    )
    try:
        committed = stat.S_ISREG(os.stat(MANIFEST_FILE, dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        committed = False
    note = _manifest_mismatch(path, fd) if committed else ""
    return WriterInfo(
        path=path,
        owner=owner,
        live=not (unlocked and dead),
        bytes=size,
        age_s=max(0.0, time.time() - created),
        committed=committed and not note,
        note=note,
    )


def _manifest_mismatch(path: str, fd: int) -> str:
    """Why the files no longer match the manifest ("" when they do): a writer killed while it
    rewrote a kept file leaves the old manifest over changed files. Each record's files are
    checked against their stamps (size, inode, mtime, ctime); older records' files must exist."""
    try:
        data = read_json(os.path.join(path, MANIFEST_FILE), dir_fd=fd)
        records = data.get("records")
        if not isinstance(records, dict):
            raise ValueError("records is not an object")
        parsed = [TensorRecord.from_json(rec) for rec in records.values()]
    except (TierIOError, KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"unreadable manifest: {exc}"
    for rec in parsed:
        if rec.stamps is not None:
            change = first_change(rec.stamps, fd, path)
        elif rec.file:
            change = None if _exists(rec.file, fd) else f"{rec.file}: missing"
        else:
            change = None
        if change:
            return f"files changed since the manifest was written ({change})"
    return ""


def _exists(name: str, fd: int) -> bool:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
    except (OSError, ValueError):
        return False
    return True


def clean_writers(root: str, include_live: bool = False, dry_run: bool = False) -> list[WriterInfo]:
    """Remove stale writer directories (owner process gone); live ones only when asked.

    A stale directory is deleted while its flock is held, so no writer can take it meanwhile.
    ``dry_run`` selects exactly what would be removed, without removing it.
    """
    removed = []
    for info, _lock_fd, root_fd in _scan(root):
        if info.live and not include_live:
            continue
        if not dry_run:
            shutil.rmtree(os.path.basename(info.path), dir_fd=root_fd, ignore_errors=True)
        removed.append(info)
    return removed
