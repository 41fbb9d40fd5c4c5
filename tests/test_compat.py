"""DeepSpeed version gate: outside the declared range, attach refuses with a message naming both
the installed and the supported versions; inside it (both ends), it passes."""

from __future__ import annotations

import pytest

import nvme_tier
from nvme_tier.deepspeed.version import SUPPORTED_DEEPSPEED, check_deepspeed_version
from nvme_tier.errors import UnsupportedEngineError


@pytest.mark.parametrize("version", ["0.15.0", "0.16.8", "0.20.0", "0.20.1", "1.0.0"])
def test_outside_range_is_refused_naming_both_versions(version):
    with pytest.raises(UnsupportedEngineError) as err:
        check_deepspeed_version(version)
    message = str(err.value)
    assert version in message
    assert all(bound in message for bound in SUPPORTED_DEEPSPEED)


@pytest.mark.parametrize("version", ["0.16.9", "0.17.0", "0.18.4", "0.19.8", "0.19.99"])
def test_inside_range_passes(version):
    assert check_deepspeed_version(version) == version


def test_installed_version_is_supported():
    import deepspeed

    assert check_deepspeed_version() == deepspeed.__version__


def test_attach_refuses_unsupported_version_before_touching_the_engine(monkeypatch):
    """The gate runs first in attach: a wrong DeepSpeed fails clearly, not deep in engine internals."""
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    with pytest.raises(UnsupportedEngineError, match=r"installed is 0\.20\.1"):
        nvme_tier.attach(object())


_AIO_LOOP = r"""
import os, sys, tempfile, torch
from nvme_tier.deepspeed.aio_binding import aio_async_pread, aio_async_pwrite, aio_wait
from nvme_tier.deepspeed.ops import load_aio_op

handle = load_aio_op().aio_handle(1 << 20, 32, False, True, 8)
buf = handle.new_cpu_locked_tensor(1 << 18, torch.empty(0, dtype=torch.uint8))
path = os.path.join(tempfile.mkdtemp(), "f.bin")
fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
os.posix_fallocate(fd, 0, 1 << 18)
for i in range(int(sys.argv[1])):
    n = 32768 * (1 + i % 8)
    buf[:n].fill_(i % 251)
    assert aio_async_pwrite(handle, buf[:n], fd, path, 0) == 0 and aio_wait(handle) == 1
    buf[:n].zero_()
    assert aio_async_pread(handle, buf[:n], path, 0) == 0 and aio_wait(handle) == 1
    assert int(buf[n - 1]) == i % 251, i
os.close(fd)
handle.free_cpu_locked_tensor(buf)
print("ok")
"""


@pytest.mark.aio
def test_aio_requests_do_not_deadlock(tmp_path):
    """Back-to-back requests on one handle: DeepSpeed <0.18.4 keeps the GIL in wait(), and without
    aio_binding.aio_wait's settling this loop deadlocks within a few hundred requests (0.16.9)."""
    import subprocess
    import sys

    from helpers import AIO_OK, AIO_WHY

    if not AIO_OK:
        pytest.skip(f"aio backend unavailable: {AIO_WHY}")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _AIO_LOOP, "1500"], capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        pytest.fail("async_io requests deadlocked (wait() holding the GIL?)")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
