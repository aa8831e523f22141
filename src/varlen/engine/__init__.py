"""One engine: the model built once (family, levers, compile, DDP / FSDP2) and stepped on typed
batches, for ``varlen train``, the bench's worker, the scaling sweep and the cost fit."""

from .build import Engine, Objective, build_model
from .cost import cost_shares, measure_cost
from .step import StepStats, count_targets, total_norm, train_step

__all__ = ["Engine", "Objective", "StepStats", "build_model", "cost_shares", "count_targets", "measure_cost",
           "total_norm", "train_step"]
