"""DeepSpeed version gate: outside the declared range, attach refuses with a message naming both
the installed and the supported versions; inside it (both ends), it passes."""

from __future__ import annotations

import pytest

import nvme_tier
from nvme_tier.engine import SUPPORTED_DEEPSPEED, check_deepspeed_version
from nvme_tier.errors import UnsupportedEngineError


@pytest.mark.parametrize("version", ["0.15.0", "0.16.8", "0.20.0", "0.20.1", "1.0.0"])
def test_outside_range_is_refused_naming_both_versions(version):
    with pytest.raises(UnsupportedEngineError) as err:
        check_deepspeed_version(version)
    message = str(err.value)
    assert version in message
    assert all(bound in message for bound in SUPPORTED_DEEPSPEED)


@pytest.mark.parametrize("version", ["0.16.9", "0.17.0", "0.18.4", "0.19.8", "0.19.99"])
def test_inside_range_passes(version):
    assert check_deepspeed_version(version) == version


def test_installed_version_is_supported():
    import deepspeed

    assert check_deepspeed_version() == deepspeed.__version__


def test_attach_refuses_unsupported_version_before_touching_the_engine(monkeypatch):
    """The gate runs first in attach: a wrong DeepSpeed fails clearly, not deep in engine internals."""
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    with pytest.raises(UnsupportedEngineError, match=r"installed is 0\.20\.1"):
        nvme_tier.attach(object())
