"""zarr's raw chunk files, written and read by nvme_tier itself (zarr_store.py's fast path): each a
plain file holding exactly one chunk's bytes, created fresh (never written through a file that
was there), read back whole or one sampled page at a time."""

from __future__ import annotations

import contextlib
import mmap
import os

import torch

from ..errors import IntegrityError
from ..units import PAGE
from .checksums import crc32c_of_buffer, host_array
from .file_stamps import is_private_file


def page_aligned(buffer: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` bytes of ``buffer`` (allocated ``size + PAGE``) starting on a page (O_DIRECT)."""
    offset = (-buffer.data_ptr()) % PAGE
    return buffer[offset : offset + size]


def write_file(path: str, buf: torch.Tensor, direct: bool) -> None:
    """Create ``path`` (0600) holding exactly ``buf``'s bytes: a new file, whatever was there (a
    symlink or a hard link to another file is unlinked, never written through or truncated)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags | (os.O_DIRECT if direct else 0), 0o600)
    try:
        view, done = memoryview(host_array(buf)), 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
    finally:
        os.close(fd)


def read_file(path: str, buf: torch.Tensor, direct: bool) -> None:
    """Fill ``buf`` from ``path`` (sizes were checked against the manifest)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    try:
        view, done = memoryview(host_array(buf)), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], done)
            if got == 0:
                raise IntegrityError(f"truncated file: {path} ({done} of {len(view)} bytes)", path)
            done += got
    finally:
        os.close(fd)


def page_crc(path: str, offset: int, length: int, direct: bool) -> int | None:
    """crc32c of ``length`` bytes at ``offset`` of ``path`` (from the device with ``direct``);
    None when the file cannot be read or is shorter."""
    page = mmap.mmap(-1, PAGE)  # page-aligned, as O_DIRECT needs
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
        try:
            got = os.preadv(fd, [memoryview(page)[:length]], offset)
        finally:
            os.close(fd)
        return crc32c_of_buffer(memoryview(page)[:length]) if got == length else None
    except OSError:
        return None
    finally:
        page.close()


def chmod_regular(path: str, mode: int) -> None:
    """chmod a file of ours (regular, one link, our uid); never through a symlink, never another
    file hard-linked in its place."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # gone, a symlink (ELOOP) or unreadable: nothing of ours to chmod
        return
    try:
        if is_private_file(os.fstat(fd)):
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
