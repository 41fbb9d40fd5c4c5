"""Storage: named tensors over block stores, the stores, and the registry that picks one.

blocks.py is the interface a store implements (bytes by key); base.py keeps named tensors
(records, checksums, manifest, skip checks) over any store, moved by pipeline.py; registry.py
chooses and builds stores from their declared capabilities; nvme_tier.testing ships the suite a
store must pass.
"""

from .aio import AioStore
from .aio_handles import AioHandlePool
from .base import StorageBackend
from .blocks import BlockFile, BlockStore, Capabilities, FutureSlot
from .manifest import OwnerInfo, TensorRecord, WriterDirectory
from .probes import logical_block_size, supports_o_direct
from .registry import (
    ENTRY_POINT_GROUP,
    StoreRegistry,
    check_block_alignment,
)
from .staging import SharedStagingPool
from .stale_writers import clean_writers, scan_writers
from .zarr_store import ZarrStore

__all__ = [
    "ENTRY_POINT_GROUP",
    "AioHandlePool",
    "AioStore",
    "BlockFile",
    "BlockStore",
    "Capabilities",
    "FutureSlot",
    "OwnerInfo",
    "SharedStagingPool",
    "StorageBackend",
    "StoreRegistry",
    "TensorRecord",
    "WriterDirectory",
    "ZarrStore",
    "check_block_alignment",
    "clean_writers",
    "logical_block_size",
    "scan_writers",
    "supports_o_direct",
]
