"""Swap bandwidth: how fast can one state tensor leave the device and come back, by method.

Methods, all in one run on the same bytes:

* ``raw_aio``      DeepSpeed's aio_handle writing a page-locked buffer straight to a file (O_DIRECT,
                   no staging copy): the disk's ceiling as DeepSpeed sees it.
* ``aio_backend``  nvme_tier's AioBackend from device memory (CUDA when present, else a CPU tensor):
                   staging copies, crc32c and padding included.
* ``zarr_backend`` nvme_tier's ZarrBackend (page cache, no libaio).
* ``pinned_copy``  device -> pinned host copy and back (on CPU only: a plain host copy).
* ``torch_save``   naive ``torch.save`` / ``torch.load`` of the tensor.

For each: write and read GB/s (1 GB = 1e9 bytes), the host memory the method added (peak RSS delta
from a sampling thread and from the kernel's VmHWM, plus pinned/staging bytes where known), and
an exact round-trip check. Page-cache methods also report write GB/s including ``os.sync()``;
reads are cold only where dropping the page cache worked (recorded in the JSON).

    python benchmarks/swap_bandwidth.py --size-gb 1 --path /mnt/nvme/bench \
        --json benchmarks/results/swap_bandwidth.json --plot benchmarks/results/swap_bandwidth.png
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch

from nvme_tier.bench.common import (  # noqa: E402
    RssSampler,
    drop_page_cache,
    machine_info,
    methods_table,
    sync_device,
    timed,
)
from nvme_tier.bench.swap_methods import METHOD_CLASSES, Method
from nvme_tier.deepspeed.ops import aio_compatible  # noqa: E402
from nvme_tier.storage import supports_o_direct  # noqa: E402
from nvme_tier.units import MiB

METHODS = ("raw_aio", "aio_backend", "zarr_backend", "pinned_copy", "torch_save")
ALIGN = 1 * MiB  # sizes are rounded to this so raw O_DIRECT I/O needs no padding
DEFAULT_SIZE_GB = 0.25  # a few seconds per method on a laptop SSD; pass --size-gb 1+ for real numbers


@dataclass
class Result:
    write_s: list[float] = field(default_factory=list)
    write_sync_s: list[float] = field(default_factory=list)
    read_s: list[float] = field(default_factory=list)
    setup_s: float = 0.0  # setup and the untimed warm-up round, reported apart from the rounds
    setup_rss: int = 0  # RSS the method's setup added (buffers it keeps while offloaded)
    round_rss: int = 0  # peak RSS delta within one write or read
    pinned_bytes: int = 0
    on_disk_bytes: int = 0
    exact: bool = True
    notes: list[str] = field(default_factory=list)
    cold_reads: bool | None = None
    page_cache: bool = False

    def as_dict(self, nbytes: int) -> dict:
        def gbps(samples: list[float]) -> float | None:
            return round(nbytes / statistics.median(samples) / 1e9, 4) if samples else None

        return {
            "write_GBps": gbps(self.write_s),
            "write_plus_sync_GBps": gbps(self.write_sync_s),
            "read_GBps": gbps(self.read_s),
            "write_s": [round(x, 4) for x in self.write_s],
            "read_s": [round(x, 4) for x in self.read_s],
            "setup_s": round(self.setup_s, 4),
            "host_peak_rss_delta_bytes": self.setup_rss + self.round_rss,
            "host_rss_setup_bytes": self.setup_rss,
            "host_rss_peak_in_round_bytes": self.round_rss,
            "pinned_or_staging_bytes": self.pinned_bytes,
            "on_disk_bytes": self.on_disk_bytes,
            "bytes": nbytes,
            "round_trip_exact": self.exact,
            "uses_page_cache": self.page_cache,
            "cold_reads": self.cold_reads,
            "notes": self.notes,
        }


class Bench:
    """Runs the methods round-robin (round 1 of every method, then round 2, ...), so slow drift of
    the disk (host caches, burst credits, neighbours) hits every method alike."""

    def __init__(self, args: argparse.Namespace, src: torch.Tensor, dst: torch.Tensor):
        self.args = args
        self.src, self.dst = src, dst
        self.nbytes = src.numel()
        self.staging = args.staging_mb * MiB
        self.drop_ok = False

    def run(self, names: list[str]) -> dict[str, Result]:
        methods: dict[str, Method] = {}
        results: dict[str, Result] = {}
        try:
            for name in names:
                workdir = os.path.join(self.args.path, name)
                os.makedirs(workdir, exist_ok=True)
                method = METHOD_CLASSES[name](self, workdir)
                result = results[name] = Result(page_cache=method.page_cache)
                gc.collect()
                started = time.perf_counter()
                with RssSampler(kernel_hwm=True) as mem:
                    method.setup()
                    self._warm_up(method)
                result.setup_s = time.perf_counter() - started
                result.setup_rss = mem.delta
                methods[name] = method
            for rep in range(self.args.repeats):
                for name, method in methods.items():
                    print(f"[round {rep + 1}/{self.args.repeats}] {name}", flush=True)
                    self._round(method, results[name])
        finally:
            for name, method in methods.items():
                with contextlib.suppress(Exception):
                    method.teardown()
                shutil.rmtree(os.path.join(self.args.path, name), ignore_errors=True)
        for name, method in methods.items():
            r = results[name]
            r.pinned_bytes, r.on_disk_bytes = method.pinned_bytes, method.on_disk_bytes
            r.notes = list(method.notes)
            if not method.page_cache:
                r.cold_reads = None if name == "pinned_copy" else True
        return results

    def _warm_up(self, method: Method) -> None:
        """One untimed write and read of the full size: what only a first round would pay (the
        staging pool's allocation, handles and threads, the file's first extents) stays out of the
        timed rounds, as it stays out of a long-lived engine's offloads after the first."""
        method.prepare_write()
        method.write()
        method.prepare_read()
        method.read()

    def _round(self, method: Method, result: Result) -> None:
        method.prepare_write()
        os.sync()
        gc.collect()
        with RssSampler(kernel_hwm=True) as mem:
            result.write_s.append(timed(method.write))
        result.round_rss = max(result.round_rss, mem.delta)
        if method.page_cache:
            t0 = time.perf_counter()
            os.sync()
            result.write_sync_s.append(result.write_s[-1] + time.perf_counter() - t0)
        self.dst.zero_()
        method.prepare_read()
        sync_device()
        dropped = drop_page_cache()
        self.drop_ok = self.drop_ok or dropped
        if method.page_cache:
            result.cold_reads = dropped if result.cold_reads is None else (result.cold_reads and dropped)
        gc.collect()
        with RssSampler(kernel_hwm=True) as mem:
            result.read_s.append(timed(method.read))
        result.round_rss = max(result.round_rss, mem.delta)
        result.exact = result.exact and method.result_ok()


# -- reporting -------------------------------------------------------------------------------------
def ratios(methods: dict) -> dict:
    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = methods.get(a, {}).get(key), methods.get(b, {}).get(key)
        return round(x / y, 3) if x and y else None

    out = {}
    for a, b, label in (
        ("aio_backend", "raw_aio", "aio_backend_vs_raw"),
        ("zarr_backend", "raw_aio", "zarr_backend_vs_raw"),
        ("torch_save", "raw_aio", "torch_save_vs_raw"),
        ("aio_backend", "zarr_backend", "aio_backend_vs_zarr"),
        ("aio_backend", "torch_save", "aio_backend_vs_torch_save"),
    ):
        out[f"{label}_write"] = ratio(a, b, "write_GBps")
        out[f"{label}_read"] = ratio(a, b, "read_GBps")
    return out


HEADER = ["method", "write GB/s", "+sync", "read GB/s", "cold", "setup s", "RSS +MiB", "pinned MiB", "ok"]
COLUMNS = """columns of the table (medians of the timed rounds; 1 GB = 1e9 bytes):
  method      raw_aio: DeepSpeed's aio handle, page-locked buffer, O_DIRECT (the disk's ceiling);
              aio_backend / zarr_backend: nvme_tier's backends from device memory (staging, crc32c);
              pinned_copy: device <-> (pinned) host copy; torch_save: torch.save / torch.load
  write GB/s  write throughput; for page-cache methods the data may still be in RAM
  +sync       write throughput including os.sync() (data on disk); '-': the method does not
              go through the page cache (aio: O_DIRECT, already on disk; pinned_copy: no disk)
  read GB/s   read throughput back into the device tensor
  cold        T: every read came from the disk (O_DIRECT, or the page cache was dropped first);
              F: the page cache could not be dropped (needs root), reads may have hit RAM;
              '-': no disk involved (pinned_copy)
  setup s     seconds of set-up plus one untimed warm-up write and read, kept out of the rounds
  RSS +MiB    host memory the method added: set-up plus the peak within a round
  pinned MiB  page-locked host memory (staging buffers or the pinned copy)
  ok          yes: every round trip was bit-exact"""


def table_row(name: str, m: dict) -> list:
    return [
        name,
        *(
            f"{x:.2f}" if isinstance(x, float) else None
            for x in (m["write_GBps"], m["write_plus_sync_GBps"], m["read_GBps"])
        ),
        None if m["cold_reads"] is None else str(m["cold_reads"])[:1],
        f"{m['setup_s']:.1f}",
        f"{m['host_peak_rss_delta_bytes'] / MiB:.0f}",
        f"{m['pinned_or_staging_bytes'] / MiB:.0f}",
        "yes" if m["round_trip_exact"] else "NO",
    ]


def print_table(report: dict) -> None:
    print(methods_table(report["methods"], HEADER, table_row))
    for k, v in report["ratios"].items():
        if v is not None:
            print(f"  {k}: {v}")


def plot(report: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, m in report["methods"].items() if "skipped" not in m]
    w = [report["methods"][n]["write_GBps"] or 0 for n in names]
    r = [report["methods"][n]["read_GBps"] or 0 for n in names]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    b1 = ax.bar([x - 0.2 for x in xs], w, 0.4, label="write (device -> tier)")
    b2 = ax.bar([x + 0.2 for x in xs], r, 0.4, label="read (tier -> device)")
    ax.bar_label(b1, fmt="%.2f", fontsize=8)
    ax.bar_label(b2, fmt="%.2f", fontsize=8)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("GB/s (1e9 B/s)")
    m = report["machine"]
    dev = m.get("gpu", "CPU only")
    ax.set_title(
        f"swap bandwidth, {report['size_bytes'] / 1e9:.2f} GB, {dev}, {m['cpus']} cores, {m['disk']['filesystem']}",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------
def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=COLUMNS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--size-gb",
        type=float,
        default=DEFAULT_SIZE_GB,
        help="tensor size in GB (1e9 bytes; default %(default)s)",
    )
    p.add_argument(
        "--path",
        help="scratch directory on the disk under test (default: a new temporary directory under "
        "$TMPDIR, removed at the end)",
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a bar chart (PNG) here")
    p.add_argument("--staging-mb", type=int, default=512, help="staging budget of the backends (MiB)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument(
        "--repeats", type=int, default=3, help="rounds per method (interleaved); the median is reported"
    )
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    p = build_parser(prog)
    args = p.parse_args(argv)

    nbytes = max(ALIGN, int(args.size_gb * 1e9) // ALIGN * ALIGN)
    created_path = args.path is None or not os.path.exists(args.path)
    if args.path is None:
        args.path = tempfile.mkdtemp(prefix="nvme_tier_bench_")
        print(f"scratch directory {args.path} (removed at the end; pass --path to choose the disk)")
    os.makedirs(args.path, exist_ok=True)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).to(device)
    dst = torch.zeros_like(src)
    bench = Bench(args, src, dst)
    aio_ok, aio_why = aio_compatible()
    if aio_ok and not supports_o_direct(args.path):
        aio_ok, aio_why = False, f"{args.path} does not support O_DIRECT"

    machine = {**machine_info(args.path), "aio_usable": aio_ok, "aio_reason": aio_why}
    methods: dict[str, dict] = {}
    runnable = []
    for name in args.methods:
        if name in ("raw_aio", "aio_backend") and not aio_ok:
            methods[name] = {"skipped": aio_why}
        else:
            runnable.append(name)
    try:
        for name, result in bench.run(runnable).items():
            methods[name] = result.as_dict(nbytes)
    finally:
        if created_path:
            shutil.rmtree(args.path, ignore_errors=True)
    methods = {name: methods[name] for name in args.methods}  # keep the requested order

    machine["drop_caches_worked"] = bench.drop_ok or drop_page_cache()
    machine["device"] = str(device)
    report = {
        "machine": machine,
        "size_bytes": nbytes,
        "staging_mb": args.staging_mb,
        "repeats": args.repeats,
        "methods": methods,
        "ratios": ratios(methods),
    }
    print_table(report)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
            fh.write("\n")
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
