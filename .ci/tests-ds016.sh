#!/usr/bin/env bash
# The test suite on the OLDEST supported DeepSpeed (0.16.9), in a venv of its own, so that one
# code path is proven on both ends of the declared range (the main env has 0.19.x).
#
# Idempotent: the venv is (re)built only when its torch/DeepSpeed versions or the project's
# pyproject.toml changed (a stamp records them); JIT-built ops live in a cache of their own, so
# this pass never clobbers the main env's ~/.cache/torch_extensions (same op names, other sources).
# Exits non-zero when the install or any test fails.
#
# Time on 2 cores (from scratch: venv, installs, JIT builds of async_io/fused_adam/shm_comm/cpu_adam,
# tests): see the report printed at the end; a warm re-run skips installs and builds.
#
# Env overrides: DS016_VENV (venv dir), DS016_PYTHON (interpreter for the venv),
# TORCH_EXTENSIONS_DIR_DS016 (op cache; TORCH_EXTENSIONS_DIR itself is left to the main pass),
# DS016_PYTEST_ARGS (extra pytest args), DS016_TIMEOUT_S (limit on the test run, default 2400).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
START=$SECONDS

DS_VERSION=0.16.9
# The local CPU wheel, pinned with its local label: a bare 'torch' (or torch==2.13.0 resolved
# from the index) is a multi-GB CUDA build.
TORCH_SPEC="torch==2.13.0+cpu"

if [ -z "${DS016_VENV:-}" ]; then
  if [ -w /work ]; then DS016_VENV=/work/venv-ds016; else DS016_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/nvme_tier/venv-ds016"; fi
fi
PY_BASE="${DS016_PYTHON:-python3}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR_DS016:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions_ds016}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# No GPU on CI: name the accelerator instead of relying on each version's auto-detection.
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"; fi

PY="$DS016_VENV/bin/python"
STAMP="$DS016_VENV/.nvme_tier-stamp"
want_stamp="deepspeed=$DS_VERSION $TORCH_SPEC pyproject=$(sha256sum pyproject.toml | cut -c1-16)"

# pip -q still warns about every absent local index directory: keep its real errors only.
pipq() { "$PY" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
log() { printf '[ds016 %4ds] %s\n' "$((SECONDS - START))" "$*"; }

if [ ! -x "$PY" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want_stamp" ]; then
  log "building venv $DS016_VENV"
  [ -x "$PY" ] || "$PY_BASE" -m venv "$DS016_VENV"
  rm -f "$STAMP"
  pipq "$TORCH_SPEC"
  pipq "deepspeed==$DS_VERSION"
  # The project's own deps (torch already satisfies its range, so no other torch is pulled).
  pipq -e "$ROOT[test]"
  echo "$want_stamp" >"$STAMP"
else
  # Point the editable install at this checkout (cheap; the venv may have served another clone).
  pipq --no-deps -e "$ROOT"
fi

got=$("$PY" -c 'import deepspeed, torch; print(deepspeed.__version__, torch.__version__)' 2>/dev/null | tail -n 1)
log "venv ready: deepspeed torch = $got; op cache $TORCH_EXTENSIONS_DIR"
case "$got" in
  "$DS_VERSION "*) ;;
  *) echo "tests-ds016: expected DeepSpeed $DS_VERSION in $DS016_VENV, got: $got" >&2; exit 1 ;;
esac

status=0
# The whole suite, as the README's test command runs it on the main env: every feature (ZeRO-0/1/2/3,
# both backends, the CPU path, status, faults, CLI, demo) is proven on this end of the range too.
# A hang (e.g. an async_io deadlock: DeepSpeed <0.18.4 keeps the GIL in wait()) must fail this pass,
# not eat CI's 90 minutes: one limit on the whole run, JIT op builds (~7 min from scratch on 2 cores)
# included.
# shellcheck disable=SC2086
timeout --signal=INT --kill-after=30 "${DS016_TIMEOUT_S:-2400}" \
  "$PY" -m pytest -q -p no:cacheprovider ${DS016_PYTEST_ARGS:-} || status=$?
# pytest exits 5 when nothing was collected: not a failure.
if [ "$status" = 5 ]; then status=0; fi
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
  echo "tests-ds016: pytest ran past ${DS016_TIMEOUT_S:-2400} s (hang?)" >&2
fi
log "done: pytest exit $status"
exit "$status"
