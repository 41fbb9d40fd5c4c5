"""Test kit for storage backends, shipped with the package (as zarr ships ``zarr.testing``).

* :mod:`nvme_tier.testing.conformance`: ``StoreConformance``, the cases every block store must
  pass; a third-party store subclasses it in its own test suite. Needs pytest.
* :mod:`nvme_tier.testing.contract`: its fixtures and the cases about the block-store interface
  (capabilities honoured, objects by key, built by the registry from the config).
* :mod:`nvme_tier.testing.samples`: tensors of every dtype and bit pattern, bitwise comparison.
* :mod:`nvme_tier.testing.faults`: ``FaultInjectingBackend``, a backend wrapper that fails, fills
  the disk or hangs at the k-th write/read/commit of the real backend it wraps.

Nothing in ``nvme_tier`` imports this package; it imports ``nvme_tier.storage`` only.
"""
