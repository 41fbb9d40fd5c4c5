"""nvme_tier.snapshot: the one way the demo, the tests and the benchmarks check a cycle gave every byte back."""

from __future__ import annotations

from helpers import make_engine, train

import nvme_tier
from nvme_tier.snapshot import copy_states, differing_states, digest_states, state_buffers
from nvme_tier.tables import format_rows


def test_copies_and_digests_survive_a_cycle_and_see_one_changed_byte(offload_dir):
    engine = make_engine(3, offload_dir)
    nvme_tier.attach(engine)
    train(engine, 2)
    copies, digests = copy_states(engine, "cpu"), digest_states(engine)
    assert "contiguous_grad_buffer.0" not in copies and "contiguous_grad_buffer.0" in copy_states(
        engine, scratch=True
    )
    assert set(digests) == set(copies) and all(len(d) == 1 for d in digests.values())
    engine.offload_states()
    engine.reload_states()
    assert differing_states(copies, copy_states(engine, "cpu")) == []
    assert digest_states(engine) == digests

    state_buffers(engine)["optim_states.0"].view[7] ^= 1
    assert differing_states(copies, copy_states(engine, "cpu")) == ["optim_states.0"]
    assert digest_states(engine) != digests
    assert differing_states(copies, {}) == sorted(copies)


def test_format_rows_aligns_cells_and_shows_missing_values_as_dashes():
    table = format_rows(["name", "GB/s"], [["aio", 1.23456], ["zarr", None]])
    assert table.splitlines() == ["name  GB/s", "----  ----", "aio   1.23", "zarr  -"]
