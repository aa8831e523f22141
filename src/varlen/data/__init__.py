"""Batching variable-length samples: collators and synthetic data."""

from ..loss import IGNORE_INDEX, Labels
from .collate import (
    COLLATORS,
    NestedCollator,
    PackCollator,
    PackRowsCollator,
    PadCollator,
    PadToLongestCollator,
    move_batch,
)
from .batch import Batch, NestedBatch, PackedBatch, PaddedBatch
from .binpack import best_fit_decreasing
from .shares import STATIC_ROW_MULTIPLE, TrainCollator
from .sampler import CostModel, TokenBudgetSampler, split_across_ranks
from .synthetic import LENGTH_DISTS, SyntheticDataset, sample_lengths

__all__ = [
    "Batch",
    "COLLATORS",
    "IGNORE_INDEX",
    "Labels",
    "LENGTH_DISTS",
    "NestedBatch",
    "NestedCollator",
    "CostModel",
    "PackCollator",
    "PackedBatch",
    "PackRowsCollator",
    "PaddedBatch",
    "PadCollator",
    "PadToLongestCollator",
    "STATIC_ROW_MULTIPLE",
    "SyntheticDataset",
    "TokenBudgetSampler",
    "TrainCollator",
    "best_fit_decreasing",
    "move_batch",
    "sample_lengths",
    "split_across_ranks",
]
