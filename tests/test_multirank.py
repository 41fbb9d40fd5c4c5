"""World size 2 on gloo: per-rank writer directories, bit-exact reload, identical to a twin."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch.multiprocessing as mp

HERE = os.path.dirname(__file__)


def _worker(rank: int, world: int, port: int, stage: int, path: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    sys.path.insert(0, HERE)
    import torch
    from conftest import make_engine, params_of, snapshot, train

    import nvme_tier

    engine = make_engine(stage, path, backend="zarr")
    nvme_tier.attach(engine)
    losses = train(engine, 2, seed=10 + rank)
    before = snapshot(engine)
    engine.offload_states()
    status = nvme_tier.offload_status(engine)
    mine = [d for d in os.listdir(path) if d.endswith(f"-r{rank}")]
    engine.reload_states()
    after = snapshot(engine)
    exact = all(torch.equal(v, after[k]) for k, v in before.items() if not k.startswith("contiguous"))
    losses += train(engine, 2, seed=20 + rank)
    weights = [w.sum().item() for w in params_of(engine)]
    twin = make_engine(stage, None)
    twin_losses = train(twin, 2, seed=10 + rank) + train(twin, 2, seed=20 + rank)
    twin_weights = [w.sum().item() for w in params_of(twin)]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(
            {
                "exact": exact,
                "tier": status["optim_states"].tier,
                "writer_dirs": mine,
                "same_losses": losses == twin_losses,
                "same_weights": weights == twin_weights,
            },
            fh,
        )


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_gloo(stage, tmp_path):
    path, out = tmp_path / "nvme", tmp_path / "out"
    path.mkdir()
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _worker, args=(2, port, stage, str(path), str(out)), nprocs=2, join=True, start_method="spawn"
    )
    for rank in range(2):
        result = json.loads((out / f"rank{rank}.json").read_text())
        assert result["tier"] == "nvme"
        assert result["exact"], f"rank {rank} states changed"
        assert len(result["writer_dirs"]) == 1, result
        assert result["same_losses"] and result["same_weights"], result
