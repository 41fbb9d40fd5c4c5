"""Which filesystem and device a path is on, read from /proc/self/mountinfo (Linux).

attach logs it, and ``nvme-tier check`` names it: an offload path on tmpfs is RAM, not NVMe, and
nothing else would tell the user so.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"

# Filesystems that are not a disk: what offloading to them really does.
NOT_A_DISK = {
    "tmpfs": "RAM",
    "ramfs": "RAM",
    "overlay": "a container's writable layer",
}

_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountInfo:
    """One mount: where it is mounted, its filesystem type, and its source (a block device, or a name)."""

    mount_point: str
    fs_type: str
    source: str

    @property
    def not_a_disk(self) -> str | None:
        """What the filesystem really is when it is not a disk (e.g. "RAM"), else None."""
        return NOT_A_DISK.get(self.fs_type)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040...)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _existing_ancestor(path: str) -> str:
    """``path`` with symlinks resolved, or its nearest existing ancestor when it does not exist yet."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return os.path.realpath(path)


def mount_of(path: str, mountinfo: str = MOUNTINFO) -> MountInfo | None:
    """The mount holding ``path`` (the longest mount-point prefix; the latest of stacked mounts).

    None where /proc/self/mountinfo cannot be read (not Linux, no /proc).
    """
    target = _existing_ancestor(path)
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    best: MountInfo | None = None
    for line in lines:
        # "36 35 98:0 /root /mnt/point rw,noatime shared:1 - ext4 /dev/nvme0n1p1 rw"
        fields = line.split(" ")
        try:
            dash = fields.index("-", 6)
            mount_point, fs_type, source = _unescape(fields[4]), fields[dash + 1], _unescape(fields[dash + 2])
        except (ValueError, IndexError):
            continue
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) >= len(best.mount_point)):
            best = MountInfo(mount_point, fs_type, source)
    return best
