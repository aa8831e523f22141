"""``varlen train``: packed, token-budget training on one process or many (DDP, FSDP2)."""

from .step import GarbageCollection, StepStats, count_targets, train_step

__all__ = ["StepStats", "count_targets", "train_step"]
