"""Writer directories and manifests: who owns a set of files, and what the files must contain.

Each writer (one engine instance on one rank) owns a private 0700 directory under the configured
path, so two writers on one path never collide. The manifest is written last (tmp + fsync +
rename): a crash mid-offload never leaves a readable half-state. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import psutil

from ..errors import ConfigError, IntegrityError, TierIOError

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
            pid_start=_process_start(pid) or 0.0,
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
        start = _process_start(self.pid)
        if start is None:
            return False
        return start == _UNKNOWN or abs(start - self.pid_start) < 1.0


_UNKNOWN = -1.0


def _process_start(pid: int) -> float | None:
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


_WRITER_NAME = re.compile(r"^ntier-(?P<host>.+)-(?P<pid>[0-9]+)-[0-9a-f]{10}-r[0-9]+$")


def _dead_by_name(name: str) -> bool:
    """For a writer killed before its owner.json existed: its name says host and pid."""
    m = _WRITER_NAME.match(name)
    if m is None or m["host"] != socket.gethostname():
        return False
    return _process_start(int(m["pid"])) is None


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
    extra: dict = field(default_factory=dict)
    # Content fingerprint (nvme_tier.fingerprint) of exactly the bytes written, taken on the source's
    # device: skip_unchanged skips a rewrite only while the live state still has it. None: not taken.
    fingerprint: str | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["crc32c"] = list(self.crc32c) if self.crc32c is not None else None
        return out

    @classmethod
    def from_json(cls, data: dict) -> TensorRecord:
        return cls(
            name=str(data["name"]),
            file=str(data["file"]),
            nbytes=int(data["nbytes"]),
            dtype=str(data["dtype"]),
            shape=tuple(int(x) for x in data["shape"]),
            chunk_bytes=int(data["chunk_bytes"]),
            crc32c=tuple(int(x) for x in data["crc32c"]) if data.get("crc32c") is not None else None,
            extra=dict(data.get("extra") or {}),
            fingerprint=str(data["fingerprint"]) if data.get("fingerprint") is not None else None,
        )


def _open_flags(write: bool, direct: bool) -> int:
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    flags |= (os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if write else os.O_RDONLY
    if direct:
        flags |= os.O_DIRECT
    return flags


class WriterDirectory:
    """A private directory owned by one writer. The constructor does no I/O; ``create`` does."""

    def __init__(self, root: str, owner: OwnerInfo):
        self.root = os.path.abspath(root)
        self.owner = owner
        self.path = os.path.join(self.root, owner.writer_id)
        self._created = False

    def create(self) -> None:
        if self._created:
            return
        ensure_root(self.root)
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            raise TierIOError(
                f"writer directory already exists: {self.path}", self.path, errno.EEXIST
            ) from None
        except OSError as exc:
            raise TierIOError(f"cannot create {self.path}: {exc.strerror}", self.path, exc.errno) from None
        os.chmod(self.path, 0o700)
        atomic_write_json(self.file_path(OWNER_FILE), asdict(self.owner))
        self._created = True

    def file_path(self, filename: str) -> str:
        return os.path.join(self.path, check_name(filename))

    def open(self, filename: str, *, write: bool, direct: bool = False) -> int:
        path = self.file_path(filename)
        try:
            return os.open(path, _open_flags(write, direct), 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise TierIOError(f"refusing to follow a symlink: {path}", path, exc.errno) from None
            if not write and exc.errno == errno.ENOENT:
                raise IntegrityError(f"missing file: {path}", path, exc.errno) from None
            raise TierIOError(f"cannot open {path}: {exc.strerror}", path, exc.errno) from None

    def remove_file(self, filename: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file_path(filename))

    def remove(self) -> None:
        """Delete this writer's directory (and only it)."""
        if os.path.isdir(self.path) and not os.path.islink(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
        self._created = False

    def commit_manifest(self, records: dict[str, TensorRecord]) -> None:
        data = {
            "format": FORMAT,
            "owner": asdict(self.owner),
            "records": {name: rec.to_json() for name, rec in sorted(records.items())},
        }
        atomic_write_json(self.file_path(MANIFEST_FILE), data)

    def load_manifest(self) -> dict[str, TensorRecord]:
        path = self.file_path(MANIFEST_FILE)
        data = read_json(path)
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
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
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
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"offload_states.path {root!r} is not writable")


def atomic_write_json(path: str, data: dict) -> None:
    """tmp + fsync + rename + fsync(dir): readers see the old file or the new one, never half.

    Any failure (an OSError as TierIOError naming ``path``, or unserialisable data) leaves the old
    file untouched and no ``.tmp`` behind.
    """
    tmp = f"{path}.tmp"
    try:
        fd = os.open(tmp, _open_flags(write=True, direct=False), 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
                fh.flush()
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, TierIOError):
            raise TierIOError(f"cannot write {path}: {exc.strerror or exc}", path, exc.errno) from None
        raise
    try:  # make the rename durable
        dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # some filesystems cannot fsync a dir
            raise TierIOError(
                f"cannot sync the directory of {path}: {exc.strerror}", path, exc.errno
            ) from None


def read_json(path: str) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise IntegrityError(f"missing file: {path}", path, errno.ENOENT) from None
    except OSError as exc:
        raise TierIOError(f"cannot open {path}: {exc.strerror}", path, exc.errno) from None
    with os.fdopen(fd, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except ValueError as exc:
            raise IntegrityError(f"{path}: not valid JSON ({exc})", path) from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path}: not a JSON object", path)
    return data


@dataclass(frozen=True)
class WriterInfo:
    """What ``status``/``clean`` see of a writer directory on disk."""

    path: str
    owner: OwnerInfo | None
    live: bool
    bytes: int
    age_s: float
    committed: bool


def scan_writers(root: str) -> Iterator[WriterInfo]:
    """Writer directories under ``root``. A directory counts as stale only when its owner process
    is provably gone: from a valid owner.json, or from its name when owner.json was never written
    (killed right after mkdir). Anything unreadable or ambiguous counts as live."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.name.startswith(WRITER_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        owner: OwnerInfo | None = None
        owner_path = os.path.join(entry.path, OWNER_FILE)
        has_owner_file = os.path.lexists(owner_path)
        with contextlib.suppress(TierIOError, TypeError, ValueError):
            owner = OwnerInfo.from_json(read_json(owner_path))
        if owner is not None and owner.writer_id != entry.name:
            owner = None  # an owner.json copied from elsewhere proves nothing about this directory
        size = 0
        for dirpath, _dirs, files in os.walk(entry.path):
            for f in files:
                with contextlib.suppress(OSError):
                    size += os.lstat(os.path.join(dirpath, f)).st_size
        created = owner.created if owner else entry.stat(follow_symlinks=False).st_mtime
        yield WriterInfo(
            path=entry.path,
            owner=owner,
            live=owner.is_alive() if owner else has_owner_file or not _dead_by_name(entry.name),
            bytes=size,
            age_s=max(0.0, time.time() - created),
            committed=os.path.exists(os.path.join(entry.path, MANIFEST_FILE)),
        )


def clean_writers(root: str, include_live: bool = False, dry_run: bool = False) -> list[WriterInfo]:
    """Remove stale writer directories (owner process gone); live ones only when asked.

    ``dry_run`` selects exactly what would be removed, without removing it.
    """
    removed = []
    for info in scan_writers(root):
        if info.live and not include_live:
            continue
        if not dry_run:
            shutil.rmtree(info.path, ignore_errors=True)
        removed.append(info)
    return removed
