"""Batching variable-length samples: collators and synthetic data."""

from ..loss import IGNORE_INDEX, Labels
from .collate import (
    COLLATORS,
    NestedCollator,
    PackCollator,
    PackRowsCollator,
    PadCollator,
    PadToLongestCollator,
    mark_dynamic,
    move_batch,
)
from .batch import PackedBatch
from .binpack import best_fit_decreasing
from .sampler import CostModel, TokenBudgetSampler, split_across_ranks
from .synthetic import LENGTH_DISTS, SyntheticDataset, sample_lengths

__all__ = [
    "COLLATORS",
    "IGNORE_INDEX",
    "Labels",
    "LENGTH_DISTS",
    "NestedCollator",
    "CostModel",
    "PackCollator",
    "PackedBatch",
    "PackRowsCollator",
    "PadCollator",
    "PadToLongestCollator",
    "SyntheticDataset",
    "TokenBudgetSampler",
    "best_fit_decreasing",
    "mark_dynamic",
    "move_batch",
    "sample_lengths",
    "split_across_ranks",
]
