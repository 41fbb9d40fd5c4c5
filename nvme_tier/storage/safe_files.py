"""Small metadata files read and written safely: no symlink followed, no half-written file seen,
nothing planted in their place (a FIFO, a directory, a huge file) read or waited on."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat

from ..errors import IntegrityError, TierIOError
from ..units import MiB

_MAX_METADATA_BYTES = MiB  # owner.json / manifest.json are a few KiB; anything larger is planted


def open_flags(write: bool, direct: bool, *, create: bool = True, exclusive: bool = False) -> int:
    """``exclusive``: only a new file (unlink the name first); ``create=False``: an existing one, kept."""
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    if write:
        flags |= os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if create else 0) | (os.O_EXCL if exclusive else 0)
    else:
        flags |= os.O_RDONLY
    if direct:
        flags |= os.O_DIRECT
    return flags


def atomic_write_json(path: str, data: dict, *, dir_fd: int | None = None) -> None:
    """tmp + fsync + rename + fsync(dir): readers see the old file or the new one, never half.

    With ``dir_fd`` the file is the basename of ``path`` inside that directory fd (never a path
    resolved again). Any failure (an OSError as TierIOError naming ``path``, or unserialisable
    data) leaves the old file untouched and no ``.tmp`` behind.
    """
    name = os.path.basename(path) if dir_fd is not None else path
    tmp = f"{name}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):  # whatever is there (a hard link) is not written
            os.unlink(tmp, dir_fd=dir_fd)
        fd = os.open(tmp, open_flags(write=True, direct=False, exclusive=True), 0o600, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
                fh.flush()
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        if isinstance(exc, OSError) and not isinstance(exc, TierIOError):
            raise TierIOError(f"cannot write {path}: {exc.strerror or exc}", path, exc.errno) from None
        raise
    try:  # make the rename durable
        dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY) if dir_fd is None else dir_fd
        try:
            os.fsync(dfd)
        finally:
            if dfd != dir_fd:
                os.close(dfd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # some filesystems cannot fsync a dir
            raise TierIOError(
                f"cannot sync the directory of {path}: {exc.strerror}", path, exc.errno
            ) from None


def read_json(path: str, *, dir_fd: int | None = None) -> dict:
    """Parse a small regular JSON file; anything else (a FIFO, a directory, a huge or sparse file
    planted in its place) is refused without blocking or reading it, with an error naming ``path``.

    With ``dir_fd`` the file is the basename of ``path`` inside that directory fd.
    """
    name = os.path.basename(path) if dir_fd is not None else path
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer that never comes.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise IntegrityError(f"missing file: {path}", path, errno.ENOENT) from None
    except OSError as exc:
        raise TierIOError(f"cannot open {path}: {exc.strerror}", path, exc.errno) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{path} is a {file_kind(st.st_mode)}, not a regular file", path)
        if st.st_size > _MAX_METADATA_BYTES:
            raise IntegrityError(
                f"{path} is {st.st_size} bytes, larger than any metadata file ({_MAX_METADATA_BYTES})", path
            )
        raw = os.read(fd, _MAX_METADATA_BYTES + 1)
    except OSError as exc:
        if isinstance(exc, TierIOError):
            raise
        raise TierIOError(f"cannot read {path}: {exc.strerror}", path, exc.errno) from None
    finally:
        os.close(fd)
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise IntegrityError(f"{path}: not valid JSON ({exc})", path) from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise IntegrityError(
            f"{path}: JSON nested too deeply for nvme_tier metadata (nvme_tier did not write it); "
            "remove it, or the writer directory it is in once no run uses that directory",
            path,
        ) from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path}: not a JSON object", path)
    return data


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISREG, "regular file")):  # fmt: skip
        if test(mode):
            return name
    return "special file"
