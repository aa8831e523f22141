"""``varlen bench``: the variable-length study, every strategy side by side (the command itself is
``varlen.bench.cli``)."""

from ..measure.flops import attention_flops, linear_flops, step_flops
from .cases import STRATEGIES, WORKLOADS, Case, Result, Workload, grid

__all__ = ["STRATEGIES", "WORKLOADS", "Case", "Result", "Workload", "attention_flops", "grid", "linear_flops", "step_flops"]
