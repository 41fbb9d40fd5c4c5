"""Writer directories and manifests: who owns a set of files, and what the files must contain.

Each writer (one engine instance on one rank) owns a private 0700 directory under the configured
path, so two writers on one path never collide. The manifest is written last (tmp + fsync +
rename): a crash mid-offload never leaves a readable half-state. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import stat
import time
import uuid
from dataclasses import asdict, dataclass

import psutil

from ..errors import ConfigError, IntegrityError, TierIOError
from .file_stamps import FileStamp, first_change, natural, sample_from_json, take_stamps
from .safe_files import atomic_write_json, file_kind, open_flags, read_json

log = logging.getLogger("nvme_tier")

FORMAT = "nvme_tier/1"
OWNER_FILE = "owner.json"
MANIFEST_FILE = "manifest.json"
WRITER_PREFIX = "ntier-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str) -> str:
    """Names become file names: only a safe alphabet, never a path component like '..'."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ConfigError(f"invalid tensor name {name!r}: use letters, digits, '_', '-', '.' (max 128)")
    return name


@dataclass(frozen=True)
class OwnerInfo:
    """Identity of a writer; ``pid_start`` guards against a recycled pid looking alive."""

    writer_id: str
    host: str
    pid: int
    pid_start: float
    rank: int
    created: float
    label: str = ""

    @classmethod
    def current(cls, rank: int = 0, label: str = "") -> OwnerInfo:
        pid = os.getpid()
        token = uuid.uuid4().hex[:10]
        return cls(
            writer_id=f"{WRITER_PREFIX}{socket.gethostname()}-{pid}-{token}-r{rank}",
            host=socket.gethostname(),
            pid=pid,
            pid_start=process_start(pid) or 0.0,
            rank=rank,
            created=time.time(),
            label=label,
        )

    @classmethod
    def from_json(cls, data: object) -> OwnerInfo:
        """Parse an owner.json strictly: a file we cannot fully understand is nobody's to delete."""
        if not isinstance(data, dict):
            raise ValueError("owner.json is not an object")
        types = {"writer_id": str, "host": str, "pid": int, "pid_start": (int, float), "rank": int,
                 "created": (int, float), "label": str}  # fmt: skip
        for key, kind in types.items():
            value = data.get(key, "" if key == "label" else None)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"owner.json: {key} is {value!r}")
        if set(data) - set(types) or data["pid"] <= 0:
            raise ValueError("owner.json: unexpected keys or pid")
        return cls(**data)

    def is_alive(self) -> bool:
        """True unless we can prove the owner process is gone (other hosts count as alive)."""
        if self.host != socket.gethostname():
            return True
        start = process_start(self.pid)
        if start is None:
            return False
        return start == _UNKNOWN or abs(start - self.pid_start) < 1.0


_UNKNOWN = -1.0


def process_start(pid: int) -> float | None:
    """Start time of a running process; None if provably gone (or a zombie); _UNKNOWN if hidden."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped: it writes nothing more
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, ProcessLookupError):
        return None
    except (psutil.AccessDenied, ValueError, TypeError, OverflowError):
        return _UNKNOWN  # cannot tell: count it as alive, never delete its files


@dataclass(frozen=True)
class TensorRecord:
    """What one stored tensor must look like on read: its bytes, layout and checksums."""

    name: str
    file: str
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    chunk_bytes: int
    crc32c: tuple[int, ...] | None = None
    # Content fingerprint (nvme_tier.fingerprint) of exactly the bytes written, taken on the source's
    # device: skip_unchanged skips a rewrite only while the live state still has it. None: not taken.
    fingerprint: str | None = None
    # Each data file as it was right after the write (file_stamps.py): a kept file is skipped or
    # rewritten in place only while it still is. None (manifests before them): never.
    stamps: tuple[FileStamp, ...] | None = None
    # (offset, crc32c) of sampled pages, read back to check a kept file (backend-defined offsets).
    samples: tuple[tuple[int, int], ...] | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["crc32c"] = list(self.crc32c) if self.crc32c is not None else None
        out["stamps"] = [s.to_json() for s in self.stamps] if self.stamps is not None else None
        out["samples"] = [list(s) for s in self.samples] if self.samples is not None else None
        return out

    @classmethod
    def from_json(cls, data: dict) -> TensorRecord:
        """Strict: a size that is not a non-negative int (1e400, -1, true) is a ValueError."""
        crcs, stamps, samples = data.get("crc32c"), data.get("stamps"), data.get("samples")
        return cls(
            name=str(data["name"]),
            file=str(data["file"]),
            nbytes=natural(data["nbytes"], "nbytes"),
            dtype=str(data["dtype"]),
            shape=tuple(natural(x, "shape") for x in data["shape"]),
            chunk_bytes=natural(data["chunk_bytes"], "chunk_bytes"),
            crc32c=tuple(natural(x, "crc32c") for x in crcs) if crcs is not None else None,
            fingerprint=str(data["fingerprint"]) if data.get("fingerprint") is not None else None,
            stamps=tuple(FileStamp.from_json(s) for s in stamps) if stamps is not None else None,
            samples=tuple(sample_from_json(s) for s in samples) if samples is not None else None,
        )


class WriterDirectory:
    """A private directory owned by one writer. The constructor does no I/O; ``create`` does.

    ``create`` keeps an fd of the root and of the directory: files are opened relative to the
    directory's fd (a name swapped in later for a symlink or another directory is never written
    through), and the directory's owner and (st_dev, st_ino) are re-checked at each offload and
    reload. While it exists the directory's fd holds an exclusive flock: the proof of life other
    processes' stale scans ask for (a pid says nothing across PID namespaces).
    """

    def __init__(self, root: str, owner: OwnerInfo):
        self.root = os.path.abspath(root)
        self.owner = owner
        self.path = os.path.join(self.root, owner.writer_id)
        self._created = False
        self._root_fd: int | None = None
        self._dir_fd: int | None = None
        self._identity: tuple[int, int] | None = None

    def create(self) -> None:
        """Create (first call) or re-check (later calls: before each write) the directory."""
        if self._created:
            self.check_identity()
            return
        ensure_root(self.root)
        try:
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            os.mkdir(self.owner.writer_id, 0o700, dir_fd=self._root_fd)
        except FileExistsError:
            self._close_fds()
            raise TierIOError(
                f"writer directory already exists: {self.path}", self.path, errno.EEXIST
            ) from None
        except OSError as exc:
            self._close_fds()
            raise TierIOError(f"cannot create {self.path}: {exc.strerror}", self.path, exc.errno) from None
        try:
            self._dir_fd = os.open(
                self.owner.writer_id,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=self._root_fd,
            )
            try_flock(self._dir_fd)
            st = os.fstat(self._dir_fd)
            self._identity = (st.st_dev, st.st_ino)
            os.fchmod(self._dir_fd, 0o700)
            atomic_write_json(self.file_path(OWNER_FILE), asdict(self.owner), dir_fd=self._dir_fd)
        except OSError as exc:
            self._close_fds()
            if isinstance(exc, TierIOError):
                raise
            raise TierIOError(f"cannot set up {self.path}: {exc.strerror}", self.path, exc.errno) from None
        self._created = True
        self.check_identity()

    def check_identity(self) -> None:
        """TierIOError unless ``path`` is still the directory we created, owned by us.

        Catches a directory renamed away and replaced (by a symlink or another directory) by
        whoever can write the root, before anything is written there or read from there.
        """
        if not self._created or self._root_fd is None:
            return
        try:
            st = os.stat(self.owner.writer_id, dir_fd=self._root_fd, follow_symlinks=False)
        except OSError as exc:
            raise TierIOError(
                f"writer directory {self.path} is gone: {exc.strerror}", self.path, exc.errno
            ) from None
        if (
            not stat.S_ISDIR(st.st_mode)
            or (st.st_dev, st.st_ino) != self._identity
            or st.st_uid != os.geteuid()
        ):
            raise TierIOError(
                f"writer directory {self.path} was replaced (now a {file_kind(st.st_mode)} owned by uid "
                f"{st.st_uid}); refusing to write or read there",
                self.path,
                errno.EPERM,
            )

    def file_path(self, filename: str) -> str:
        return os.path.join(self.path, check_name(filename))

    def op_path(self, filename: str) -> str:
        """A name for code that opens files by path itself (DeepSpeed's async_io op): resolved
        through this directory's fd (/proc/self/fd), so a directory swapped in at ``path`` after
        the last identity check is never used."""
        if self._dir_fd is None or not os.path.isdir("/proc/self/fd"):
            return self.file_path(filename)
        return f"/proc/self/fd/{self._dir_fd}/{check_name(filename)}"

    def open(self, filename: str, *, write: bool, direct: bool = False, **how: bool) -> int:
        """``how``: ``exclusive`` / ``create`` of ``open_flags``: a new file (a planted file or hard
        link in its place is unlinked, a symlink refused) / an existing one."""
        path = self.file_path(filename)
        self.check_identity()
        held = self._dir_fd is not None  # else (never created here) by its full path
        flags = open_flags(write, direct, **how)
        try:
            try:
                return os.open(filename if held else path, flags, 0o600, dir_fd=self._dir_fd)
            except FileExistsError:
                if not os.path.islink(path):
                    self.remove_file(filename)
                    return os.open(filename if held else path, flags, 0o600, dir_fd=self._dir_fd)
                raise OSError(errno.ELOOP, "a symlink") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise TierIOError(f"refusing to follow a symlink: {path}", path, exc.errno) from None
            if not write and exc.errno == errno.ENOENT:
                raise IntegrityError(f"missing file: {path}", path, exc.errno) from None
            raise TierIOError(f"cannot open {path}: {exc.strerror}", path, exc.errno) from None

    def stamps(self, paths: list[str]) -> tuple[FileStamp, ...]:
        """Stamps of data files (paths relative to this directory) as they are now: right after a write."""
        return take_stamps(paths, self._dir_fd, self.path)

    def first_change(self, stamps: tuple[FileStamp, ...]) -> str | None:
        """How the first of these files differs from its stamp (None: all as stamped)."""
        self.check_identity()
        return first_change(stamps, self._dir_fd, self.path)

    def remove_file(self, filename: str) -> None:
        path = self.file_path(filename)
        held = self._dir_fd is not None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(filename if held else path, dir_fd=self._dir_fd)

    def remove(self) -> None:
        """Delete this writer's directory (and only it), in the process that created it only.

        A child forked after the directory was made (os.fork) shares it with its parent; when the
        child exits, the parent's files must stay.
        """
        try:
            if os.getpid() != self.owner.pid:
                log.debug("nvme_tier: not removing %s from forked process %d", self.path, os.getpid())
                return
            if self._root_fd is not None and self._created:
                try:
                    self.check_identity()
                except TierIOError as exc:
                    if exc.errno != errno.ENOENT:  # replaced: not ours to delete; gone: nothing to do
                        log.warning("nvme_tier: leaving %s in place: %s", self.path, exc)
                    return
                shutil.rmtree(self.owner.writer_id, dir_fd=self._root_fd, ignore_errors=True)
            elif os.path.isdir(self.path) and not os.path.islink(self.path):
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self._created = False
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._dir_fd, self._root_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._dir_fd = self._root_fd = None

    def commit_manifest(self, records: dict[str, TensorRecord]) -> None:
        data = {
            "format": FORMAT,
            "owner": asdict(self.owner),
            "records": {name: rec.to_json() for name, rec in sorted(records.items())},
        }
        self.check_identity()
        atomic_write_json(self.file_path(MANIFEST_FILE), data, dir_fd=self._dir_fd)

    def load_manifest(self) -> dict[str, TensorRecord]:
        path = self.file_path(MANIFEST_FILE)
        self.check_identity()
        data = read_json(path, dir_fd=self._dir_fd)
        if data.get("format") != FORMAT:
            raise IntegrityError(f"{path}: unknown manifest format {data.get('format')!r}", path)
        owner = data.get("owner")
        writer = owner.get("writer_id") if isinstance(owner, dict) else None
        if writer != self.owner.writer_id:
            raise IntegrityError(
                f"{path}: manifest belongs to writer {writer!r}, not {self.owner.writer_id!r}", path
            )
        records = data.get("records", {})
        try:
            if not isinstance(records, dict):
                raise TypeError(f"records is a {type(records).__name__}, not an object")
            return {str(name): TensorRecord.from_json(rec) for name, rec in records.items()}
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise IntegrityError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})", path) from None


def ensure_root(root: str) -> None:
    """Create ``root`` (0700) if missing; ConfigError unless it is a writable directory."""
    try:
        # A symlinked root is the admin's choice (e.g. /scratch -> /mnt/nvme0): follow it once.
        st = os.stat(root)
    except FileNotFoundError:
        if os.path.islink(root):
            raise ConfigError(f"offload_states.path {root!r} is a dangling symlink") from None
        try:
            os.makedirs(root, 0o700, exist_ok=True)
            st = os.stat(root)
        except OSError as exc:
            raise ConfigError(
                f"offload_states.path {root!r}: cannot create directory ({exc.strerror})"
            ) from None
    except OSError as exc:  # ENOTDIR (a file used as a parent), EACCES, ELOOP...
        raise ConfigError(f"offload_states.path {root!r}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"offload_states.path {root!r} is not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        # Its owner can rename anything inside it, whatever the modes (e.g. swap our directory
        # for a symlink between two offloads).
        raise ConfigError(
            f"offload_states.path {root!r} is owned by uid {st.st_uid}, not by this user "
            f"(uid {os.geteuid()}) or root; use a directory of your own"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"offload_states.path {root!r} is writable by other users without the sticky bit "
            f"(mode {stat.S_IMODE(st.st_mode):o}): they could rename or replace this user's files; "
            "use a private directory or `chmod +t` it"
        )
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"offload_states.path {root!r} is not writable")


def try_flock(fd: int) -> bool:
    """Take the directory's exclusive flock without waiting: False only when another process
    holds it. Where flock is unsupported (some network filesystems) there is no lock to ask: True,
    and liveness rests on the owner's pid as before."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        log.debug("nvme_tier: no flock on this filesystem (%s); liveness by pid only", exc.strerror)
    return True
