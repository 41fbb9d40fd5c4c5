"""The aio backend reserves a new file's space on a helper thread, overlapped with staging.

A refused reservation must still fail the write with the real errno before any byte moves, leave no
file and no record, and leave the backend usable. The refusal is a real EFBIG from RLIMIT_FSIZE in
a subprocess (the limit is process-wide); the file is several chunks long, so the first chunk is
staged and checksummed while the reservation fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import requires_aio

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r"""
import errno, json, os, resource, signal, sys
import torch
from nvme_tier.errors import TierIOError
from nvme_tier.storage import AioBackend, OwnerInfo, WriterDirectory
from nvme_tier.deepspeed.ops import load_aio_op

load_aio_op()  # JIT-loading the op writes to ~/.cache: do it before the limit
root = sys.argv[1]
backend = AioBackend(WriterDirectory(root, OwnerInfo.current(label="reserve")), staging_budget_bytes=64 << 20)
chunk = backend._chunk_for(96 << 20)
src = torch.arange(96 << 20, dtype=torch.int64).to(torch.uint8)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2 * chunk + chunk // 2, resource.RLIM_INFINITY))
try:
    backend.write("state", src).result()
except TierIOError as exc:
    error = {"errno": exc.errno, "message": str(exc)}
else:
    error = None
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
left = sorted(os.listdir(backend.directory.path)) if os.path.isdir(backend.directory.path) else []
names = backend.names()
backend.write("state", src).result()  # the same backend writes it once the limit is gone
out = torch.zeros_like(src)
backend.read_into("state", out).result()
print("RESULT " + json.dumps({"error": error, "chunk": chunk, "left": left, "names": names,
                              "exact_after": bool(torch.equal(out, src))}))
backend.release()
"""


@requires_aio
@pytest.mark.aio
@pytest.mark.multiproc
def test_refused_reservation_fails_before_bytes_move(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    error = result["error"]
    assert error is not None, "the write past RLIMIT_FSIZE succeeded"
    assert error["errno"] == 27 and "cannot reserve" in error["message"], error  # EFBIG
    assert result["names"] == [], "a failed write left a record"
    assert not [f for f in result["left"] if f.endswith(".bin")], result["left"]
    assert result["exact_after"]
