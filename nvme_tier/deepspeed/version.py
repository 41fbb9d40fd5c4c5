"""The DeepSpeed releases nvme_tier supports, checked at attach and by ``nvme-tier check``."""

from __future__ import annotations

from ..errors import UnsupportedEngineError

SUPPORTED_DEEPSPEED = (">=0.16.9", "<0.20")


def installed_version() -> str:
    """DeepSpeed's version string; ImportError when it is not importable."""
    import deepspeed

    return deepspeed.__version__


def check_deepspeed_version(version: str | None = None) -> str:
    """Raise ``UnsupportedEngineError`` naming the installed and supported versions."""
    from packaging.version import Version

    if version is None:
        version = installed_version()
    v = Version(version)
    if not (Version("0.16.9") <= v < Version("0.20")):
        raise UnsupportedEngineError(
            f"nvme_tier supports DeepSpeed {','.join(SUPPORTED_DEEPSPEED)}; installed is {version}. "
            "Install a supported version, e.g. pip install 'deepspeed==0.19.8'"
        )
    return version
