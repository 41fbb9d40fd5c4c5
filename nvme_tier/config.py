"""The typed ``"offload_states"`` block of a DeepSpeed config.

Unknown keys are refused by name; every field has a default chosen from measurement (see
docs/performance.md) and a description that docs/configuration.md is generated from.
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError
from .types import StateKind, Tier
from .units import MiB

CONFIG_KEY = "offload_states"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class AioSettings(_Strict):
    """Knobs of DeepSpeed's async_io handle (libaio, O_DIRECT)."""

    block_size: int = Field(
        1 * MiB,
        ge=4096,
        le=1 << 30,
        description=(
            "Bytes per libaio request: a multiple of 4096 (and of the device's logical block size), "
            "at most 1 GiB."
        ),
    )
    queue_depth: int = Field(32, ge=1, le=1024, description="libaio requests in flight per thread.")
    intra_op_parallelism: int = Field(8, ge=1, le=64, description="I/O threads that split one request.")
    single_submit: bool = Field(False, description="Submit requests one by one instead of in batches.")
    overlap_events: bool = Field(True, description="Overlap submission and completion of requests.")

    @field_validator("block_size")
    @classmethod
    def _block_size_is_aligned(cls, value: int) -> int:
        # O_DIRECT refuses a request whose length is not a multiple of the device's logical block,
        # and DeepSpeed's op drops that per-request error: the write would silently not happen.
        if value % 4096:
            raise ValueError(f"must be a multiple of 4096 (O_DIRECT alignment), got {value}")
        return value


class ZarrSettings(_Strict):
    """Knobs of the zarr v3 fallback backend."""

    chunk_mb: int = Field(64, ge=1, le=4096, description="Chunk size of each zarr array, in MiB.")
    codec: Literal["none", "zstd", "blosc"] = Field(
        "none", description="Compression codec; 'none' is fastest for optimizer states (high entropy)."
    )
    concurrency: int = Field(8, ge=1, le=128, description="Chunks written or read concurrently.")


class OffloadStatesConfig(_Strict):
    """Where an idle engine's states go and how they get there."""

    device: Literal["nvme", "cpu", "auto"] = Field(
        "nvme",
        description=(
            "Base policy: 'nvme' (optimizer states to disk), 'cpu' (everything in host RAM) or 'auto' "
            "(host first, filled to the host budget, NVMe for the rest; needs path; without "
            "host_budget_mb the budget is half the host's available memory at attach, divided among "
            "the local ranks; see docs/policy.md)."
        ),
    )
    path: str | None = Field(
        None, description="Directory for NVMe files; required when any state goes to nvme."
    )
    # Any registered store's name: which ones exist is the registry's to say, checked at attach.
    backend: str = Field(
        "auto",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description=(
            "'aio' (DeepSpeed async_io, O_DIRECT), 'zarr', 'auto' (aio when usable, else zarr), or "
            "the name of a registered third-party store (entry point group nvme_tier.backends)."
        ),
    )
    policy: dict[StateKind, Tier] = Field(
        default_factory=dict, description='Per-state tier overrides, e.g. {"hp_params": "nvme"}.'
    )
    nvme_ratio: dict[StateKind, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict,
        description=(
            'Per state, the share of its bytes written to NVMe, e.g. {"optim_states": 0.5} (like '
            "ZeRO-Offload++'s ratio); the rest stays in host memory (the state's policy tier when that "
            "is cpu or pinned_cpu, else pinned_cpu). Needs path."
        ),
    )
    include: list[StateKind] | None = Field(None, description="States offloaded by default (None: all).")
    pin_memory: bool = Field(
        True, description="Use page-locked host memory for host tiers (pinned_cpu vs cpu)."
    )
    non_blocking: bool = Field(False, description="Default of offload_states/reload_states non_blocking.")
    honor_call_device: bool = Field(
        True,
        description=(
            "true: an explicit device=cpu in an offload_states call means the CPU path (upstream). "
            "false: this block's placement decides whatever device the call names (device=none still "
            "moves nothing), so a trainer that passes device=cpu moves to NVMe unchanged; "
            "include, pin_memory=False and non_blocking keep their meaning."
        ),
    )
    staging_budget_mb: int = Field(
        512,
        ge=2,
        le=65536,
        description=(
            "Pinned host memory for moving NVMe states (up to 4 buffers), in MiB. One staging pool "
            "serves every engine of the process, sized by the largest value among them."
        ),
    )
    host_budget_mb: int | None = Field(
        None,
        ge=0,
        description=(
            "Host RAM nvme_tier may hold for the whole process (host copies of cpu/pinned_cpu states, "
            "pinned copies kept for reuse, staging), in MiB; null: unlimited. Shared by every engine "
            "of the process (the smallest value set applies); host copies fill it in priority order "
            "and what does not fit goes to nvme (the state crossing it split between both; needs "
            "path). With device 'auto', null means half the available memory at attach per local rank."
        ),
    )
    preallocate: bool = Field(
        False,
        description=(
            "Page-lock the pinned_cpu host copies at attach (background thread) instead of "
            "pipelined with the first offload; holds that RAM from attach on."
        ),
    )
    checksum: bool = Field(True, description="crc32c every chunk on write and verify it on read.")
    skip_unchanged: bool = Field(
        True, description="Keep NVMe files after reload and skip rewriting states that did not change since."
    )
    progress: bool = Field(True, description="Show a tqdm bar for transfers longer than a second (tty only).")
    aio: AioSettings = Field(default_factory=AioSettings)
    zarr: ZarrSettings = Field(default_factory=ZarrSettings)

    @field_validator("path")
    @classmethod
    def _path_is_plain(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("path is empty")
        if "\x00" in value:
            raise ValueError("path contains a NUL byte")
        return os.path.abspath(os.path.expanduser(value))

    @field_validator("policy")
    @classmethod
    def _discard_only_scratch(cls, policy: dict[StateKind, Tier]) -> dict[StateKind, Tier]:
        for state, tier in policy.items():
            if tier is Tier.discard and state.holds_data:
                # ctx["state"] extends the error's location to policy.<state> (see _explain).
                raise PydanticCustomError(
                    "discard_loses_data",
                    "'discard' would lose data; only '{scratch}' may be discarded",
                    {"state": state.value, "scratch": StateKind.contiguous_grad_buffer.value},
                )
        return policy

    @field_validator("nvme_ratio")
    @classmethod
    def _ratio_only_for_data(cls, ratios: dict[StateKind, float]) -> dict[StateKind, float]:
        for state in ratios:
            if not state.holds_data:
                raise PydanticCustomError(
                    "ratio_of_scratch",
                    "'{scratch}' is rebuilt on every step, not stored: discard it instead",
                    {"state": state.value, "scratch": state.value},
                )
        return ratios

    @model_validator(mode="after")
    def _ratio_leaves_a_host_part(self) -> OffloadStatesConfig:
        """A split's host part takes the state's host tier: a policy placing it elsewhere contradicts it."""
        for state in self.nvme_ratio:
            tier = self.policy.get(state)
            if tier is not None and tier not in (Tier.cpu, Tier.pinned_cpu):
                raise ValueError(
                    f"nvme_ratio.{state.value} splits {state.value} between host memory and nvme, but "
                    f"policy.{state.value} places it on '{tier.value}'; remove one of them (policy may "
                    "only name the host part's tier: cpu or pinned_cpu)"
                )
        return self

    @model_validator(mode="after")
    def _budget_holds_staging(self) -> OffloadStatesConfig:
        """Staging is charged to the host budget: with a path, a budget below it could move nothing."""
        if self.host_budget_mb is not None and self.path and self.host_budget_mb < self.staging_budget_mb:
            raise ValueError(
                f"host_budget_mb ({self.host_budget_mb}) is below staging_budget_mb ({self.staging_budget_mb}): "
                "staging buffers are charged to the host budget; raise host_budget_mb or lower staging_budget_mb"
            )
        return self

    @property
    def staging_budget_bytes(self) -> int:
        return self.staging_budget_mb * MiB

    @property
    def host_budget_bytes(self) -> int | None:
        return None if self.host_budget_mb is None else self.host_budget_mb * MiB

    def required_path(self, needed_by: str) -> str:
        """``path``, or the one "path is required" error, saying what needs it."""
        if not self.path:
            raise ConfigError(f"offload_states.path is required: {needed_by}")
        return self.path

    @classmethod
    def from_file(cls, config_path: str) -> OffloadStatesConfig:
        """The validated offload_states block of a DeepSpeed JSON config file (defaults when absent)."""
        return cls.parse(block_of(load_deepspeed_config(config_path), config_path))

    @classmethod
    def parse(cls, block: Any) -> OffloadStatesConfig:
        """Validate a raw block; a failure raises ``ConfigError`` that names each culprit key."""
        if isinstance(block, OffloadStatesConfig):
            return block
        if block is None:
            block = {}
        if not isinstance(block, dict):
            raise ConfigError(f"'{CONFIG_KEY}' must be a JSON object, got {type(block).__name__}")
        try:
            return cls.model_validate(block)
        except ValidationError as exc:
            raise ConfigError(_explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        ctx = err.get("ctx") or {}
        loc = (*err["loc"], ctx["state"]) if "state" in ctx else err["loc"]
        where = ".".join(_loc_part(p) for p in (CONFIG_KEY, *loc))
        if err["type"] == "extra_forbidden":
            # Name the keys allowed where the culprit is (top level, aio or zarr), not elsewhere.
            model = _SECTIONS.get(tuple(err["loc"][:-1]), OffloadStatesConfig)
            lines.append(f"{where}: unknown key (allowed: {', '.join(model.model_fields)})")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        allowed = ctx.get("expected")
        if allowed:
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"{where}: {msg}")
    return "invalid offload_states config:\n  " + "\n  ".join(lines)


def _loc_part(part: object) -> str:
    """A key as the user would type it; odd keys (newlines, dots, spaces) quoted so lines stay whole."""
    text = str(part)
    return text if text.replace("_", "a").isalnum() and text.isascii() or text == "[key]" else repr(text)


_SECTIONS: dict[tuple, type[BaseModel]] = {
    (): OffloadStatesConfig,
    ("aio",): AioSettings,
    ("zarr",): ZarrSettings,
}


def block_of(ds_config: dict, source: str) -> Any:
    """The raw ``offload_states`` block of a DeepSpeed config (None when absent).

    DeepSpeed keeps unknown top-level keys silently, so a misspelled block would leave nvme_tier on
    its defaults: a near-miss key (``offload_state``, ``offloadStates``) is refused by name instead.
    """
    if CONFIG_KEY in ds_config:
        return ds_config[CONFIG_KEY]
    near = [key for key in ds_config if isinstance(key, str) and _is_near_miss(key)]
    if near:
        shown = ", ".join(repr(key) for key in near)
        raise ConfigError(
            f"no '{CONFIG_KEY}' block in {source}, but {shown} at its top level: "
            f"rename it to '{CONFIG_KEY}' (nvme_tier reads only that key)"
        )
    return None


def _is_near_miss(key: str) -> bool:
    squashed = key.lower().replace("_", "").replace("-", "")
    wanted = CONFIG_KEY.replace("_", "")
    return squashed == wanted or bool(difflib.get_close_matches(key.lower(), [CONFIG_KEY], n=1, cutoff=0.8))


def load_deepspeed_config(config_path: str) -> dict:
    """A DeepSpeed JSON config file as a dict; ConfigError naming the file when it is not one."""
    try:
        with open(config_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {config_path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path}: a DeepSpeed config must be a JSON object")
    return data
