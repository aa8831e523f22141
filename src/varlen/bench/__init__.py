"""``varlen bench``: the variable-length study, every strategy side by side."""

from .cases import PRESETS, STRATEGIES, Case, Result, Workload, grid
from .cli import main
from .flops import attention_flops, linear_flops, step_flops

__all__ = ["PRESETS", "STRATEGIES", "Case", "Result", "Workload", "attention_flops", "grid", "linear_flops", "main", "step_flops"]
