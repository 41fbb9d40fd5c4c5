"""``nvme-tier`` / ``python -m nvme_tier``: check the machine, inspect and clean offload paths, run the demo.

Exit codes: 0 success; 1 a check failed, the demo found a mismatch or a benchmark failed;
2 bad usage or an nvme_tier error (printed as one line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from .config import OffloadStatesConfig, block_of, load_deepspeed_config
from .config_reference import GENERATED_MARKER, render_config_reference
from .errors import ConfigError, NvmeTierError
from .tables import format_rows
from .units import human_bytes

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


# -- check ---------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    from .checks import FAIL, format_report, run_checks

    config, block_absent = None, False
    if args.config:
        block = block_of(load_deepspeed_config(args.config), args.config)
        config, block_absent = OffloadStatesConfig.parse(block), block is None
    checks = run_checks(args.path, config, args.config, block_absent)
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=1), file=args.json_out)
    else:
        print(format_report(checks))
    return EXIT_FAILED if any(c.level == FAIL for c in checks) else EXIT_OK


# -- build-ops -----------------------------------------------------------------------------------
def report_build_locks(fix: bool) -> int:
    """Name each leftover torch build lock (a killed build's; every load of its op would wait for
    it forever) and remove it when ``fix``; returns how many are left."""
    from .deepspeed import ops
    from .deepspeed.build_watch import FIX_COMMAND, leftover_locks, remove_leftover_locks

    if fix:
        for lock in remove_leftover_locks(ops.extensions_dir()):
            print(f"  removed leftover build lock {lock}")
        return 0
    locks = leftover_locks(ops.extensions_dir())
    for lock in locks:
        op = os.path.basename(os.path.dirname(lock))
        print(f"  leftover build lock {lock}: no live process holds it, and loading {op} would wait")
        print(f"    for it forever; {FIX_COMMAND}")
    return len(locks)


def cmd_build_ops(args: argparse.Namespace) -> int:
    from .deepspeed import ops
    from .deepspeed.ops import aio_compatible

    aio_ok, aio_why = aio_compatible()
    if args.ops:
        needed = [ops.NeededOp(name, "asked for") for name in args.ops]
    else:
        config = load_deepspeed_config(args.config) if args.config else None
        needed = ops.ops_for_config(config, aio_ok)
    source = (
        "the ops asked for"
        if args.ops
        else args.config or "the demo (Adam, ZeRO, offload_states to nvme, backend auto)"
    )
    print(f"DeepSpeed ops for {source}; JIT builds cached in {ops.extensions_dir()}", flush=True)
    locks_left = report_build_locks(args.fix)
    if not aio_ok and not args.ops:
        print(f"  async_io: not needed: {aio_why} (backend auto uses zarr)")
    failed = 0
    width = max((len(n.name) for n in needed), default=0)
    for op in needed:
        if args.list:
            builder = ops.builder_of(op.name)
            state = ops.op_state(builder) if builder is not None else "unavailable"
            print(f"  {op.name.ljust(width)}  {state:<11}  {op.why}")
            continue
        if op.name == "async_io" and not aio_ok:
            print(f"  {op.name.ljust(width)}  skipped: {aio_why}")
            continue

        def still(elapsed: float, name: str = op.name) -> None:
            print(f"  {name.ljust(width)}  still building: {elapsed:.0f} s", flush=True)

        result = ops.build_op(op.name, progress=still)
        verdict = {ops.NOT_BUILT: "built"}.get(result.state, result.state)
        if result.error:
            failed += 1
            verdict = f"FAILED ({result.error})"
        print(f"  {op.name.ljust(width)}  {verdict:<9} {result.seconds:7.1f} s  {op.why}", flush=True)
    return EXIT_FAILED if failed or locks_left else EXIT_OK


# -- status / clean ------------------------------------------------------------------------------
def _require_dir(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: no such directory")
    return path


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def writer_rows(path: str) -> list[dict[str, Any]]:
    from .storage.stale_writers import scan_writers

    rows = []
    for w in scan_writers(path):
        o = w.owner
        rows.append(
            {
                "dir": os.path.basename(w.path),
                "host": o.host if o else "?",
                "pid": o.pid if o else None,
                "rank": o.rank if o else None,
                "label": (o.label if o else "") or "-",
                "bytes": w.bytes,
                "age_s": round(w.age_s, 1),
                "state": ("live" if w.live else "stale") if o else "unknown owner",
                "committed": w.committed,
                "note": w.note,
            }
        )
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    path = _require_dir(args.path)
    rows = writer_rows(path)
    if args.json:
        print(json.dumps({"path": path, "writers": rows}, indent=1), file=args.json_out)
        return EXIT_OK
    if not rows:
        print(f"{path}: no nvme_tier writer directories")
        return EXIT_OK
    table = [
        [
            r["dir"],
            r["host"],
            str(r["pid"] if r["pid"] is not None else "?"),
            str(r["rank"] if r["rank"] is not None else "?"),
            r["label"],
            human_bytes(r["bytes"]),
            human_age(r["age_s"]),
            r["state"],
            "yes" if r["committed"] else ("no: files changed" if r["note"] else "no"),
        ]
        for r in rows
    ]
    header = ["writer", "host", "pid", "rank", "label", "bytes", "age", "state", "committed"]
    print(format_rows(header, table))
    for r in rows:
        if r["note"]:  # e.g. a writer killed while it rewrote a kept file: not reloadable as is
            print(f"{r['dir']}: not committed: {r['note']}")
    stale = [r for r in rows if r["state"] == "stale"]
    total = human_bytes(sum(r["bytes"] for r in rows))
    print(
        f"\n{len(rows)} writer dirs, {total}; {len(stale)} stale ({human_bytes(sum(r['bytes'] for r in stale))})"
    )
    if stale:
        print(f"remove the stale ones with: nvme-tier clean {path}")
    return EXIT_OK


def cmd_clean(args: argparse.Namespace) -> int:
    from .storage.stale_writers import clean_writers

    path = _require_dir(args.path)
    doomed = clean_writers(path, include_live=args.all, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for w in doomed:
        state = ("live" if w.live else "stale") if w.owner else "unknown owner"
        print(f"{verb} {os.path.basename(w.path)} ({state}, {human_bytes(w.bytes)})")
    freed = human_bytes(sum(w.bytes for w in doomed))
    print(f"{verb} {len(doomed)} writer dirs, {freed}")
    if args.all and any(w.live for w in doomed):
        print(
            "warning: live writers' files were included; those processes can no longer reload",
            file=sys.stderr,
        )
    return EXIT_OK


# -- bench ---------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import swap_bandwidth

    try:
        report = swap_bandwidth.main([a for a in args.bench_args if a != "--"], prog="nvme-tier bench")
    except SystemExit as exc:  # argparse --help / usage errors inside the benchmark
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_ERROR)
    inexact = [name for name, m in report["methods"].items() if m.get("round_trip_exact") is False]
    if inexact:
        print(f"bench: round trip NOT exact for {', '.join(inexact)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# -- demo ----------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args)


# -- docs-config ---------------------------------------------------------------------------------
def cmd_docs_config(args: argparse.Namespace) -> int:
    text = render_config_reference()
    if args.check:
        try:
            current = Path(args.check).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {args.check}: {exc.strerror}") from None
        if GENERATED_MARKER not in current:
            # Advising "docs-config > FILE" here would have the user overwrite, say, the README.
            raise ConfigError(
                f"{args.check} is not a generated configuration reference (no '{GENERATED_MARKER}' "
                "line); --check compares docs/configuration.md"
            )
        if current != text:
            print(f"{args.check} is out of date: run python -m nvme_tier docs-config > {args.check}")
            return EXIT_FAILED
        print(f"{args.check} is up to date")
        return EXIT_OK
    sys.stdout.write(text)
    return EXIT_OK


# -- parser and entry point ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .demo import add_arguments as demo_arguments

    p = argparse.ArgumentParser(
        prog="nvme-tier",
        description="NVMe and pinned-CPU tiers for DeepSpeed's offload_states/reload_states.",
        epilog="exit codes: 0 ok, 1 check/demo/bench failed, 2 usage or nvme_tier error",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("check", help="report whether this machine and path suit nvme_tier (like ds_report)")
    c.add_argument("--path", help="offload directory to check (O_DIRECT, free space, backend choice)")
    c.add_argument("--config", help="a DeepSpeed JSON config: validate its offload_states block and use it")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_check)

    bo = sub.add_parser(
        "build-ops",
        help="build the DeepSpeed ops a config needs now (one-time, minutes) instead of at first use",
    )
    bo.add_argument("--config", help="a DeepSpeed JSON config (default: what the demo needs)")
    bo.add_argument(
        "--ops",
        nargs="+",
        choices=("async_io", "fused_adam", "cpu_adam", "deepspeed_shm_comm"),
        help="these ops",
    )
    bo.add_argument("--list", action="store_true", help="only say which ops are needed and whether built")
    bo.add_argument(
        "--fix",
        action="store_true",
        help="remove leftover build locks (left by a killed build; no live process holds them)",
    )
    bo.set_defaults(func=cmd_build_ops)

    s = sub.add_parser("status", help="list the writer directories under an offload path")
    s.add_argument("path", metavar="PATH")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    cl = sub.add_parser("clean", help="remove writer directories of dead processes under PATH")
    cl.add_argument("path", metavar="PATH")
    cl.add_argument("--all", action="store_true", help="also remove live writers' directories (dangerous)")
    cl.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    cl.set_defaults(func=cmd_clean)

    # Every argument of bench goes to nvme_tier.bench.swap_bandwidth (-h shows its help).
    b = sub.add_parser(
        "bench",
        add_help=False,
        help="swap bandwidth per method (aio, zarr, pinned copy, torch.save) on a scratch directory",
    )
    b.set_defaults(func=cmd_bench, bench_args=[])

    d = sub.add_parser(
        "demo",
        help="RLHF-style actor/critic swap with bit-exact checks (~35 s on 2 cores once build-ops ran)",
    )
    demo_arguments(d)
    d.set_defaults(func=cmd_demo)

    dc = sub.add_parser("docs-config", help="print docs/configuration.md generated from the config model")
    dc.add_argument("--check", metavar="FILE", help="exit 1 when FILE differs from the generated text")
    dc.set_defaults(func=cmd_docs_config)
    return p


@contextlib.contextmanager
def stdout_for_json_only() -> Iterator[TextIO]:
    """Yield the real stdout for the JSON; while the command runs, everything else bound for stdout
    goes to stderr: print()s, and logging handlers holding sys.stdout (DeepSpeed's logger took it
    at import and writes its accelerator warning there at the first get_accelerator())."""
    real = sys.stdout
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = {h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers}
    moved = [h for h in handlers if isinstance(h, logging.StreamHandler) and h.stream is real]
    for handler in moved:
        handler.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield real
    finally:
        for handler in moved:
            handler.setStream(real)


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.bench_args = extra
    started = time.perf_counter()
    try:
        if getattr(args, "json", False):
            with stdout_for_json_only() as args.json_out:
                return int(args.func(args))
        return int(args.func(args))
    except NvmeTierError as exc:
        print(f"nvme-tier {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(
            f"nvme-tier {args.command}: interrupted after {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        return 130
