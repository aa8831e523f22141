"""Parallelism over the tokens of a packed row: context parallelism (Ulysses)."""

from .context import ContextShard, context_shard, shard_batch, ulysses_attention

__all__ = ["ContextShard", "context_shard", "shard_batch", "ulysses_attention"]
