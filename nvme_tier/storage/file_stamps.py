"""What each data file looked like right after nvme_tier wrote it, to tell later whether it still does.

Why: ``skip_unchanged`` keeps a state's file and skips rewriting it while the live bytes are
unchanged; the aio backend rewrites a kept file in place. Both must know the file still is the one
written: nvme_tier's own inode (not a file planted in its place, not a hard link to someone
else's file) holding the bytes written. A stamp records (dev, inode, size, mtime, ctime) at write:
any write through the filesystem moves mtime *and* ctime (``utime`` can put mtime back, never
ctime), a replaced file has another inode, a truncated one another size. Sampled pages (their
crc32c, read back from the device) catch what bypasses the filesystem. Checking costs a few
``lstat`` and page reads, far below the write it saves (benchmarks/skip_check_cost.py).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ..units import MiB

# Sampled pages recorded per file: the first, one more per SAMPLE_SPACING bytes (the last page
# among them), at most MAX_SAMPLES: the manifest stays small, and the check (one 4 KiB read each)
# stays below 2 % of the write it saves down to 1 MiB files (benchmarks/skip_check_cost.py).
SAMPLE_SPACING = 64 * MiB
MAX_SAMPLES = 64


@dataclass(frozen=True)
class FileStamp:
    """One data file (``path`` relative to the writer directory) as it was right after the write."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    def to_json(self) -> list:
        return [self.path, self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns]

    @classmethod
    def from_json(cls, data: object) -> FileStamp:
        if not isinstance(data, list) or len(data) != 6:
            raise ValueError(f"a file stamp is [path, dev, ino, size, mtime_ns, ctime_ns], not {data!r}")
        path, *numbers = data
        if not isinstance(path, str) or not _relative_path_ok(path):
            raise ValueError(f"file stamp path {path!r} is not a plain relative path")
        return cls(path, *(natural(n, "file stamp") for n in numbers))

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> FileStamp:
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def natural(value: object, what: str) -> int:
    """``value`` as a non-negative int (JSON), else ValueError naming ``what``: no bools, floats
    (1e400 is inf), strings or negative sizes from a tampered manifest."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} is {value!r}, not a non-negative integer")
    return value


def sample_from_json(data: object) -> tuple[int, int]:
    if not isinstance(data, list) or len(data) != 2:
        raise ValueError(f"a sample is [offset, crc32c], not {data!r}")
    return natural(data[0], "sample offset"), natural(data[1], "sample crc32c")


def _relative_path_ok(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and all(p and p not in (".", "..") and "\0" not in p for p in parts)


def is_private_file(st: os.stat_result) -> bool:
    """A regular file with one link, owned by this user: one nvme_tier may write through."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()


def take_stamps(paths: list[str], dir_fd: int | None, base: str) -> tuple[FileStamp, ...]:
    """Stamps of ``paths`` (relative to the directory ``dir_fd``, or to ``base`` without one)."""
    return tuple(FileStamp.of(p, _lstat(p, dir_fd, base)) for p in paths)


_FIELDS = ("dev", "ino", "size", "mtime_ns", "ctime_ns")


def first_change(stamps: tuple[FileStamp, ...], dir_fd: int | None, base: str) -> str | None:
    """How the first file that is no longer as stamped differs (None: every one is as stamped)."""
    for old in stamps:
        try:
            st = _lstat(old.path, dir_fd, base)
        except OSError as exc:
            return f"{old.path}: {exc.strerror}"
        if not is_private_file(st):
            return f"{old.path}: no longer a private regular file (links {st.st_nlink}, uid {st.st_uid})"
        now = FileStamp.of(old.path, st)
        if now != old:
            what = [f for f in _FIELDS if getattr(now, f) != getattr(old, f)]
            return f"{old.path}: {', '.join(what)} changed since it was written"
    return None


def spread(samples: list[tuple[int, int]], nbytes: int) -> tuple[tuple[int, int], ...]:
    """The samples a record keeps: the first, then evenly spaced ones ending with the last."""
    if not samples:
        return ()
    count = min(len(samples), MAX_SAMPLES, 1 + nbytes // SAMPLE_SPACING)
    if count >= len(samples):
        return tuple(samples)
    last = len(samples) - 1
    picks = sorted({round(i * last / (count - 1)) for i in range(count)}) if count > 1 else [0]
    return tuple(samples[i] for i in picks)


def _lstat(path: str, dir_fd: int | None, base: str) -> os.stat_result:
    if dir_fd is None:
        return os.stat(os.path.join(base, path), follow_symlinks=False)
    return os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
