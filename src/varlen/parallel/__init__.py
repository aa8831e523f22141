"""Parallelism: over the samples of a step (DDP / FSDP2, the process group: ``distributed``) and over
the tokens of a packed row (context parallelism, Ulysses: ``context``)."""

from .context import ContextShard, context_shard, shard_batch, ulysses_attention
from .distributed import Dist, Wrapping, all_agree, from_rank0, per_rank, run_then_teardown, setup, teardown, wrap

__all__ = ["ContextShard", "Dist", "Wrapping", "all_agree", "context_shard", "from_rank0", "per_rank",
           "run_then_teardown", "setup", "shard_batch", "teardown", "ulysses_attention", "wrap"]
