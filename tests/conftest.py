"""Shared fixtures; the helpers tests import (engines, train, snapshots) are in helpers.py."""

from __future__ import annotations

import pytest
from helpers import renew_storage_defaults

from nvme_tier.demo import set_launch_env

set_launch_env()  # single-process rendezvous, a free port, for every test (helpers.py sets it too)


@pytest.fixture
def offload_dir(tmp_path):
    d = tmp_path / "nvme dir é"
    d.mkdir()
    return d


@pytest.fixture
def fresh_storage():
    """The process's default staging and aio handle pools of this test only (and anew after it)."""
    renew_storage_defaults()
    yield
    renew_storage_defaults()
