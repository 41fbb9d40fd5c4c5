"""The typed config block: defaults, refusals that name the key, paths normalised."""

import pytest

from nvme_tier.config import OffloadStatesConfig
from nvme_tier.errors import ConfigError


def test_defaults():
    c = OffloadStatesConfig.parse({})
    assert c.device == "nvme" and c.backend == "auto" and c.checksum and c.staging_budget_mb == 512


@pytest.mark.parametrize(
    "block, culprit",
    [
        ({"devise": "nvme"}, "offload_states.devise: unknown key"),
        ({"device": "gpu"}, "offload_states.device"),
        ({"backend": "no/such store"}, "offload_states.backend"),  # a registered name: checked at attach
        ({"policy": {"hp_params": "tape"}}, "offload_states.policy.hp_params"),
        ({"policy": {"moments": "nvme"}}, "moments"),
        ({"aio": {"queue_depth": 0}}, "offload_states.aio.queue_depth"),
        ({"zarr": {"codec": "gzip"}}, "offload_states.zarr.codec"),
        ({"path": ""}, "offload_states.path"),
        ({"policy": {"optim_states": "discard"}}, "optim_states"),
    ],
)
def test_bad_input_names_the_culprit(block, culprit):
    with pytest.raises(ConfigError) as err:
        OffloadStatesConfig.parse(block)
    assert culprit in str(err.value)
    assert isinstance(err.value, ValueError)


def test_not_a_dict():
    with pytest.raises(ConfigError, match="JSON object"):
        OffloadStatesConfig.parse(["nvme"])


def test_path_expanded(tmp_path):
    c = OffloadStatesConfig.parse({"path": "~/x"})
    assert c.path.startswith("/") and "~" not in c.path
