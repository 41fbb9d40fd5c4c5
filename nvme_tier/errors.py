"""A small error hierarchy: callers catch by meaning (bad config, missing backend, I/O, corruption).

Each error subclasses the builtin a Python user would already catch: config problems are
``ValueError``, a missing optional backend is ``ImportError`` (with the install command), disk
problems are ``OSError``, a host budget that cannot hold an offload's bytes is ``MemoryError``.
"""

from __future__ import annotations

import errno as _errno


class NvmeTierError(Exception):
    """Base of every error nvme_tier raises on purpose."""


class ConfigError(NvmeTierError, ValueError):
    """The offload_states block, an argument or a path is invalid. Raised before anything moves."""


class BackendUnavailableError(NvmeTierError, ImportError):
    """An optional backend cannot run here; the message carries the install hint."""


class TierIOError(NvmeTierError, OSError):
    """Writing or reading a tier failed; the states stayed where they were."""

    def __init__(self, message: str, path: str | None = None, errno: int | None = None):
        super().__init__(errno if errno is not None else _errno.EIO, message)
        self.filename = path
        self.message = message

    def __str__(self) -> str:
        return self.message


class HostBudgetError(NvmeTierError, MemoryError):
    """The process's host budget cannot hold what an offload needs now; the states stay where they were."""


class IntegrityError(TierIOError):
    """A file's bytes do not match the manifest (flipped, truncated, missing or foreign)."""


class StatesOffloadedError(NvmeTierError, RuntimeError):
    """The engine was asked to compute while its states are not on the device."""


class UnsupportedEngineError(NvmeTierError, TypeError):
    """The engine (DeepSpeed version, optimizer wrapper) is not one nvme_tier knows how to handle."""


class BuildLockError(BackendUnavailableError):
    """A DeepSpeed op cannot load: a killed build left torch's lock file, which no process holds."""


def offloaded_message(what: str, away: str, phase: str) -> str:
    """Why a call is refused while states are away, and what to do."""
    return f"{what} called while {away} are offloaded ({phase}); call engine.reload_states() first"


def failed_reload_message(refused: str, away: str, why: str) -> str:
    """What to do once a reload failed: "reload first" cannot help when the disk copy is bad."""
    return (
        f"{refused} refused: the last reload_states() failed ({why}), so the offloaded copy of "
        f"{away} is unusable and these states are not on the device. Restore them from a checkpoint "
        "with engine.load_checkpoint(...) (allowed now), then call nvme_tier.release(engine) to delete "
        "the unusable files. Only if the error was transient (an I/O error, not an IntegrityError) "
        "may engine.reload_states() be retried instead."
    )
