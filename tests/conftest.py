"""Shared fixtures; the helpers tests import (engines, train, snapshots) are in helpers.py."""

from __future__ import annotations

import pytest

import nvme_tier
from nvme_tier.demo import set_launch_env

set_launch_env()  # single-process rendezvous, a free port, for every test (helpers.py sets it too)


@pytest.fixture
def offload_dir(tmp_path):
    d = tmp_path / "nvme dir é"
    d.mkdir()
    return d


@pytest.fixture
def fresh_storage():
    """A runtime of this test only: its staging and aio handle pools hold nothing of other tests."""
    with nvme_tier.isolated_runtime() as runtime:
        yield runtime
