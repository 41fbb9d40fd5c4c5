"""Fuzzing the config parser and the placement policy with Hypothesis.

Whatever JSON-like value arrives as the ``"offload_states"`` block, ``OffloadStatesConfig.parse``
either raises ``ConfigError`` (a ValueError naming the culprit) or returns a config that satisfies
every invariant and survives a round trip; ``decide`` either raises ``ConfigError`` or returns a
tier for every present state. Nothing else may escape.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nvme_tier.config import AioSettings, OffloadStatesConfig, ZarrSettings, _loc_part
from nvme_tier.errors import ConfigError
from nvme_tier.policy import Placement, decide
from nvme_tier.types import StateKind, Tier

STATES = [s.value for s in StateKind]
TIERS = [t.value for t in Tier]
# CI replays a fixed sequence (a red CI run must be reproducible); local runs explore new examples.
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
state_like = st.sampled_from([*STATES, "moments", "OPTIM_STATES", ""]) | st.text(max_size=6)
tier_like = st.sampled_from([*TIERS, "tape", "NVME"]) | json_values
ints = st.integers(min_value=-10, max_value=2**40) | json_values


def section(model) -> st.SearchStrategy:
    fields = {name: ints for name in model.model_fields}
    if model is ZarrSettings:
        fields["codec"] = st.sampled_from(["none", "zstd", "blosc", "gzip"]) | json_values
    return st.fixed_dictionaries({}, optional=fields) | json_values


FIELDS = {
    "device": st.sampled_from(["nvme", "cpu", "gpu", "NVMe", ""]) | json_values,
    "path": st.sampled_from(["/tmp/x", "~/x", "rel/../x", "  ", "a\x00b", ""])
    | st.text(max_size=10)
    | json_values,
    "backend": st.sampled_from(["auto", "aio", "zarr", "spdk"]) | json_values,
    "policy": st.dictionaries(state_like, tier_like, max_size=5) | json_values,
    "include": st.none() | st.lists(state_like, max_size=5) | json_values,
    "pin_memory": json_values,
    "non_blocking": json_values,
    "staging_budget_mb": ints,
    "host_budget_mb": st.none() | ints,
    "preallocate": json_values,
    "checksum": json_values,
    "skip_unchanged": json_values,
    "progress": json_values,
    "aio": section(AioSettings),
    "zarr": section(ZarrSettings),
}
blocks = st.builds(
    lambda known, extra: {**known, **extra},
    st.fixed_dictionaries({}, optional=FIELDS),
    st.dictionaries(st.text(max_size=8), json_values, max_size=2),
)


def assert_valid(cfg: OffloadStatesConfig) -> None:
    assert isinstance(cfg, OffloadStatesConfig)
    assert cfg.device in ("nvme", "cpu") and isinstance(cfg.backend, str)  # any store name: see attach
    assert cfg.path is None or (
        isinstance(cfg.path, str) and os.path.isabs(cfg.path) and "\x00" not in cfg.path
    )
    assert all(isinstance(k, StateKind) and isinstance(v, Tier) for k, v in cfg.policy.items())
    assert not any(v is Tier.discard and k.holds_data for k, v in cfg.policy.items())
    assert cfg.include is None or all(isinstance(s, StateKind) for s in cfg.include)
    assert 2 <= cfg.staging_budget_mb <= 65536 and cfg.staging_budget_bytes == cfg.staging_budget_mb << 20
    assert cfg.host_budget_mb is None or cfg.host_budget_bytes == cfg.host_budget_mb << 20 >= 0
    assert not (cfg.path and cfg.host_budget_mb is not None and cfg.host_budget_mb < cfg.staging_budget_mb)
    assert cfg.aio.block_size >= 4096 and 1 <= cfg.aio.queue_depth <= 1024
    assert 1 <= cfg.zarr.chunk_mb <= 4096 and cfg.zarr.codec in ("none", "zstd", "blosc")
    for flag in (
        cfg.pin_memory,
        cfg.non_blocking,
        cfg.checksum,
        cfg.skip_unchanged,
        cfg.progress,
        cfg.preallocate,
    ):
        assert isinstance(flag, bool)
    # A parsed config is a fixed point: dumping and parsing it again changes nothing.
    assert OffloadStatesConfig.parse(cfg.model_dump(mode="json")) == cfg
    assert OffloadStatesConfig.parse(cfg) is cfg


def parse_or_config_error(block):
    try:
        cfg = OffloadStatesConfig.parse(block)
    except ConfigError as exc:
        assert isinstance(exc, ValueError)
        message = str(exc)
        assert message.startswith("invalid offload_states config") or "JSON object" in message
        return None
    assert_valid(cfg)
    return cfg


@FUZZ
@given(blocks)
def test_parse_random_blocks(block):
    parse_or_config_error(block)


@FUZZ
@given(json_values)
def test_parse_any_json_value(value):
    parse_or_config_error(value)


@FUZZ
@given(st.fixed_dictionaries({}, optional={k: FIELDS[k] for k in ("device", "path", "policy", "include")}))
@example({"policy": {"optim_states": "discard"}})  # a cross-field rule once named only the block
def test_unknown_or_invalid_values_name_their_key(block):
    """A refusal names each culprit as a dotted path that starts at the block, one whole line each
    (odd keys are quoted, so a key with a newline cannot split or forge a line)."""
    try:
        OffloadStatesConfig.parse(block)
    except ConfigError as exc:
        lines = str(exc).split("\n")[1:]
        assert lines
        for line in lines:
            assert line.startswith("  offload_states"), line
            assert line.isprintable(), repr(line)
        named = {line.strip().split(":", 1)[0] for line in lines}
        assert any(f"offload_states.{_loc_part(key)}" in n for key in block for n in named), (named, block)


present = st.lists(st.sampled_from(list(StateKind)), unique=True)
call_include = st.none() | st.lists(state_like | st.sampled_from(list(StateKind)), max_size=4)
call_device = st.none() | st.sampled_from(["nvme", "cpu", "none", "gpu", ""])


@FUZZ
@given(blocks, present, call_include, call_device, st.none() | st.booleans())
def test_decide_random_calls(block, states, include, device, pin):
    cfg = parse_or_config_error(block)
    if cfg is None:
        return
    try:
        placement = decide(cfg, states, include=include, device=device, pin_memory=pin)
    except ConfigError:
        return
    assert isinstance(placement, Placement)
    assert set(placement.tiers) == set(states)
    for state, tier in placement.tiers.items():
        assert isinstance(tier, Tier)
        assert not (tier is Tier.discard and state.holds_data)
    if placement.uses_nvme:
        assert cfg.path
    if device == "none":
        assert all(t is Tier.device for t in placement.tiers.values())
