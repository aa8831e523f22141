"""``varlen train``: packed, token-budget training on one process or many (DDP, FSDP2)."""

from ..measure import GarbageCollection
from .step import StepStats, count_targets, train_step

__all__ = ["StepStats", "count_targets", "train_step"]
