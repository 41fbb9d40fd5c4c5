"""End-to-end offload figures on one ZeRO-3 bf16 engine, every method in ONE run, one JSON.

What it measures, in this order (each phase writes the JSON again, so a cut-off run keeps what it had):

* limits       pinned PCIe copies (device <-> page-locked host) and raw DeepSpeed aio (one
               aio_handle, a page-locked buffer, O_DIRECT, on the same path): the ceilings.
* nvme         nvme_tier with the default nvme policy (optim_states -> nvme, hp_params/lp_params/
               lp_grads -> pinned_cpu, contiguous_grad_buffer discarded): first call and steady
               cycles, per-state cycles (include=[state]), peak host RSS (psutil, sampling thread)
               and pinned bytes, bit-exactness of every state buffer after each reload.
* checksum     NVMe-only offload/reload (include=["optim_states"]) with checksum true vs false,
               alternated; also the host memory an NVMe-only offload adds vs the staging budget.
* non_blocking how long offload_states(non_blocking=True) takes to return, and the total.
* zarr         the zarr backend on the same state (write, write + sync, cold read).
* torch_save   naive torch.save / torch.load of the same optimizer-state tensors.
* pinned_cpu   the pinned_cpu tier (device="cpu" policy: everything to page-locked host RAM):
               first call after attach and steady state.
* upstream     DeepSpeed's own offload_states(device=cpu, pin_memory=True) after
               nvme_tier.detach(engine): first call and steady state.

Each phase is one function in the PHASES table below (offload_limits.py: no engine;
offload_phases.py: on the engine) and returns the JSON entries it measured; the goals are data
(GOALS), judged on the JSON by ``judge``. Shared tools: measure.py.

GB = 1e9 bytes. Works on CPU too (small sizes), e.g.:

    python benchmarks/offload_gpu.py --params-b 0.01 --hidden 1024 --raw-gb 0.25 --path /var/tmp/ob

GPU (H100 figures in docs/performance.md):

    python benchmarks/offload_gpu.py --params-b 1.6 --hidden 8192 --path /tmp/nvme/bench \
        --json benchmarks/results/offload_gpu_h100.json --plot benchmarks/results/offload_gpu_h100.png
"""

from __future__ import annotations

import argparse
import logging
import operator
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# zarr imports cupy (for GPU buffers, which nvme_tier never hands it) when cupy is installed; on the
# H100 image that import (cupy -> ml_dtypes) segfaulted. Make it an ImportError, as without cupy.
sys.modules.setdefault("cupy", None)

from measure import GB, format_rows, gbps, machine_info, set_launch_env, write_json  # noqa: E402
from offload_engine import OffloadRun, start_engine  # noqa: E402
from offload_limits import phase_disk, phase_limits, phase_probe  # noqa: E402
from offload_phases import (  # noqa: E402
    phase_checksum,
    phase_non_blocking,
    phase_nvme,
    phase_pinned_cpu,
    phase_torch_save,
    phase_upstream,
    phase_zarr,
)


# -- the phases, in the order they run ---------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    name: str  # as --phases names it
    run: Callable[[OffloadRun], dict[str, Any]]  # returns the top-level JSON entries it measured
    needs_engine: bool  # gets run.engine/ref/sizes (the engine is built before the first such phase)
    default: bool = True  # run unless --phases says otherwise


PHASES = (
    Phase("probe", phase_probe, needs_engine=False, default=False),  # -> probe_pinned_alloc
    Phase("limits", phase_limits, needs_engine=False),  # -> limits
    Phase("disk", phase_disk, needs_engine=False, default=False),  # -> disk
    Phase("nvme", phase_nvme, needs_engine=True),  # -> nvme
    Phase("checksum", phase_checksum, needs_engine=True),  # -> checksum
    Phase("non_blocking", phase_non_blocking, needs_engine=True),  # -> non_blocking
    Phase("zarr", phase_zarr, needs_engine=True),  # -> zarr
    Phase("torch_save", phase_torch_save, needs_engine=True),  # -> torch_save
    Phase("pinned_cpu", phase_pinned_cpu, needs_engine=True),  # -> pinned_cpu (new reference after training)
    Phase("upstream", phase_upstream, needs_engine=True),  # -> upstream_cpu
)


# -- the goals, as data ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    """``measured_key`` (a dotted path into the JSON; ``*`` runs over a dict's keys and names the goal
    once per key; a digit indexes a list), divided by ``versus`` (the largest of its paths) times
    ``scale`` when given, compared ``op threshold``. ``op`` None: reported, not judged. ``op`` "all":
    several paths, met when every value equals ``threshold``. A goal whose values are missing (the
    phase did not run) is left out."""

    name: str
    measured_key: str | tuple[str, ...]
    op: str | None
    threshold: float | bool | None
    versus: str | tuple[str, ...] = ()
    scale: float = 1.0
    note: str = ""


RAW_WRITE, RAW_READ = "limits.raw_aio.write_GBps", "limits.raw_aio.read_GBps"
NVME_OFFLOAD, NVME_RELOAD = "nvme.summary.nvme_offload_GBps", "nvme.summary.nvme_reload_GBps"
EXACT_CHECKS = (
    "nvme.exact_after_first.exact",
    "nvme.exact_after_steady.exact",
    "nvme.exact_after_per_state.exact",
    "checksum.exact.exact",
    "non_blocking.exact.exact",
    "zarr.exact.exact",
    "torch_save.exact.exact",
    "pinned_cpu.runs.*.exact.exact",
)
GOALS = (
    Goal(
        "nvme_offload_vs_raw_aio_write",
        NVME_OFFLOAD,
        ">=",
        0.9,
        versus=(RAW_WRITE, "limits.raw_aio.write_in_place_GBps"),
        note="steady (in-place rewrite) offload of optim_states vs the faster raw write (new file or in place)",
    ),
    Goal("nvme_reload_vs_raw_aio_read", NVME_RELOAD, ">=", 0.9, versus=RAW_READ),
    Goal(
        "nvme_first_offload_vs_raw_aio_write_new_file",
        "nvme.calls.0.nvme_GBps",
        None,
        None,
        versus=RAW_WRITE,
        note="first call: new files, pinned_cpu copies and waiting for pre-allocation in the same call",
    ),
    Goal(
        "nvme_only_host_added_vs_staging_budget",
        "checksum.nvme_only_host_added_GB_max",
        "<=",
        1.1,
        versus="checksum.staging_budget_bytes",
        scale=GB,
        note="fresh attach, include=[optim_states]: RSS peak during the first offload minus RSS before attach",
    ),
    Goal(
        "default_policy_host_added_vs_budget_plus_pinned_cpu",
        "nvme.calls.0.rss_added_GB",
        "<=",
        1.0,
        versus="nvme.host_allowance_bytes",
        scale=GB,
        note="first offload's added RSS vs 1.1 x staging budget + the pinned_cpu state bytes",
    ),
    Goal(
        "pinned_cpu_steady_offload_vs_pcie_d2h[*]",
        "pinned_cpu.runs.*.steady_offload_GBps",
        ">=",
        0.9,
        versus="limits.pcie_pinned.d2h_GBps",
    ),
    Goal(
        "pinned_cpu_steady_reload_vs_pcie_h2d[*]",
        "pinned_cpu.runs.*.steady_reload_GBps",
        ">=",
        0.9,
        versus="limits.pcie_pinned.h2d_GBps",
    ),
    Goal(
        "pinned_cpu_first_over_steady[*]",
        "pinned_cpu.runs.*.first_over_steady",
        "<=",
        2,
        note="first call after attach vs steady",
    ),
    Goal("zarr_write_plus_sync_vs_raw_aio_write", "zarr.write_plus_sync_GBps", ">=", 0.5, versus=RAW_WRITE),
    Goal(
        "zarr_read_vs_raw_aio_read",
        "zarr.read_GBps",
        ">=",
        0.5,
        versus=RAW_READ,
        note="cold only where zarr.rows[].cold_read (dropping the page cache needs root)",
    ),
    Goal(
        "nvme_offload_vs_torch_save",
        NVME_OFFLOAD,
        ">=",
        2.5,
        versus="torch_save.save_GBps",
        note="torch.save without fsync (page cache)",
    ),
    Goal(
        "nvme_offload_vs_torch_save_plus_fsync",
        NVME_OFFLOAD,
        ">=",
        2.5,
        versus="torch_save.save_plus_fsync_GBps",
    ),
    Goal("nvme_reload_vs_torch_load", NVME_RELOAD, None, None, versus="torch_save.load_GBps"),
    Goal(
        "checksum_cost_roundtrip",
        "checksum.roundtrip_cost",
        "<=",
        0.10,
        note="checksum on vs off, offload + reload",
    ),
    Goal("non_blocking_offload_return_ms", "non_blocking.offload_return_ms_max", "<", 50),
    Goal(
        "bit_exact_after_every_reload",
        EXACT_CHECKS,
        "all",
        True,
        note="{n} checks of every state buffer (torch.equal against device snapshots): nvme_tier paths, "
        "zarr and torch.save",
    ),
    Goal(
        "upstream_bit_exact_after_reload",
        "upstream_cpu.exact.exact",
        None,
        None,
        note="DeepSpeed's own reload",
    ),
)
OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
    "all": operator.eq,
}


def find(tree: Any, path: str) -> list[tuple[str | None, Any]]:
    """Every (key that ``*`` stood for, value) at the dotted ``path``; missing and None values left out."""
    found: list[tuple[str | None, Any]] = [(None, tree)]
    for part in path.split("."):
        deeper: list[tuple[str | None, Any]] = []
        for star, node in found:
            if part == "*" and isinstance(node, dict):
                deeper += list(node.items())
            elif isinstance(node, dict) and part in node:
                deeper.append((star, node[part]))
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                deeper.append((star, node[int(part)]))
        found = deeper
    return [(star, value) for star, value in found if value is not None]


def judge(goals: tuple[Goal, ...], out: dict) -> dict[str, dict]:
    """Each goal's value, target and verdict (met: True/False, None for the reported-only ones)."""
    report: dict[str, dict] = {}

    def verdict(name: str, goal: Goal, value: Any, count: int) -> None:
        met = None if goal.op is None else bool(OPS[goal.op](value, goal.threshold))
        target = (
            "(info)" if goal.op is None else ("true" if goal.op == "all" else f"{goal.op} {goal.threshold}")
        )
        report[name] = {"value": value, "target": target, "met": met, "note": goal.note.format(n=count)}

    for goal in goals:
        keys = (goal.measured_key,) if isinstance(goal.measured_key, str) else goal.measured_key
        found = [hit for key in keys for hit in find(out, key)]
        if goal.op == "all":
            if found:
                verdict(goal.name, goal, all(value for _, value in found), len(found))
            continue
        versus = (goal.versus,) if isinstance(goal.versus, str) else goal.versus
        limit = max((v for key in versus for _, v in find(out, key)), default=None)
        for star, value in found:
            if versus:
                if not limit:
                    continue
                value = round(goal.scale * value / limit, 3)
            verdict(goal.name.replace("*", star) if star else goal.name, goal, value, 1)
    return report


# -- plot ------------------------------------------------------------------------------------------
def plot(out: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim, nv = out.get("limits", {}), (out.get("nvme") or {}).get("summary", {})
    bars: list[tuple[str, float | None, float | None, str]] = []  # label, write/offload, read/reload, group
    raw = lim.get("raw_aio") or {}
    bars.append(("raw aio\nnew file", raw.get("write_GBps"), raw.get("read_GBps"), "disk"))
    if raw.get("write_in_place_GBps"):
        bars.append(("raw aio\nin place (limit)", raw.get("write_in_place_GBps"), None, "disk"))
    bars.append(("nvme_tier\nNVMe (aio)", nv.get("nvme_offload_GBps"), nv.get("nvme_reload_GBps"), "disk"))
    z = out.get("zarr") or {}
    bars.append(("nvme_tier\nzarr (+sync)", z.get("write_plus_sync_GBps"), z.get("read_GBps"), "disk"))
    ts = out.get("torch_save") or {}
    bars.append(("torch.save\n/load", ts.get("save_GBps"), ts.get("load_GBps"), "disk"))
    pcie = lim.get("pcie_pinned") or {}
    bars.append(("pinned PCIe\n(limit)", pcie.get("d2h_GBps"), pcie.get("h2d_GBps"), "host"))
    for i, (mode, run) in enumerate(((out.get("pinned_cpu") or {}).get("runs") or {}).items()):
        if i == 0:
            bars.append(("pinned_cpu\nsteady", run["steady_offload_GBps"], run["steady_reload_GBps"], "host"))
        first = gbps(out["pinned_cpu"]["bytes"], run["first_offload_s"])
        bars.append((f"pinned_cpu first\n{mode.replace('_', ' ')}", first, None, "host"))
    up = (out.get("upstream_cpu") or {}).get("rows") or []
    if up:
        bars.append(("upstream cpu\nsteady", up[-1]["offload_GBps"], up[-1]["reload_GBps"], "host"))
        bars.append(("upstream cpu\nfirst", up[0]["offload_GBps"], up[0]["reload_GBps"], "host"))
    fig, ax = plt.subplots(figsize=(14, 5))
    xs = range(len(bars))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [b[1] or 0 for b in bars], w, label="offload / write", color="#3b75af")
    ax.bar([x + w / 2 for x in xs], [b[2] or 0 for b in bars], w, label="reload / read", color="#ef8636")
    for x, b in zip(xs, bars, strict=False):
        for dx, v in ((-w / 2, b[1]), (w / 2, b[2])):
            if v:
                ax.text(x + dx, v * 1.05, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([b[0] for b in bars], fontsize=8)
    ax.set_ylabel("GB/s (log)")
    m = out.get("machine", {})
    ax.set_title(
        f"offload_gpu: {out.get('model', {}).get('params_B')} B params ZeRO-3 bf16 on {m.get('gpu', 'CPU')}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params-b", type=float, default=1.6, help="model size, billions of parameters")
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--bucket", type=int, default=int(5e8), help="ZeRO reduce_bucket_size (elements)")
    p.add_argument(
        "--optimizer",
        choices=("torch", "fused"),
        default="fused",
        help="Adam implementation (upstream offload_states needs FusedAdam)",
    )
    p.add_argument("--path", required=True, help="directory on the disk under test")
    p.add_argument("--backend", default="aio")
    p.add_argument("--staging-mb", type=int, default=512)
    p.add_argument("--raw-gb", type=float, default=4.0, help="bytes of the raw aio / PCIe limit tests")
    p.add_argument("--raw-reps", type=int, default=2)
    p.add_argument("--cycles", type=int, default=2, help="steady offload/reload cycles per measurement")
    p.add_argument("--checksum-reps", type=int, default=2)
    p.add_argument("--zarr-reps", type=int, default=1)
    p.add_argument("--cpu-modes", nargs="+", default=["right_after_attach", "after_training"])
    p.add_argument(
        "--train-seconds",
        type=float,
        default=5.0,
        help="training before the first pinned_cpu call (after_training)",
    )
    p.add_argument("--probe-gb", type=float, default=8.0)
    p.add_argument(
        "--sweep",
        type=lambda s: [tuple(map(int, x.split("x"))) for x in s.split(",")],
        default=[(16, 4), (64, 4), (128, 4)],
        help="chunk_MiBxslots,... compared by the disk phase",
    )
    p.add_argument(
        "--disk-variants",
        nargs="+",
        default=["fresh", "inplace"],
        choices=["fresh", "inplace"],
    )
    p.add_argument("--profile-non-blocking", action="store_true", help="cProfile the first non-blocking call")
    p.add_argument(
        "--phases",
        nargs="+",
        default=[ph.name for ph in PHASES if ph.default],
        choices=[ph.name for ph in PHASES],
    )
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.path, exist_ok=True)
    set_launch_env()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    out: dict[str, Any] = {
        "command": "python "
        + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(args.path),
        "args": dict(vars(args)),
        "phase_seconds": {},
    }

    def save() -> None:  # after every phase: a cut-off run keeps what it had
        out["goals"] = judge(GOALS, out)
        if args.json:
            write_json(args.json, out)

    run = OffloadRun(args)
    for phase in PHASES:
        if phase.name not in args.phases:
            continue
        if phase.needs_engine and run.engine is None:
            out["model"] = start_engine(run)
            print("model", out["model"], flush=True)
        t = time.perf_counter()
        print(f"== {phase.name}", flush=True)
        out.update(phase.run(run))
        out["phase_seconds"][phase.name] = round(time.perf_counter() - t, 1)
        save()
    save()
    if args.plot:
        plot(out, args.plot)
    print("\n== goals")
    rows = [
        ("OK" if g["met"] else ("--" if g["met"] is None else "NO"), name, g["value"], g["target"], g["note"])
        for name, g in out["goals"].items()
    ]
    print(format_rows(("", "goal", "value", "target", "note"), rows))
    return out


if __name__ == "__main__":
    main()
