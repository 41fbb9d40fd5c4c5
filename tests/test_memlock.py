"""A low ``ulimit -l`` without CUDA: aio must be refused in Python, never abort the process.

DeepSpeed's mlock allocator (the aio staging ring's memory when there is no CUDA) hits a C assert
past RLIMIT_MEMLOCK and kills the interpreter. Root holds CAP_IPC_LOCK, which lifts the limit, so
each case runs in a child with that capability dropped (``setpriv``) and the limit lowered: that
child is a real unprivileged-memlock process, with the real async_io op and a real directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from helpers import requires_aio

pytestmark = [
    pytest.mark.aio,
    requires_aio,
    pytest.mark.skipif(
        shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to drop CAP_IPC_LOCK"
    ),
]

CHILD = textwrap.dedent(
    """
    import json, resource, sys, logging
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 10, 64 << 10))
    import torch
    from nvme_tier.config import OffloadStatesConfig
    from nvme_tier.errors import BackendUnavailableError
    import nvme_tier
    from nvme_tier.storage import AioStore, OwnerInfo, StorageBackend, WriterDirectory
    from nvme_tier.storage.aio_handles import has_cap_ipc_lock

    path = sys.argv[1]
    out = {"cap": has_cap_ipc_lock(), "cuda": torch.cuda.is_available()}
    out["auto"] = nvme_tier.default_runtime().stores.select("auto", path, OffloadStatesConfig(staging_budget_mb=8))
    try:
        nvme_tier.default_runtime().stores.select("aio", path)
    except BackendUnavailableError as exc:
        out["aio"] = ["BackendUnavailableError", isinstance(exc, ImportError), str(exc)]
    backend = StorageBackend(AioStore(WriterDirectory(path, OwnerInfo.current(rank=0, label="t")), staging_budget_bytes=8 << 20))
    try:
        backend.write("x", torch.arange(1000, dtype=torch.float32)).result()
    except BackendUnavailableError as exc:
        out["write"] = str(exc)
    print("RESULT " + json.dumps(out))
    """
)


def test_low_memlock_refuses_aio_and_auto_falls_back(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-ipc_lock",
            "--bounding-set=-ipc_lock",
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # an mlock abort shows here as SIGABRT (-6)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    if out["cuda"]:
        pytest.skip("CUDA pinned memory is not bound by ulimit -l")
    assert out["cap"] is False
    assert out["auto"][0] == "zarr" and "ulimit -l" in out["auto"][1]
    _, is_import_error, message = out["aio"]
    assert is_import_error and "ulimit -l" in message and "staging_budget_mb" in message
    assert "ulimit -l" in out["write"]
