"""What the filesystem and the device under a path accept: O_DIRECT, and the logical block size.

Asked by selection (a backend that declares ``o_direct`` needs both) and by the zarr backend,
which uses O_DIRECT where the filesystem takes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile

from ..errors import ConfigError


def supports_o_direct(path: str) -> bool:
    """Probe by opening a scratch file with O_DIRECT (tmpfs and some FUSE mounts refuse)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".ntier-odirect-", dir=path)
    except OSError as exc:  # ENAMETOOLONG near PATH_MAX, EACCES, EROFS...
        raise ConfigError(
            f"offload_states.path {path!r}: cannot create a file in it ({exc.strerror})"
        ) from None
    os.close(fd)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise ConfigError(f"offload_states.path {path!r}: O_DIRECT probe failed ({exc.strerror})") from None
    else:
        os.close(fd)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


def logical_block_size(path: str) -> int | None:
    """The logical block size of the block device ``path`` lives on (None: not a block device).

    /sys/dev/block/<maj:min> of a partition has no queue/; its parent disk's does.
    """
    try:
        dev = os.stat(path).st_dev
        node = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    except OSError:
        return None
    for candidate in (node, os.path.dirname(node)):
        queue = os.path.join(candidate, "queue", "logical_block_size")
        with contextlib.suppress(OSError, ValueError), open(queue, encoding="ascii") as fh:
            return int(fh.read())
    return None
