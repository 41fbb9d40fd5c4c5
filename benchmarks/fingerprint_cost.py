"""Fingerprint cost: what skip_unchanged's change detection adds to an offload, next to the NVMe write.

Every offload with ``skip_unchanged`` fingerprints each state bound for NVMe on its own device
(nvme_tier/fingerprint.py). The goal (issue 13): at most 2 % of the NVMe write of the same bytes.
For buffers of 64 MiB to 4 GiB on the current device (CUDA when present, else CPU) this measures
the fingerprint's throughput (GB/s, 1 GB = 1e9 bytes, median of ``--repeats``), its extra device
memory, a plain ``sum`` of the same bytes as int32 for scale, and the ratio

    fingerprint seconds / write seconds = write GB/s / fingerprint GB/s

with the write GB/s given (``--write-gbps``, default 2.0: the H100 machine's measured raw aio
write) or measured here with DeepSpeed's aio op (``--path`` on the disk under test).

    python benchmarks/fingerprint_cost.py                       # CUDA: 64 MiB .. 4 GiB
    python benchmarks/fingerprint_cost.py --sizes-mib 16 64     # CPU: small sizes
    python benchmarks/fingerprint_cost.py --path /mnt/nvme/bench --out benchmarks/results/fingerprint_cost_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from nvme_tier.bench.common import machine_info  # noqa: E402
from nvme_tier.fingerprint import CHUNK_BYTES, fingerprint  # noqa: E402
from nvme_tier.units import MiB  # noqa: E402

GOAL = 0.02  # fingerprint time / NVMe write time of the same bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up: kernels, caching allocator, the column multiplier table
    samples = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return samples


def extra_device_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by ``fn`` beyond what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure_aio_write_gbps(path: str, nbytes: int, repeats: int) -> float:
    """Median GB/s of DeepSpeed's aio op writing a page-locked buffer to a new file (O_DIRECT)."""
    from nvme_tier.config import AioSettings
    from nvme_tier.deepspeed.ops import load_aio_op

    s = AioSettings()
    handle = load_aio_op().aio_handle(
        s.block_size, s.queue_depth, s.single_submit, s.overlap_events, s.intra_op_parallelism
    )
    if torch.cuda.is_available():
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    else:
        buf = handle.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
    buf.random_(0, 256)
    os.makedirs(path, exist_ok=True)
    target = os.path.join(path, f"fingerprint-cost-{os.getpid()}.bin")
    samples = []
    try:
        for _ in range(repeats):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            t0 = time.perf_counter()
            if handle.sync_pwrite(buf, target) < 0:
                raise OSError(f"aio write to {target} failed")
            samples.append(time.perf_counter() - t0)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        if not torch.cuda.is_available():
            handle.free_cpu_locked_tensor(buf)
    return nbytes / statistics.median(samples) / 1e9


def machine(device: torch.device) -> dict:
    """The machine, the device measured on and the CPU threads torch used."""
    return {
        **machine_info(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_threads_used": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes-mib", type=int, nargs="+", help="buffer sizes (default: 64 .. 4096 on CUDA, 16 64 on CPU)"
    )
    p.add_argument(
        "--chunk-mib", type=float, nargs="+", help="fingerprint chunk sizes (default: the device type's)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--write-gbps", type=float, default=2.0, help="NVMe write GB/s to compare with (no --path)"
    )
    p.add_argument("--path", help="measure the raw aio write GB/s on this directory instead of --write-gbps")
    p.add_argument("--write-mib", type=int, default=1024, help="bytes written for that measurement")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", help="JSON file (default benchmarks/results/fingerprint_cost_<cuda|cpu>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    sizes = args.sizes_mib or ([64, 256, 1024, 4096] if device.type == "cuda" else [16, 64])
    chunks = [int(c * MiB) for c in args.chunk_mib] if args.chunk_mib else [CHUNK_BYTES[device.type]]
    if args.path:
        write_gbps = measure_aio_write_gbps(args.path, args.write_mib * MiB, repeats=3)
        write_source = f"measured: raw aio write of {args.write_mib} MiB to {args.path} (new file, O_DIRECT)"
    else:
        write_gbps = args.write_gbps
        write_source = "given (--write-gbps)"

    rows = []
    for size in sizes:
        data = torch.randint(0, 256, (size * MiB,), dtype=torch.uint8, device=device)
        words = data.view(torch.int32)
        sum_s = statistics.median(
            median_seconds(lambda w=words: w.sum(dtype=torch.int64), device, args.repeats)
        )
        for chunk in chunks:
            run = lambda d=data, c=chunk: fingerprint(d, chunk_bytes=c)  # noqa: E731
            samples = median_seconds(run, device, args.repeats)
            seconds = statistics.median(samples)
            gbps = data.numel() / seconds / 1e9
            ratio = write_gbps / gbps
            rows.append(
                {
                    "size_bytes": data.numel(),
                    "chunk_bytes": chunk,
                    "seconds": samples,
                    "seconds_median": seconds,
                    "fingerprint_GBps": gbps,
                    "int32_sum_GBps": data.numel() / sum_s / 1e9,
                    "extra_device_memory_bytes": extra_device_memory(run, device),
                    "write_seconds": data.numel() / (write_gbps * 1e9),
                    "ratio_to_write": ratio,
                    "meets_goal": ratio <= GOAL,
                }
            )
            print(
                f"{size:6d} MiB  chunk {chunk / MiB:6g} MiB  fingerprint {gbps:8.2f} GB/s "
                f"(int32 sum {rows[-1]['int32_sum_GBps']:8.2f})  = {100 * ratio:6.2f} % of a "
                f"{write_gbps:.2f} GB/s write",
                flush=True,
            )
        del data, words
    report = {
        "what": "nvme_tier.fingerprint throughput vs. the NVMe write it lets skip_unchanged avoid",
        "goal_ratio": GOAL,
        "write_GBps": write_gbps,
        "write_GBps_source": write_source,
        "machine": machine(device),
        "results": rows,
    }
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"fingerprint_cost_{device.type}.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
