"""The public functions. Controllers are kept in a weak map so an engine's lifetime is its own."""

from __future__ import annotations

import weakref
from typing import Any

from .config import CONFIG_KEY, OffloadStatesConfig, block_of
from .controller import OffloadController
from .deepspeed.config_block import engine_config_dict
from .deepspeed.locators import discover_buffers, engine_facts
from .deepspeed.version import check_deepspeed_version
from .errors import ConfigError, NvmeTierError, StatesOffloadedError
from .policy import decide
from .runtime import default_runtime
from .status import format_table
from .storage.site import check_path_at_attach
from .types import OffloadPhase, StateKind, StateStatus
from .units import human_bytes

_controllers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach(engine: Any, config: OffloadStatesConfig | dict | None = None) -> OffloadController:
    """Make ``engine.offload_states()``/``reload_states()`` use nvme_tier.

    ``config`` defaults to the engine's ``"offload_states"`` block (or the defaults when absent).
    Everything is validated here, before anything moves (the path too, when the policy puts a
    state on nvme). Attaching twice returns the same controller when the config is unchanged; a
    different config replaces the old controller (detached cleanly, refused while offloaded), so
    the engine's methods are never wrapped twice.
    """
    check_deepspeed_version()
    block_absent = False
    if config is None:
        config = block_of(engine_config_dict(engine), "the engine's DeepSpeed config")
        block_absent = config is None
    cfg = OffloadStatesConfig.parse(config)
    existing = _controllers.get(engine)
    if existing is not None and existing.config == cfg:
        return existing
    try:
        refuse_early(engine, cfg)  # a bad new config keeps the old attachment
    except ConfigError as exc:
        if not block_absent:
            raise
        raise ConfigError(
            f"{exc} (no '{CONFIG_KEY}' block in the engine's DeepSpeed config: the defaults apply)"
        ) from None
    if existing is not None:
        try:
            existing.detach()  # waits for a non-blocking operation in flight first
        except StatesOffloadedError as exc:
            if existing.phase is OffloadPhase.failed:
                raise
            away = ", ".join(name for name, s in existing.status().items() if s.tier != "device")
            raise StatesOffloadedError(
                f"nvme_tier.attach(engine, config) with a different config while {away} are offloaded "
                "would lose them (the current attachment holds them, and keeps them); let a non-blocking "
                "offload or reload finish (nvme_tier.wait(engine)), call engine.reload_states(), then "
                "attach again"
            ) from exc
        del _controllers[engine]
    controller = OffloadController(engine, cfg, default_runtime())
    _controllers[engine] = controller
    return controller


def refuse_early(engine: Any, config: OffloadStatesConfig) -> None:
    """Refuse at attach what the first offload would refuse an hour into a run.

    The path is checked when the policy puts something on nvme for this engine (an engine with
    master weights has an optimizer, whose states appear at its first step). A host budget this
    engine's own host copies exceed needs a path to spill to.
    """
    buffers = discover_buffers(engine)
    present = [k for k, bufs in buffers.items() if bufs]
    planned = list(present)
    if buffers.get(StateKind.hp_params) and StateKind.optim_states not in present:
        planned.append(StateKind.optim_states)
    check_placement(config, planned)
    if config.host_budget_bytes is not None and not config.path:
        # ConfigError naming host_budget_mb and path when the host copies would spill
        decide(config, present, facts=engine_facts(buffers, present, config.host_budget_bytes))


def check_placement(config: OffloadStatesConfig, planned: list[StateKind]) -> None:
    """The attach checks that need no engine, shared with ``nvme-tier check`` (one verdict for both).

    ``backend`` must name a registered store. When the policy puts one of ``planned`` on nvme: a
    path is required (ConfigError from decide) and must be usable (``check_path_at_attach``:
    creates only its last level).
    """
    default_runtime().stores.check_name(config.backend)
    if decide(config, planned).uses_nvme:
        check_path_at_attach(config)


def initialize(*args: Any, **kwargs: Any):
    """``deepspeed.initialize`` that attaches nvme_tier when the config has an offload_states block."""
    import deepspeed

    result = deepspeed.initialize(*args, **kwargs)
    block = block_of(engine_config_dict(result[0]), "the DeepSpeed config")
    if block is not None:
        attach(result[0], block)
    return result


def controller_of(engine: Any) -> OffloadController:
    try:
        return _controllers[engine]
    except KeyError:
        raise NvmeTierError(
            "nvme_tier is not attached to this engine; call nvme_tier.attach(engine)"
        ) from None


def offload_status(engine: Any) -> dict[str, StateStatus]:
    """Where each state is: ``{"optim_states": StateStatus(tier=..., bytes=...), ...}``."""
    return controller_of(engine).status()


def format_status(engine: Any) -> str:
    """``offload_status`` as a table, and what the host budget came to (``device: "auto"``: computed)."""
    controller = controller_of(engine)
    budget = controller.budget
    limit = (
        "" if budget.limit == controller.host_limit else f"; this process's: {human_bytes(budget.limit or 0)}"
    )
    held = f"; held now: {human_bytes(budget.reserved)}"
    return format_table(controller.status(), f"host budget: {controller.limit_source}{limit}{held}")


def wait(engine: Any) -> None:
    """Block until a non-blocking offload/reload of ``engine`` has finished."""
    controller_of(engine).wait()


def mark_dirty(engine: Any) -> None:
    """Make the next offload of ``engine`` rewrite every state (skip nothing).

    Never needed for correctness: skip_unchanged compares content fingerprints of the live bytes,
    so edits made in any way are written. Useful to time real writes.
    """
    controller_of(engine).mark_dirty()


def release(engine: Any) -> None:
    """Delete ``engine``'s NVMe files and free its pinned host buffers (states must be resident)."""
    controller_of(engine).release()


def detach(engine: Any) -> None:
    """Undo ``attach``: restore DeepSpeed's own methods; refused, changing nothing, while offloaded."""
    controller = _controllers.get(engine)
    if controller is not None:
        controller.detach()
        del _controllers[engine]
