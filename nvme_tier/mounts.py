"""Which filesystem and disk hold a path: read from /proc/self/mountinfo and /sys/dev/block.

An offload directory on tmpfs is RAM, not NVMe: the offload then "frees" device memory into host
memory the policy meant to keep free. ``check`` and ``attach`` say where the bytes really go.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
SYS_DEV_BLOCK = "/sys/dev/block"
# Filesystems whose files live in RAM (or swap): offloading there moves no bytes off the host.
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})
# Layered or user-space filesystems: no disk of their own; the bytes land somewhere else at a cost
# nvme_tier cannot see (overlay: a container's root, copied up into the host's disk; FUSE: user code).
LAYERED_FILESYSTEMS = frozenset({"overlay", "aufs", "fuse", "squashfs"})
# Network filesystems: every offloaded byte crosses the network.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "9p", "virtiofs", "ceph", "lustre", "gpfs"})


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo: where the mount is, its filesystem type and its source."""

    mount_point: str
    fs_type: str
    source: str

    @property
    def not_a_disk(self) -> str | None:
        """What the filesystem really is when it is not a local disk (e.g. "RAM, ..."), else None."""
        return NOT_A_DISK.get(storage_kind(self.fs_type))


@dataclass(frozen=True)
class BlockDevice:
    """The block device under a path: its node (``/dev/vda1``), the whole disk and what it is."""

    device: str
    disk: str
    rotational: bool | None
    model: str

    def describe(self) -> str:
        kind = {True: "rotational", False: "non-rotational", None: "unknown media"}[self.rotational]
        model = f" {self.model}" if self.model else ""
        whole = f" on disk /dev/{self.disk}" if f"/dev/{self.disk}" != self.device else ""
        return f"block device {self.device}{whole} ({kind}{model})"


def is_ram_backed(fs_type: str) -> bool:
    """True for filesystems that keep file contents in RAM (tmpfs, ramfs, ...), not on a disk."""
    return fs_type in RAM_FILESYSTEMS


def storage_kind(fs_type: str) -> str:
    """``ram``, ``layered`` (overlay, FUSE), ``network`` (NFS, ...) or ``disk`` for a filesystem type."""
    if is_ram_backed(fs_type):
        return "ram"
    if fs_type in LAYERED_FILESYSTEMS or fs_type.startswith("fuse."):
        return "layered"
    if fs_type in NETWORK_FILESYSTEMS:
        return "network"
    return "disk"


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as 3-digit octal (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Every mount in file order (later lines are mounted later and shadow earlier ones)."""
    mounts = []
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append(MountInfo(mount_point=_unescape(fields[4]), fs_type=tail[0], source=_unescape(tail[1])))
    return mounts


def _existing_ancestor(path: str) -> str:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def _read_mountinfo() -> str:
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as fh:
        return fh.read()


def mount_of(path: str) -> MountInfo:
    """The mount holding ``path`` (or, when it does not exist yet, its nearest existing parent)."""
    real = os.path.realpath(_existing_ancestor(os.path.expanduser(path)))
    mounts = parse_mountinfo(_read_mountinfo())
    best: MountInfo | None = None
    for m in mounts:
        mp = m.mount_point
        inside = real == mp or mp == "/" or real.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = m
    if best is None:  # no "/" line: a bare chroot without /proc mounted properly
        return MountInfo(mount_point="/", fs_type="unknown", source="unknown")
    return best


def _read_sys(path: str) -> str:
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as fh:
        return fh.read().strip()
    return ""


def block_device_of(path: str) -> BlockDevice | None:
    """The block device holding ``path``'s filesystem, via ``/sys/dev/block/MAJOR:MINOR``.

    btrfs reports an anonymous device (major 0) for its subvolumes: then the mount's source node
    (``/dev/nvme0n1p2``) is asked instead. None when there is no block device (tmpfs, overlay, NFS).
    """
    st_dev = os.stat(_existing_ancestor(os.path.expanduser(path))).st_dev
    if os.major(st_dev) == 0:
        source = mount_of(path).source
        try:
            st_dev = os.stat(source).st_rdev if source.startswith("/dev/") else 0
        except OSError:
            st_dev = 0
    sys_dir = os.path.join(SYS_DEV_BLOCK, f"{os.major(st_dev)}:{os.minor(st_dev)}")
    if os.major(st_dev) == 0 or not os.path.exists(sys_dir):
        return None
    node = os.path.realpath(sys_dir)  # .../block/vda/vda1 for a partition, .../block/vda for a disk
    disk_dir = os.path.dirname(node) if os.path.exists(os.path.join(node, "partition")) else node
    rotational = _read_sys(os.path.join(disk_dir, "queue", "rotational"))
    return BlockDevice(
        device=f"/dev/{os.path.basename(node)}",
        disk=os.path.basename(disk_dir),
        rotational={"1": True, "0": False}.get(rotational),
        model=" ".join(_read_sys(os.path.join(disk_dir, "device", "model")).split()),
    )


NOT_A_DISK = {
    "ram": "RAM, not a disk: states placed on 'nvme' would stay in host memory",
    "layered": "a layered filesystem (a container's root?), not a disk of its own: every write is "
    "copied into another filesystem at a cost nvme_tier cannot see",
    "network": "a network filesystem, not a local disk: every offloaded byte crosses the network",
}
NOT_A_DISK_HINT = (
    "put offload_states.path on a local NVMe filesystem (ext4, xfs); in a container, bind-mount "
    "one (docker run -v /local_nvme/offload:/offload)"
)


def describe_storage(path: str) -> tuple[str, str]:
    """The :func:`storage_kind` of ``path``'s filesystem and one line naming filesystem and device."""
    mount = mount_of(path)
    where = f"{mount.fs_type} at {mount.mount_point} (source {mount.source})"
    device = block_device_of(path)
    if device is not None:
        where += f", {device.describe()}"
    return storage_kind(mount.fs_type), where


_described_paths: set[str] = set()


def log_storage_once(path: str, log: logging.Logger) -> None:
    """Log (once per path and process) the filesystem and device under ``path``; warn when not a disk."""
    if path in _described_paths:
        return
    _described_paths.add(path)
    kind, where = describe_storage(path)
    log.info("nvme_tier: offload_states.path %r is on filesystem %s", path, where)
    if kind in NOT_A_DISK:
        log.warning(
            "nvme_tier: offload_states.path %r is on %s: %s. %s",
            path,
            where,
            NOT_A_DISK[kind],
            NOT_A_DISK_HINT,
        )
