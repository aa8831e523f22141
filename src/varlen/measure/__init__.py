"""Measurement shared by ``varlen bench`` and ``varlen train``: synchronised timing, torch.compile
counters, closed-form FLOPs, the matmul and GEMM floors, and the profiler's breakdown of a step.
Imports neither ``bench`` nor ``train``."""

from .gc_policy import GarbageCollection
from .flops import attention_flops, linear_flops, step_flops
from .timing import compile_counter, graph_count, since, start, synchronize, time_calls

__all__ = ["GarbageCollection", "attention_flops", "compile_counter", "graph_count", "linear_flops", "since", "start", "step_flops",
           "synchronize", "time_calls"]
