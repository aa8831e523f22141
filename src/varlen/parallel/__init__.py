"""Parallelism over the tokens of a packed row: context parallelism (Ulysses)."""

from .context import ContextShard, shard_batch, ulysses_attention

__all__ = ["ContextShard", "shard_batch", "ulysses_attention"]
