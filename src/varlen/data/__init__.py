"""Batching variable-length samples: collators and synthetic data."""

from .collate import (
    COLLATORS,
    IGNORE_INDEX,
    NestedCollator,
    PackCollator,
    PadCollator,
    PadToLongestCollator,
    move_batch,
)
from .synthetic import LENGTH_DISTS, SyntheticDataset, sample_lengths

__all__ = [
    "COLLATORS",
    "IGNORE_INDEX",
    "LENGTH_DISTS",
    "NestedCollator",
    "PackCollator",
    "PadCollator",
    "PadToLongestCollator",
    "SyntheticDataset",
    "move_batch",
    "sample_lengths",
]
