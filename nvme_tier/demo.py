"""``python -m nvme_tier demo``: an RLHF-style actor/critic swap on one device, checked bit for bit.

Two engines take turns, as in PPO: while one trains, the other's states sit on NVMe (or pinned
host memory). Every reload is compared byte for byte with a snapshot taken just before the
offload; any difference exits non-zero. Nothing here is specific to the demo's tiny models: the
same four calls (``attach``, ``offload_states``, ``reload_states``, ``offload_status``) are all a
training script needs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


def set_launch_env() -> None:
    """Set torch.distributed's rendezvous variables for a single process, as the deepspeed launcher
    would; those already set (a real launch) stay."""
    env = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])
    for name, value in env.items():
        os.environ.setdefault(name, value)


def ds_config(stage: int, block: dict) -> dict:
    """The DeepSpeed config both engines use: ZeRO-``stage``, bf16, Adam, the offload_states ``block``."""
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": stage,
            # Small buckets: the defaults allocate ~1 GB of scratch, larger than these models.
            "reduce_bucket_size": 1_000_000,
            "allgather_bucket_size": 1_000_000,
        },
        "steps_per_print": 1_000_000,
        "offload_states": block,
    }


def offload_block(args: argparse.Namespace, path: str) -> tuple[dict, str]:
    """The demo's offload_states block (--config's, then --device/--backend, in ``path``) and a note."""
    from .config import OffloadStatesConfig

    base = OffloadStatesConfig.from_file(args.config) if args.config else OffloadStatesConfig()
    block = base.model_dump(mode="json", exclude_defaults=True)
    note = ""
    if args.config and base.path:
        note = f"  (the path {base.path} of --config is not used: the demo writes only to its own directory)"
    block.update(path=path, progress=False)
    if args.device:
        block["device"] = args.device
    if args.backend:
        block["backend"] = args.backend
    return OffloadStatesConfig.parse(block).model_dump(mode="json", exclude_defaults=True), note


def build_models(width: int, depth: int):
    """Actor: a small MLP policy head; critic: the same trunk with a scalar value head."""
    import torch

    def mlp(out: int) -> torch.nn.Module:
        layers: list[torch.nn.Module] = [torch.nn.Linear(64, width), torch.nn.GELU()]
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
        layers.append(torch.nn.Linear(width, out))
        return torch.nn.Sequential(*layers)

    torch.manual_seed(0)
    return mlp(64), mlp(1)


@dataclass
class Role:
    """One engine of the pair and what the demo tracks about it."""

    name: str
    engine: Any
    snapshot: dict = field(default_factory=dict)
    reloads: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    wrote: bool = False


def train_steps(role: Role, steps: int, gen) -> float:
    import torch

    engine = role.engine
    dtype = next(engine.module.parameters()).dtype
    loss_value = 0.0
    for _ in range(steps):
        x = torch.randn(4, 64, generator=gen).to(device=engine.device, dtype=dtype)
        out = engine(x).float()
        # Actor: pull the output toward a fixed direction; critic: regress a value of 1.
        target = torch.ones_like(out) if role.name == "critic" else x.float().flip(-1)
        loss = (out - target).pow(2).mean()
        engine.backward(loss)
        engine.step()
        loss_value = loss.item()
    return loss_value


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 and nbytes else "-"


def mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


@contextlib.contextmanager
def demo_directory(path: str | None) -> Iterator[tuple[str, bool]]:
    """The offload directory: ``path`` as given (kept), or a temporary one removed at the end.

    ``path`` follows attach's rule (only its last level is created; a missing parent is refused).
    """
    if path:
        from .config import OffloadStatesConfig
        from .storage.site import check_path_at_attach

        config = OffloadStatesConfig(path=path)
        check_path_at_attach(config)
        yield config.required_path("--path"), False
        return
    tmp = tempfile.mkdtemp(prefix="nvme_tier_demo_")
    try:
        yield tmp, True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quiet_deepspeed() -> None:
    """DeepSpeed logs every engine's full config at INFO; the demo's own lines are what matters."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|deepspeed)\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(torch|deepspeed)\.")
    from .deepspeed.ops import set_deepspeed_log_level

    set_deepspeed_log_level(logging.WARNING)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", help="offload directory (default: a temporary directory, removed at the end)")
    p.add_argument(
        "--config",
        help="take the offload_states block from this DeepSpeed JSON config (its path is not used)",
    )
    p.add_argument(
        "--backend", choices=("auto", "aio", "zarr"), help="NVMe backend (default: auto, or --config's)"
    )
    p.add_argument("--device", choices=("nvme", "cpu"), help="base policy (default: nvme, or --config's)")
    p.add_argument("--stage", type=int, choices=(2, 3), default=3, help="ZeRO stage")
    p.add_argument("--steps", type=int, default=3, help="training steps per turn")
    p.add_argument("--rounds", type=int, default=3, help="actor/critic turn pairs")
    p.add_argument("--width", type=int, default=1024, help="hidden width of both models")
    p.add_argument("--depth", type=int, default=4, help="hidden layers of both models")


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code (0: every reload bit-exact)."""
    set_launch_env()
    started = time.perf_counter()
    quiet_deepspeed()
    import deepspeed
    import torch

    import nvme_tier

    from .deepspeed.accelerator import accelerator_name
    from .deepspeed.ops import build_missing, quiet_comm_op_build
    from .policy import decide
    from .runtime import default_runtime
    from .snapshot import copy_states, differing_states
    from .storage.stale_writers import scan_writers

    if args.steps < 1 or args.rounds < 1:
        raise nvme_tier.ConfigError("--steps and --rounds must be at least 1")

    with demo_directory(args.path) as (path, temporary):
        block, note = offload_block(args, path)
        cfg = ds_config(args.stage, block)
        parsed = nvme_tier.OffloadStatesConfig.parse(block)
        backend = None
        if decide(parsed, list(nvme_tier.StateKind)).uses_nvme:
            backend, why = default_runtime().stores.select(parsed.backend, path, parsed)
            where = f"backend {backend} ({why})"
        else:
            where = "host memory only, nothing goes to disk"
        print(f"nvme_tier demo: accelerator {accelerator_name()}, ZeRO-{args.stage} bf16, {where}")
        print(f"  offload path: {path}{' (temporary)' if temporary else ''}")
        print(f"  offload_states: {json.dumps(block)}")
        if note:
            print(note)

        # Compile what is not built yet now, named and timed, rather than silently inside initialize
        # or the first offload; then keep DeepSpeed's "shm_comm op built successfully" print (shown
        # on every run, built or cached) out of the output.
        build_missing(cfg, aio_usable=backend == "aio")
        with quiet_comm_op_build():
            deepspeed.init_distributed()

        roles = []
        models = build_models(args.width, args.depth)
        params = sum(p.numel() for p in models[0].parameters())  # before ZeRO-3 partitions them
        for name, model in zip(("actor", "critic"), models, strict=True):
            engine, *_ = nvme_tier.initialize(model=model, config=cfg, model_parameters=model.parameters())
            roles.append(Role(name, engine))
        actor, critic = roles
        print(
            f"  two engines of {params / 1e6:.2f} M parameters each, {plural(args.steps, 'step')} per turn\n"
        )

        gen = torch.Generator().manual_seed(0)
        failures: list[str] = []

        def offload(role: Role, show_table: bool) -> None:
            role.snapshot = copy_states(role.engine, "cpu")
            role.engine.offload_states()
            stats = nvme_tier.controller_of(role.engine).last_stats["offload"]
            moved = stats.bytes_written + stats.bytes_to_host
            role.bytes_out += moved
            skipped = f", {mb(stats.bytes_skipped)} unchanged on disk" if stats.bytes_skipped else ""
            first = ""
            if stats.bytes_written and not role.wrote:
                role.wrote = True
                first = " [first write: includes opening the backend]"
            print(
                f"  offload {role.name:6s}: {mb(stats.bytes_written)} to nvme, {mb(stats.bytes_to_host)} to host"
                f"{skipped}, {stats.seconds:.3f} s ({gbps(moved, stats.seconds)}){first}"
            )
            if show_table:
                print("    " + nvme_tier.format_status(role.engine).replace("\n", "\n    "))

        def reload(role: Role) -> None:
            role.engine.reload_states()
            stats = nvme_tier.controller_of(role.engine).last_stats["reload"]
            from_host = stats.bytes_from_host
            moved = stats.bytes_read + from_host
            role.bytes_in += moved
            role.reloads += 1
            bad = differing_states(role.snapshot, copy_states(role.engine, "cpu"))
            verdict = "bit-exact" if not bad else f"MISMATCH in {', '.join(bad)}"
            print(
                f"  reload  {role.name:6s}: {mb(stats.bytes_read)} from nvme, {mb(from_host)} from host, "
                f"{stats.seconds:.3f} s ({gbps(moved, stats.seconds)}), {verdict}"
            )
            if bad:
                failures.append(f"{role.name} reload {role.reloads}: {', '.join(bad)}")

        # The critic waits first: its fresh states (no Adam moments before its first step) go to
        # the tier while the actor trains.
        offload(critic, show_table=False)
        for rnd in range(1, args.rounds + 1):
            for active in (actor, critic):
                if rnd > 1 or active is critic:
                    reload(active)
                loss = train_steps(active, args.steps, gen)
                print(f"round {rnd}: {active.name} trained {plural(args.steps, 'step')} (loss {loss:.4f})")
                offload(active, show_table=rnd == 1 and active is actor)
        print()
        for role in roles:
            reload(role)

        writers = list(scan_writers(path))
        on_disk = sum(w.bytes for w in writers)
        for role in roles:
            nvme_tier.release(role.engine)
            nvme_tier.detach(role.engine)
        elapsed = time.perf_counter() - started
        total_out = sum(r.bytes_out for r in roles)
        total_in = sum(r.bytes_in for r in roles)
        reloads = sum(r.reloads for r in roles)
        print(
            f"\nmoved {mb(total_out)} out and {mb(total_in)} back over {reloads} reloads; "
            f"{mb(on_disk)} on disk in {len(writers)} writer dirs before release; {elapsed:.1f} s in all"
        )
    if failures:
        print("FAILED: reloads not bit-exact:\n  " + "\n  ".join(failures))
        return 1
    print(f"OK: all {reloads} reloads bit-exact")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nvme-tier demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
