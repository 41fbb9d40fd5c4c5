"""Does a transfer running behind the caller slow the caller's own work? (issue 22)

The point of a non-blocking offload is that another model's work runs while the bytes move. Here
that work is a launch-bound foreground loop: Python-driven small kernels (a few tiny matmuls and
adds per step) with a host sync every ``--sync-every`` steps, as a decode loop has. It is timed
alone, then while a non-blocking offload of a ZeRO-3 engine (>= 1 B params) runs behind it, then
while the non-blocking reload runs, for each mode:

* nvme         nvme_tier, ``{"device": "nvme"}`` (optimizer states to NVMe, the rest pinned)
* pinned_cpu   nvme_tier, ``{"device": "cpu"}`` (everything in page-locked host RAM)
* upstream_cpu DeepSpeed's own ``offload_states(device=cpu, pin_memory=True, non_blocking=True)``

Slowdown = mean foreground step time while the transfer is in flight / mean step time alone
(alone re-measured right before each transfer). Goal on the GPU machine: <= 1.05 in every mode.
Transfers are issued on a stream of their own (a non-blocking call orders the stream it is called
on after its copies, as upstream's does); one counts as in flight from the call until nvme_tier's
``wait`` returns and an event recorded after the call on that stream has completed (upstream: the
event); the foreground runs at least ``--min-steps``. Between rounds the engine is marked dirty,
so every round writes every byte again (as after training).

    python benchmarks/interference.py --path /local_nvme/if --out benchmarks/results/interference_h200.json
    python benchmarks/interference.py --tiny --path /var/tmp/if --out /tmp/if_cpu.json   # CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable

import torch
from measure import (
    linear_stack_engine,
    machine_info,
    rnd,
    set_launch_env,
    sync_device,
    train_step,
    write_json,
)

MODES = ("nvme", "pinned_cpu", "upstream_cpu")
GOAL = 1.05


def trained_engine(params: float, hidden: int):
    """The engine behind the foreground, one step trained (its optimizer states exist)."""
    engine = linear_stack_engine(params, hidden)
    train_step(engine, hidden)
    sync_device()
    return engine, sum(
        p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()
    )


class Foreground:
    """The launch-bound loop: ``kernels`` tiny ops per step, a host sync every ``sync_every`` steps."""

    def __init__(self, device: torch.device, kernels: int, sync_every: int, size: int):
        self.a = torch.randn(size, size, device=device)
        self.b = torch.randn(size, size, device=device)
        self.kernels, self.sync_every = kernels, sync_every

    def step(self, i: int) -> None:
        x = self.a
        for _ in range(self.kernels // 2):
            x = (x @ self.b).add_(1e-3)
        if i % self.sync_every == 0:
            x[0, 0].item()  # a host sync, as a decode step's sampling does

    def steps_alone(self, n: int) -> list[float]:
        return self._timed_steps(lambda i: i < n)

    def steps_while(self, in_flight: Callable[[], bool], min_steps: int) -> list[float]:
        return self._timed_steps(lambda i: i < min_steps or in_flight())

    def _timed_steps(self, go_on: Callable[[int], bool]) -> list[float]:
        sync_device()
        times, i = [], 0
        last = time.perf_counter()
        while go_on(i):
            self.step(i)
            i += 1
            if i % self.sync_every == 0:  # step times between host syncs (the GPU caught up there)
                now = time.perf_counter()
                times.append((now - last) / self.sync_every)
                last = now
        sync_device()
        return times


def in_flight_until(wait: Callable[[], None]) -> Callable[[], bool]:
    """A poll that stays True until ``wait`` (run on a helper thread) has returned."""
    done = threading.Event()
    threading.Thread(target=lambda: (wait(), done.set()), name="waiter", daemon=True).start()
    return lambda: not done.is_set()


def event_wait() -> Callable[[], None]:
    """Copies queued on the current stream: done when an event after them is."""
    if not torch.cuda.is_available():
        return lambda: None
    event = torch.cuda.Event()
    event.record()
    return event.synchronize


class Mode:
    def __init__(self, name: str, engine, args):
        import nvme_tier

        self.name, self.engine = name, engine
        self.side = torch.cuda.Stream() if torch.cuda.is_available() else None
        if name != "upstream_cpu":
            block = {"device": "nvme" if name == "nvme" else "cpu", "progress": False}
            if name == "nvme":
                block.update(path=args.path, backend=args.backend)
            nvme_tier.attach(engine, block)

    def offload(self) -> Callable[[], None]:
        with self.transfer_stream():
            if self.name == "upstream_cpu":
                from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

                self.engine.offload_states(device=OffloadDeviceEnum.cpu, pin_memory=True, non_blocking=True)
            else:
                self.engine.offload_states(non_blocking=True)
            return self.waiter()

    def reload(self) -> Callable[[], None]:
        with self.transfer_stream():
            self.engine.reload_states(non_blocking=True)
            return self.waiter()

    def transfer_stream(self):
        """Transfers are issued on a stream of their own: a non-blocking call orders the stream it is
        called on after its copies (upstream's and nvme_tier's alike), the foreground's must not wait."""
        return torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext()

    def waiter(self) -> Callable[[], None]:
        import nvme_tier

        if self.name == "upstream_cpu":
            return event_wait()
        return lambda: (nvme_tier.wait(self.engine), event_wait()())

    def mark_dirty(self) -> None:
        """As after training: the next offload writes every byte (no skip of unchanged files)."""
        import nvme_tier

        if self.name != "upstream_cpu":
            nvme_tier.mark_dirty(self.engine)

    def close(self) -> None:
        import nvme_tier

        if self.name != "upstream_cpu":
            nvme_tier.detach(self.engine)


def measure_phase(fg: Foreground, start: Callable[[], Callable[[], None]], args) -> dict:
    alone = fg.steps_alone(args.alone_steps)
    t0 = time.perf_counter()
    wait = start()
    call_s = time.perf_counter() - t0
    busy = fg.steps_while(in_flight_until(wait), args.min_steps)
    transfer_s = time.perf_counter() - t0
    mean_alone, mean_busy = statistics.fmean(alone), statistics.fmean(busy)
    return {
        "call_s": rnd(call_s),
        "transfer_s": rnd(transfer_s),
        "step_alone_ms": rnd(mean_alone * 1e3, 3),
        "step_in_flight_ms": rnd(mean_busy * 1e3, 3),
        "step_in_flight_p90_ms": rnd(sorted(busy)[int(0.9 * (len(busy) - 1))] * 1e3, 3),
        "steps_in_flight": len(busy) * args.sync_every,
        "slowdown": rnd(mean_busy / mean_alone, 3),
    }


def run(args) -> dict:
    set_launch_env()
    os.makedirs(args.path, exist_ok=True)
    engine, params = trained_engine(args.params_b * 1e9, args.hidden)
    fg = Foreground(engine.device, args.kernels, args.sync_every, args.fg_size)
    fg.steps_alone(args.alone_steps)  # warm-up
    out: dict = {"args": vars(args), "machine": machine_info(args.path), "params": params, "modes": {}}
    for name in args.modes:
        gc.collect()
        mode = Mode(name, engine, args)
        try:
            rounds = []
            for _ in range(args.rounds):
                off = measure_phase(fg, mode.offload, args)
                rel = measure_phase(fg, mode.reload, args)
                mode.mark_dirty()
                rounds.append({"offload": off, "reload": rel})
            worst = max(r[p]["slowdown"] for r in rounds for p in ("offload", "reload"))
            out["modes"][name] = {"rounds": rounds, "worst_slowdown": worst, f"goal_le_{GOAL}": worst <= GOAL}
        except Exception as exc:  # e.g. upstream refusing an optimizer it cannot offload
            out["modes"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            mode.close()
        print(name, out["modes"][name], flush=True)
        if args.out:
            write_json(args.out, out)
    shutil.rmtree(args.path, ignore_errors=True)
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", required=True, help="scratch directory for the NVMe files")
    p.add_argument("--out", help="write the JSON here (again after every mode)")
    p.add_argument("--tiny", action="store_true", help="a few-M-param engine: checks the script on CPU")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--backend", default="auto", choices=("auto", "aio", "zarr"))
    p.add_argument("--params-b", type=float, default=1.07, help="engine size, billions of params")
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=2, help="offload + reload rounds per mode")
    p.add_argument("--kernels", type=int, default=16, help="tiny kernels per foreground step")
    p.add_argument("--fg-size", type=int, default=64, help="side of the foreground's matrices")
    p.add_argument("--sync-every", type=int, default=8, help="a host sync every this many steps")
    p.add_argument("--alone-steps", type=int, default=4000)
    p.add_argument("--min-steps", type=int, default=400)
    args = p.parse_args(argv)
    if args.tiny:
        args.params_b, args.hidden, args.alone_steps, args.min_steps, args.rounds = 0.004, 256, 400, 80, 1
    return args


if __name__ == "__main__":
    run(parse())
