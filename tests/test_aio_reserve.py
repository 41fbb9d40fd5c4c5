"""The aio backend reserves a new file's space on a helper thread, overlapped with staging.

A refused reservation must still fail the write with the real errno before any byte moves, leave no
file and no record, and leave the backend usable. The refusal is a real EFBIG from RLIMIT_FSIZE in
a subprocess (the limit is process-wide); the file is several chunks long, so the first chunk is
staged and checksummed while the reservation fails.
"""

from __future__ import annotations

import pytest
from helpers import child_result, requires_aio, run_child

CHILD = r"""
import errno, json, os, resource, signal, sys
import torch
from nvme_tier.errors import TierIOError
from nvme_tier.storage import AioStore, OwnerInfo, StorageBackend, WriterDirectory
from nvme_tier.deepspeed.ops import load_aio_op

load_aio_op()  # JIT-loading the op writes to ~/.cache: do it before the limit
root = sys.argv[1]
backend = StorageBackend(AioStore(WriterDirectory(root, OwnerInfo.current(label="reserve")), staging_budget_bytes=64 << 20))
chunk = backend.store.chunk_for(96 << 20)
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
    result = child_result(run_child(CHILD, str(tmp_path)))
    error = result["error"]
    assert error is not None, "the write past RLIMIT_FSIZE succeeded"
    assert error["errno"] == 27 and "cannot reserve" in error["message"], error  # EFBIG
    assert result["names"] == [], "a failed write left a record"
    assert not [f for f in result["left"] if f.endswith(".bin")], result["left"]
    assert result["exact_after"]


# -- issue 23, item 5: aio handles go back to the kernel with the last engine using them -----------------
HANDLES_CHILD = r"""
import json, os, sys
sys.path.insert(0, os.path.join(os.environ["NVME_TIER_REPO"], "tests"))
from helpers import make_engine, train
import nvme_tier

path = sys.argv[1]


def counts():
    with open("/proc/self/maps") as fh:
        contexts = sum("[aio]" in line for line in fh)
    with open("/proc/sys/fs/aio-nr") as fh:
        host_events = int(fh.read())
    return {"contexts": contexts, "threads": len(os.listdir("/proc/self/task")), "aio_nr": host_events}


def cycle(engine):
    train(engine, 1)
    engine.offload_states()
    engine.reload_states()


zarr = make_engine(1, path, backend="zarr", seed=3)  # a second kind of engine: the staging pool stays in use
nvme_tier.attach(zarr)
cycle(zarr)
out = {"base": counts()}
a = make_engine(1, path, backend="aio")
b = make_engine(1, path, backend="aio", seed=1)
for engine in (a, b):
    nvme_tier.attach(engine)
    cycle(engine)
out["two"] = counts()
nvme_tier.release(a)  # b still uses these settings: its handles stay
out["one"] = counts()
cycle(b)
nvme_tier.detach(b)  # the last engine with these settings: every handle and its threads go
out["none"] = counts()
c = make_engine(1, path, backend="aio", seed=2)  # and they come back when needed
nvme_tier.attach(c)
cycle(c)
out["again"] = counts()
nvme_tier.release(c)
out["end"] = counts()
print("RESULT " + json.dumps(out))
"""


@requires_aio
@pytest.mark.aio
@pytest.mark.multiproc
def test_aio_handles_and_threads_go_back_with_the_last_engine(tmp_path):
    c = child_result(run_child(HANDLES_CHILD, str(tmp_path), timeout=600))
    assert c["two"]["contexts"] > c["base"]["contexts"] and c["two"]["threads"] > c["base"]["threads"]
    assert c["one"]["contexts"] > c["base"]["contexts"], "released while another engine uses them"
    for after in ("none", "end"):
        assert c[after]["contexts"] == c["base"]["contexts"], (after, c)
        assert c[after]["threads"] <= c["base"]["threads"], (after, c)
    assert c["again"]["contexts"] > c["base"]["contexts"]
    # fs.aio-nr is host-wide (other processes move it too): ours fell by what our handles held
    assert c["two"]["aio_nr"] - c["none"]["aio_nr"] >= (c["two"]["contexts"] - c["base"]["contexts"]) * 32, c
