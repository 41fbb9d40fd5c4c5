"""``device_bytes_freed`` (and format_status's "device memory freed") counts only memory really freed.

During a non-blocking NVMe offload each buffer is freed once its write has completed: a state whose
write is still in flight holds its device memory, and the status must not report it as freed.
"""

from __future__ import annotations

from helpers import make_engine, train
from test_nonblocking_release import WriteGate

import nvme_tier
from nvme_tier.units import human_bytes


def test_bytes_in_flight_are_not_reported_freed(offload_dir):
    engine = make_engine(2, offload_dir, backend="zarr")
    controller = nvme_tier.attach(engine)
    train(engine, 1)
    gate = WriteGate(controller, hold_at=1)
    engine.offload_states(non_blocking=True)
    try:
        assert gate.reached.wait(30)
        status = nvme_tier.offload_status(engine)
        optim = status["optim_states"]
        assert optim.bytes_in_flight == optim.bytes > 0
        assert optim.device_bytes_freed == 0, "a state still being written holds its device memory"
        host = status["hp_params"]
        assert host.tier == "pinned_cpu" and host.device_bytes_freed == host.bytes > 0
        freed = sum(e.device_bytes_freed for e in status.values())
        assert f"device memory freed: {human_bytes(freed)}" in nvme_tier.format_status(engine)
    finally:
        gate.go.set()
    nvme_tier.wait(engine)
    gate.remove()
    optim = nvme_tier.offload_status(engine)["optim_states"]
    assert optim.device_bytes_freed == optim.bytes
    engine.reload_states()
    assert all(e.device_bytes_freed == 0 for e in nvme_tier.offload_status(engine).values())
    nvme_tier.detach(engine)
