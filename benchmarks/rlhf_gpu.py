"""An RLHF-like (PPO-shaped) loop on one GPU: how much do offload/reload stall it?

Three ZeRO-3 bf16 engines built from HF transformers Llama configs (random init, no download):
an actor (LlamaForCausalLM + Adam), a critic (LlamaForSequenceClassification, num_labels=1: a
Llama with a value head, + Adam) and a reference model (LlamaForCausalLM, no optimizer). Each
iteration of the loop:

    actor_train    the actor trains ``--train-steps`` steps on random tokens (seq ``--seq``)
    actor_offload  actor.offload_states(non_blocking=True) returns
    generation     fixed work: a KV-cache-sized tensor (``--kv-gb``) is allocated in the memory the
                   actor frees, then decode-like steps (one-token reference-model forwards + an
                   attention-shaped matmul over the KV tensor); the critic's reload is issued
                   (prefetch) at ``--prefetch-at`` of the steps, while the actor's offload runs
    critic_wait    the loop waits for the critic's reload (nvme_tier.wait / device sync)
    critic_train   the critic trains (value regression)
    critic_offload critic.offload_states(non_blocking=True) returns
    scoring        fixed work: reference-model forwards over a batch; the actor's reload is issued
                   at its start (prefetch)
    actor_wait     (next iteration) the loop waits for the actor's reload

Modes, same loop and same fixed work:

* resident      no offloading: both trained models stay on the device (KV tensor shrunk to what
                fits, the work is the same; recorded as kv_bytes)
* nvme          nvme_tier.attach(engine, {"device": "nvme", "path": ...}) on actor and critic
* upstream_cpu  DeepSpeed's own offload_states(device=cpu, pin_memory=True, non_blocking=True),
                nvme_tier not attached
* pinned_cpu    nvme_tier with {"device": "cpu"} (everything in page-locked host RAM)
* auto          nvme_tier with {"device": "auto", "path": ...}: host first, NVMe for the rest
                (budget: --host-budget-mb, else auto's default); auto_b50 / auto_b25: a host
                budget of 50 % / 25 % of the bytes the two trained engines offload (+ staging).
                Each iteration records disk_bytes (written, read) and each mode bytes_by_tier.

Iterations vary by +-20 % between runs of one mode, so every figure is a median over the steady
iterations (all but the first; at least 8 by default), with its spread (min, quartiles, max), and
``resident`` always runs first in the same process. Blocked = the time the loop spent inside
offload/reload calls and waits (measured directly). The disk bound of a mode = the bytes it wrote
to and read from NVMe per iteration / the raw aio write and read bandwidth of ``--path``, measured
at the start of the same run (DeepSpeed's op, one 4 GiB request each way): a loop cannot beat it.

Goals (issue 22): generation and scoring within 5 % of resident's in every mode (the work behind
the transfers does not slow down); the nvme loop <= 1.1 x max(resident loop, disk bound); the
loops of the cpu modes <= 1.05 x resident's. GB = 1e9 bytes.

    # tiny, on CPU (a few-M-param Llama, gloo, CPU accelerator), to check it works:
    python benchmarks/rlhf_gpu.py --tiny --path /var/tmp/rlhf --out /tmp/rlhf_cpu.json
    # H100 (80 GB): actor 1.57 B, critic 1.51 B, reference 1.57 B (3.1 GB bf16); ~8 min for
    # three modes (the JSON is rewritten after each mode, so a cut-off run keeps what it had)
    python benchmarks/rlhf_gpu.py --path /local_nvme/rlhf --modes resident nvme upstream_cpu \
        --out benchmarks/results/rlhf_gpu_h100.json --plot benchmarks/results/rlhf_gpu_h100.png
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
# zarr imports cupy when installed; on the H100 image that import segfaulted (see offload_gpu.py).
sys.modules.setdefault("cupy", None)

from measure import (  # noqa: E402  (benchmarks/ is sys.path[0] for a script)
    GB,
    machine_info,
    median,
    raw_aio_bandwidth,
    rnd,
    set_launch_env,
    sync_caller_stream,
    sync_device,
    timed,
)

MODES = ("resident", "nvme", "upstream_cpu", "pinned_cpu")
AUTO_SHARES = {"auto": None, "auto_b50": 0.5, "auto_b25": 0.25}  # host budget: share of offloaded bytes
ATTACHED = ("nvme", "pinned_cpu", *AUTO_SHARES)  # the modes that attach nvme_tier
PHASES = (
    "actor_wait",
    "actor_train",
    "actor_offload",
    "generation",
    "critic_wait",
    "critic_train",
    "critic_offload",
    "scoring",
)


def spread(xs: list[float]) -> dict[str, float | None]:
    """min, quartiles and max of the steady iterations' values (quartiles need two or more)."""
    q1, q2, q3 = (
        statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (None, median(xs), None)
    )
    return {"min": rnd(min(xs)), "q1": rnd(q1), "median": rnd(q2), "q3": rnd(q3), "max": rnd(max(xs))}


# -- models and engines -----------------------------------------------------------------------------
def llama_config(args, layers: int, hidden: int, inter: int):
    from transformers import LlamaConfig

    heads = max(1, hidden // 128) if not args.tiny else 4
    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(2048, args.seq),
        pad_token_id=0,  # the value head reads the last non-pad token; inputs never hold 0
        tie_word_embeddings=False,
    )


def build_model(kind: str, config) -> torch.nn.Module:
    """Random init straight on the accelerator in bf16 (no download, no fp32 host copy)."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from nvme_tier.deepspeed.accelerator import accelerator_device

    torch.manual_seed({"actor": 0, "critic": 1, "ref": 2}[kind])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(accelerator_device()):
            if kind == "critic":
                config.num_labels = 1
                return LlamaForSequenceClassification(config)
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def build_engine(kind: str, model: torch.nn.Module, args):
    import deepspeed

    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.batch,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
    }
    if kind == "ref":
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
        engine.eval()
        return engine
    # DeepSpeed picks FusedAdam on CUDA (upstream offload_states needs it); on CPU its CPU Adam.
    cfg["optimizer"] = {"type": "Adam", "params": {"lr": 1e-5}}
    engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
    return engine


def tokens(args, batch: int, seq: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randint(1, args.vocab, (batch, seq), generator=gen).to(device)


def timed_on_caller_stream(fn: Callable[[], object]) -> float:
    """A phase's time as the caller sees it (a device-wide sync would charge nvme_tier's copies on
    its own stream to the phase)."""
    return timed(fn, sync=sync_caller_stream)


class Loop:
    """The three engines, the fixed work, and one mode's iterations."""

    def __init__(self, args):
        self.args = args
        from nvme_tier.deepspeed.accelerator import accelerator_device

        self.device = accelerator_device()
        self.cuda = self.device.type == "cuda"
        a = args
        self.configs = {
            "actor": llama_config(a, a.layers, a.hidden, a.inter),
            "critic": llama_config(a, a.layers, a.hidden, a.inter),
            "ref": llama_config(a, a.ref_layers, a.ref_hidden, a.ref_inter),
        }
        self.engines = {}
        self.params = {}
        for kind, config in self.configs.items():
            model = build_model(kind, config)
            self.params[kind] = sum(p.numel() for p in model.parameters())
            self.engines[kind] = build_engine(kind, model, a)
            print(f"{kind}: {self.params[kind] / 1e9:.3f} B params", flush=True)
        self.gen = torch.Generator().manual_seed(0)
        self.gen_steps = 0
        self.score_steps = 0
        self.kv_work_rows = 1  # rows of the KV tensor each decode step reads (set by calibrate)
        self.losses: dict[str, list[float]] = {"actor": [], "critic": []}

    # -- the work ----------------------------------------------------------------------------------
    def train(self, kind: str) -> None:
        engine, a = self.engines[kind], self.args
        for _ in range(a.train_steps):
            ids = tokens(a, a.batch, a.seq, self.gen, self.device)
            if kind == "actor":
                loss = engine(input_ids=ids, labels=ids).loss
            else:
                values = engine(input_ids=ids).logits.float().squeeze(-1)
                loss = (values - 1.0).pow(2).mean()
            engine.backward(loss)
            engine.step()
            self.losses[kind].append(loss.item())
        sync_caller_stream()

    def decode_step(self, kv: torch.Tensor, token: torch.Tensor) -> None:
        """One token through the reference model, then attention-shaped reads over a fixed slice of
        the KV tensor (the work does not depend on how much KV memory was granted)."""
        with torch.no_grad():
            self.engines["ref"](input_ids=token, use_cache=False)
            h = self.configs["ref"].hidden_size
            keys = kv[: self.kv_work_rows * h].view(self.kv_work_rows, h)
            q = torch.ones(self.args.gen_batch, h, dtype=kv.dtype, device=kv.device)
            (q @ keys.T).softmax(-1) @ keys

    def allocate_kv(self, want: int) -> tuple[torch.Tensor, int]:
        """A KV-cache-sized tensor of ``want`` bytes, or the most that fits (halving down)."""
        floor = self.kv_work_rows * self.configs["ref"].hidden_size * 2
        size = max(want, floor)
        while True:
            try:
                kv = torch.empty(size // 2, dtype=torch.bfloat16, device=self.device)
                kv.fill_(0.01)  # touch every page, as a cache being written does
                return kv, size
            except torch.OutOfMemoryError:
                if size <= floor:
                    raise
                size = max(floor, size // 2)
                gc.collect()
                torch.cuda.empty_cache()

    def generation(self, steps: int, kv_bytes: int, at: int = -1, prefetch: Callable | None = None) -> dict:
        kv, granted = self.allocate_kv(kv_bytes)
        token = tokens(self.args, self.args.gen_batch, 1, self.gen, self.device)
        issued = 0.0
        for i in range(steps):
            if i == at and prefetch is not None:
                issued = timed_on_caller_stream(prefetch)
            self.decode_step(kv, token)
        sync_caller_stream()
        del kv
        return {"kv_bytes": granted, "prefetch_call_s": issued}

    def scoring(self, steps: int, prefetch: Callable | None = None) -> float:
        issued = timed_on_caller_stream(prefetch) if prefetch is not None else 0.0
        with torch.no_grad():
            for _ in range(steps):
                ids = tokens(self.args, self.args.gen_batch, self.args.seq, self.gen, self.device)
                self.engines["ref"](input_ids=ids, use_cache=False)
        sync_caller_stream()
        return issued

    def calibrate(self) -> dict:
        """Steps of generation/scoring that take --gen-seconds/--score-seconds with nothing in flight;
        every mode then runs exactly that work."""
        a = self.args
        self.kv_work_rows = max(1, int(a.kv_work_gb * GB) // (2 * self.configs["ref"].hidden_size))
        self.generation(2, 0)  # warm-up
        self.scoring(1)
        t_gen = timed_on_caller_stream(lambda: self.generation(a.calib_steps, 0)) / a.calib_steps
        t_score = timed_on_caller_stream(lambda: self.scoring(2)) / 2
        self.gen_steps = max(4, round(a.gen_seconds / t_gen))
        self.score_steps = max(1, round(a.score_seconds / t_score))
        return {
            "decode_step_s": rnd(t_gen, 5),
            "score_step_s": rnd(t_score, 5),
            "gen_steps": self.gen_steps,
            "score_steps": self.score_steps,
            "kv_work_bytes": self.kv_work_rows * self.configs["ref"].hidden_size * 2,
        }

    def iteration(self, it: int, mover: Transfers) -> dict:
        a = self.args
        actor, critic = self.engines["actor"], self.engines["critic"]
        ph: dict[str, float] = {}
        reset_peak()
        t0 = time.perf_counter()
        ph["actor_wait"] = timed_on_caller_stream(lambda: mover.wait(actor))
        ph["actor_train"] = timed_on_caller_stream(lambda: self.train("actor"))
        ph["actor_offload"] = timed_on_caller_stream(lambda: mover.offload(actor))
        at = min(self.gen_steps - 1, int(a.prefetch_at * self.gen_steps))
        t = time.perf_counter()
        gen = self.generation(self.gen_steps, a.kv_gb_bytes, at, lambda: mover.reload(critic))
        ph["generation"] = time.perf_counter() - t
        ph["critic_wait"] = timed_on_caller_stream(lambda: mover.wait(critic))
        ph["critic_train"] = timed_on_caller_stream(lambda: self.train("critic"))
        ph["critic_offload"] = timed_on_caller_stream(lambda: mover.offload(critic))
        t = time.perf_counter()
        actor_call = self.scoring(self.score_steps, lambda: mover.reload(actor))
        ph["scoring"] = time.perf_counter() - t
        loop_s = time.perf_counter() - t0
        waits_and_calls = ("actor_wait", "actor_offload", "critic_wait", "critic_offload")
        blocked = sum(ph[k] for k in waits_and_calls) + gen["prefetch_call_s"] + actor_call
        return {
            "iter": it,
            "loop_s": rnd(loop_s),
            "blocked_s": rnd(blocked),
            "phases_s": {k: rnd(v) for k, v in ph.items()},
            "prefetch_call_s": {"critic": rnd(gen["prefetch_call_s"]), "actor": rnd(actor_call)},
            "kv_bytes": gen["kv_bytes"],
            "peak_device_bytes": peak(),
            **mover.in_loop_transfers(),
        }

    # -- one mode --------------------------------------------------------------------------------
    def run_mode(self, mode: str) -> dict:
        import nvme_tier

        actor, critic = self.engines["actor"], self.engines["critic"]
        mover = Transfers(mode, actor, critic, self.args)
        iters = []
        try:
            mover.offload(critic)  # the loop starts with the actor resident and the critic away
            mover.wait(critic)
            for it in range(self.args.iters):
                iters.append(self.iteration(it, mover))
                print(mode, json.dumps(iters[-1]), flush=True)
            final_wait = timed_on_caller_stream(lambda: mover.wait(actor))
            mover.reload(critic)  # every state back before the next mode (and detach)
            mover.wait(critic)
        finally:
            if mode in ATTACHED:
                nvme_tier.detach(actor)
                nvme_tier.detach(critic)
        steady = iters[1:] if len(iters) > 1 else iters
        disk = {k: median([r["disk_bytes"][k] for r in steady]) for k in ("written", "read")}
        return {
            "iters": iters,
            "final_wait_s": rnd(final_wait),
            "steady_iters": len(steady),
            "steady_loop_s": rnd(median([r["loop_s"] for r in steady])),
            "steady_loop_spread_s": spread([r["loop_s"] for r in steady]),
            "steady_blocked_s": rnd(median([r["blocked_s"] for r in steady])),
            "steady_phases_s": {p: rnd(median([r["phases_s"][p] for r in steady])) for p in PHASES},
            "steady_phases_spread_s": {p: spread([r["phases_s"][p] for r in steady]) for p in PHASES},
            "steady_disk_bytes": disk,
            "bytes_by_tier": mover.placed,
            "losses_finite": all(torch.isfinite(torch.tensor(v)).all().item() for v in self.losses.values()),
        }


class Transfers:
    """How a mode moves the trained engines' states: nvme_tier, upstream, or not at all."""

    def __init__(self, mode: str, actor, critic, args):
        import nvme_tier

        self.mode = mode
        self.cuda = torch.cuda.is_available()
        self.done: list[Any] = []  # nvme_tier's TransferStats of the transfers finished since last asked
        self.placed: dict[str, dict] = {}
        if mode in ATTACHED:
            block = {"device": {"nvme": "nvme", "pinned_cpu": "cpu"}.get(mode, "auto"), "progress": False}
            budget_mb = auto_budget_mb(mode, (actor, critic), args)
            if budget_mb is not None:
                block["host_budget_mb"] = budget_mb
            for name, engine in (("actor", actor), ("critic", critic)):
                if mode != "pinned_cpu":
                    block.update(path=os.path.join(args.path, name), backend=args.backend)
                nvme_tier.attach(engine, block)
        self.engines = (actor, critic)
        self.prefetch = torch.cuda.Stream() if self.cuda else None

    def offload(self, engine) -> None:
        if self.mode == "resident":
            return
        if self.mode == "upstream_cpu":
            from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

            engine.offload_states(device=OffloadDeviceEnum.cpu, pin_memory=True, non_blocking=True)
        else:
            import nvme_tier

            engine.offload_states(non_blocking=True)
            name = "actor" if engine is self.engines[0] else "critic"  # where each byte goes, per tier
            self.placed[name] = {
                k: dict(e.bytes_by_tier) for k, e in nvme_tier.offload_status(engine).items()
            }

    def reload(self, engine) -> None:
        """A prefetch, issued on a stream of its own: a non-blocking reload orders the stream it is
        called on after its copies (upstream's and nvme_tier's alike), and the generation or scoring
        running on the default stream must not wait for them. ``wait`` syncs before training."""
        if self.mode == "resident":
            return
        with torch.cuda.stream(self.prefetch) if self.prefetch is not None else contextlib.nullcontext():
            engine.reload_states(non_blocking=True)

    def wait(self, engine) -> None:
        """Until ``engine`` may compute: nvme_tier's wait; upstream's copies are on the compute
        stream, so a device sync is what the next step would wait for."""
        if self.mode in ATTACHED:
            import nvme_tier

            nvme_tier.wait(engine)
            self._collect(engine)
        sync_device()

    def _collect(self, engine) -> None:
        import nvme_tier

        stats = nvme_tier.controller_of(engine).last_stats
        for key in ("offload", "reload"):
            s = stats.pop(key, None)
            if s is not None:
                self.done.append(s)

    def in_loop_transfers(self) -> dict[str, Any]:
        """Seconds and NVMe bytes of nvme_tier's transfers finished since the last call (in steady
        iterations: one offload and one reload of each trained engine)."""
        done, self.done = self.done, []
        seconds = rnd(sum(s.seconds for s in done)) if self.mode in ATTACHED else None
        return {
            "transfer_s_in_loop": seconds,
            "disk_bytes": {
                "written": sum(s.bytes_written for s in done),
                "read": sum(s.bytes_read for s in done),
            },
        }


def auto_budget_mb(mode: str, engines, args) -> int | None:
    """auto_b50/auto_b25: that share of the bytes the engines offload (their states but the scratch
    buffer, measured resident), plus the staging the budget also covers; auto: --host-budget-mb."""
    from nvme_tier.deepspeed.locators import buffers_present

    share = AUTO_SHARES.get(mode)
    if share is None:
        return args.host_budget_mb if mode == "auto" else None
    offloaded = sum(
        n for e in engines for kind, n in buffers_present(e).items() if kind.value != "contiguous_grad_buffer"
    )
    return 512 + int(share * offloaded) // (1 << 20)  # 512: the default staging_budget_mb


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


# -- summary, plot, main ----------------------------------------------------------------------------
def summarize(out: dict) -> dict:
    """Each mode against resident (same run) and its disk bound; the goals of issue 22."""
    modes, raw = out["modes"], out["raw_aio"]
    base = modes.get("resident", {})
    summary = {}
    for mode, res in modes.items():
        if "error" in res or mode == "resident" or "steady_loop_s" not in base:
            continue
        disk = res["steady_disk_bytes"]
        disk_bound = disk["written"] / raw["write_Bps"] + disk["read"] / raw["read_Bps"] if raw else None
        bound = max(base["steady_loop_s"], disk_bound or 0.0)
        row: dict[str, Any] = {
            "steady_loop_s": res["steady_loop_s"],
            "resident_loop_s": base["steady_loop_s"],
            "disk_GB_per_iter": {k: rnd(v / GB, 2) for k, v in disk.items()},
            "disk_bound_s": rnd(disk_bound),
            "loop_over_bound": rnd(res["steady_loop_s"] / bound, 3),
            "blocked_s": res["steady_blocked_s"],
        }
        for phase in ("generation", "scoring"):
            row[f"{phase}_over_resident"] = rnd(
                res["steady_phases_s"][phase] / base["steady_phases_s"][phase], 3
            )
        row["goal_phases_within_5pct"] = all(
            row[f"{p}_over_resident"] <= 1.05 for p in ("generation", "scoring")
        )
        limit = 1.1 if disk_bound else 1.05  # a mode that moves bytes through the disk, or host RAM only
        row[f"goal_loop_le_{limit}x_bound"] = row["loop_over_bound"] <= limit
        summary[mode] = row
    return summary


def plot(out: dict, png: str) -> None:
    """Stacked per-phase bars per mode (needs the optional extra "plot": matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'nvme_tier[plot]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m, r in out["modes"].items() if "error" not in r]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    left = [0.0] * len(modes)
    colors = plt.get_cmap("tab10").colors
    for i, phase in enumerate(PHASES):
        widths = [out["modes"][m]["steady_phases_s"][phase] or 0.0 for m in modes]
        ax.barh(modes, widths, left=left, color=colors[i % 10], label=phase)
        left = [x + w for x, w in zip(left, widths, strict=True)]
    for y, m in enumerate(modes):
        s = out["summary"].get(m, {})
        label = f"{left[y]:.2f} s" + (f"  {s['loop_over_bound']}x bound" if s.get("loop_over_bound") else "")
        ax.text(left[y], y, " " + label, va="center", fontsize=8)
    ax.set_xlabel("steady iteration wall time (s), by phase")
    dev = out["machine"].get("gpu", "CPU")
    ax.set_title(
        f"RLHF-like loop: actor {out['params']['actor'] / 1e9:.3g} B + critic {out['params']['critic'] / 1e9:.3g} B, {dev}",
        fontsize=10,
    )
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.08))
    ax.set_xlim(0, max(left) * 1.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", required=True, help="scratch directory for the NVMe files")
    p.add_argument("--out", help="write the JSON here (again after every mode)")
    p.add_argument("--plot", help="write a PNG of per-phase times here")
    p.add_argument("--tiny", action="store_true", help="a few-M-param Llama: checks the loop on CPU")
    p.add_argument("--modes", nargs="+", choices=(*MODES, *AUTO_SHARES), default=list(MODES))
    p.add_argument("--host-budget-mb", type=int, help="host_budget_mb of mode auto (default: auto's own)")
    p.add_argument("--backend", default="auto", choices=("auto", "aio", "zarr"))
    p.add_argument("--iters", type=int, default=9, help="iterations per mode; the first is left out")
    p.add_argument("--raw-aio-gb", type=float, default=4.0, help="bytes of the raw aio bandwidth probe")
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layers", type=int, default=28, help="actor/critic: 28 x 2048 = 1.57 B / 1.51 B")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5632)
    p.add_argument("--ref-layers", type=int, default=28)
    p.add_argument("--ref-hidden", type=int, default=2048)
    p.add_argument("--ref-inter", type=int, default=5632)
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--gen-seconds", type=float, default=10.0, help="generation work, calibrated idle")
    p.add_argument("--score-seconds", type=float, default=5.0, help="scoring work, calibrated idle")
    p.add_argument("--calib-steps", type=int, default=20)
    p.add_argument("--kv-gb", type=float, default=20.0, help="KV-cache tensor allocated in generation")
    p.add_argument("--kv-work-gb", type=float, default=1.0, help="KV bytes read per decode step")
    p.add_argument(
        "--prefetch-at",
        type=float,
        default=0.25,
        help="fraction of generation at which the critic's reload is issued",
    )
    args = p.parse_args(argv)
    if args.tiny:
        tiny = dict(
            vocab=2048, layers=2, hidden=256, inter=512, ref_layers=1, ref_hidden=256, ref_inter=512,
            batch=2, seq=64, gen_batch=2, gen_seconds=0.5, score_seconds=0.3, calib_steps=4,
            kv_gb=0.02, kv_work_gb=0.002, iters=3, raw_aio_gb=0.1,
        )  # fmt: skip
        for k, v in tiny.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.kv_gb_bytes = int(args.kv_gb * GB)
    args.modes = ["resident", *(m for m in args.modes if m != "resident")]  # the reference, same run
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    set_launch_env()
    os.makedirs(args.path, exist_ok=True)
    loop = Loop(args)
    out: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k != "kv_gb_bytes"},
        "machine": {**machine_info(args.path), "transformers": sys.modules["transformers"].__version__},
        "params": loop.params,
        "raw_aio": raw_aio_bandwidth(args.path, int(args.raw_aio_gb * GB)),
        "calibration": loop.calibrate(),
        "modes": {},
    }

    def save() -> None:
        out["summary"] = summarize(out)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as fh:
                json.dump(out, fh, indent=1)
                fh.write("\n")

    for mode in args.modes:
        gc.collect()
        try:
            out["modes"][mode] = loop.run_mode(mode)
        except Exception as exc:  # e.g. upstream refusing the CPU accelerator's Adam
            out["modes"][mode] = {"error": f"{type(exc).__name__}: {exc}"}
            print(mode, "failed:", out["modes"][mode]["error"], flush=True)
        save()
    print(json.dumps(out["summary"], indent=1))
    if args.plot:
        plot(out, args.plot)
    with contextlib.suppress(OSError):
        shutil.rmtree(args.path)
    return out


if __name__ == "__main__":
    main()
