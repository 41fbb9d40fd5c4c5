"""Storage: backends that move named tensors to files and back, and the registry that picks one.

base.py is the interface every backend implements; registry.py chooses and builds backends from
their declared capabilities; nvme_tier.testing ships the suite a backend must pass.
"""

from .aio import AioBackend
from .base import Capabilities, StorageBackend
from .manifest import OwnerInfo, TensorRecord, WriterDirectory
from .probes import logical_block_size, supports_o_direct
from .registry import BACKENDS, check_block_alignment, open_backend, register_backend, select_backend
from .stale_writers import clean_writers, scan_writers
from .zarr_store import ZarrBackend

__all__ = [
    "check_block_alignment",
    "logical_block_size",
    "BACKENDS",
    "AioBackend",
    "Capabilities",
    "OwnerInfo",
    "StorageBackend",
    "TensorRecord",
    "WriterDirectory",
    "ZarrBackend",
    "clean_writers",
    "open_backend",
    "register_backend",
    "scan_writers",
    "select_backend",
    "supports_o_direct",
]
