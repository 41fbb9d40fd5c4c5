"""Benchmarks that ship with the package, so ``nvme-tier bench`` works from an installed wheel.

``benchmarks/*.py`` in the source tree are thin scripts around these modules.
"""
