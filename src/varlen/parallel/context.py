"""Context parallelism for packed rows, Ulysses style.

The ranks of a context group share one packed row of ``T`` tokens (``T`` a multiple of the group
size ``N``); rank ``r`` holds the contiguous slice ``[r T/N, (r+1) T/N)``, whatever documents it
cuts through, and the whole row's ``SeqInfo``. Everything but attention is per token and runs on
the slice (positions come from the whole row's ``position_ids``, so they continue across slice
edges). Attention swaps the split: an all-to-all turns ``[T/N, H, D]`` on every rank into
``[T, H/N, D]`` (all tokens, a ``1/N`` share of the heads), any varlen kernel runs on the whole row
with the row's own ``cu_seqlens``, and a second all-to-all swaps back. Documents cut by a slice
edge are attended exactly as in one process. Heads must divide by ``N``; k/v heads that do not
(GQA) are repeated up to the query heads first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..attention import attention
from ..attention.common import repeat_kv
from ..data.batch import PackedBatch
from ..seqinfo import SeqInfo


@dataclass(frozen=True)
class ContextShard:
    """This rank's place in its context group."""

    rank: int  # within the context group
    size: int  # ranks in the context group
    group: object = None  # the context group's process group (None: the default group)

    def slice(self, total_tokens: int) -> slice:
        """This rank's tokens of a row of ``total_tokens``."""
        n = total_tokens // self.size
        return slice(self.rank * n, (self.rank + 1) * n)


def context_shard(rank: int, world_size: int, size: int) -> ContextShard | None:
    """This rank's place when the ``world_size`` ranks form context groups of ``size`` consecutive
    ranks (the rest data-parallel); None for ``size`` 1. Every rank must call it: it makes the
    groups' process groups."""
    if world_size % size:
        raise ValueError(f"context groups of {size} ranks do not divide the {world_size} processes")
    if size == 1:
        return None
    return ContextShard(rank % size, size, torch.distributed.new_subgroups(size)[0])


def shard_batch(batch: PackedBatch, shard: ContextShard) -> PackedBatch:
    """This rank's slice of a packed row: ``input_ids``/``labels`` ``[T/N]``, the whole row's ``info``.
    The labels were made for the whole row, so a target at a slice edge is the next token of the
    document, whichever rank holds that token."""
    t = batch.info.total_tokens
    if t % shard.size:
        raise ValueError(f"context parallelism over {shard.size} ranks needs a row of a multiple of {shard.size} "
                         f"tokens, got {t}: pad the row (PackCollator(pad_to_multiple_of={shard.size}))")
    s = shard.slice(t)
    return replace(batch, input_ids=batch.input_ids[s], labels=batch.labels[s], context=shard)


def _swap(x: Tensor, shard: ContextShard, heads_to_tokens: bool) -> Tensor:
    """All-to-all between ``[T/N, H, D]`` (a token slice, all heads) and ``[T, H/N, D]`` (all tokens,
    a head share), differentiable."""
    import torch.distributed._functional_collectives as funcol  # differentiable collectives (as torchtitan)

    n = shard.size
    group = shard.group if shard.group is not None else torch.distributed.group.WORLD
    if heads_to_tokens:  # [T/N, H, D] -> send head share j to rank j
        t, h, d = x.shape
        send = x.view(t, n, h // n, d).transpose(0, 1).contiguous()  # [N, T/N, H/N, D]
        got = funcol.all_to_all_single_autograd(send, None, None, group)  # [i] = rank i's tokens
        return got.reshape(n * t, h // n, d)
    tt, hs, d = x.shape  # [T, H/N, D] -> send token slice j to rank j
    send = x.reshape(n, tt // n, hs, d).contiguous()
    got = funcol.all_to_all_single_autograd(send, None, None, group)  # [i] = rank i's head share
    return got.transpose(0, 1).reshape(tt // n, n * hs, d)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, info: SeqInfo, shard: ContextShard, *, causal: bool = True,
                      scale: float | None = None, window_size=(-1, -1), backend: str = "auto", **kw) -> Tensor:
    """Attention of this rank's token slice ``q``/``k``/``v`` ``[T/N, H(kv), D]`` over the whole
    row ``info`` -> ``[T/N, H, D]``, exactly as :func:`varlen.attention` on the unsplit row."""
    n, heads, kv_heads = shard.size, q.shape[1], k.shape[1]
    if heads % n:
        raise ValueError(f"context parallelism over {n} ranks splits the heads: {heads} query heads do not divide "
                         f"by {n}; use a context size that divides {heads}")
    if q.shape[0] * n != info.total_tokens:
        raise ValueError(f"a rank of {n} holds {info.total_tokens // n} of the row's {info.total_tokens} tokens, "
                         f"got q of {q.shape[0]}")
    if kv_heads % n:  # GQA with fewer k/v heads than ranks: every rank needs the k/v its query heads use
        k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    q, k, v = (_swap(x, shard, heads_to_tokens=True) for x in (q, k, v))
    out = attention(q, k, v, info, causal=causal, scale=scale, window_size=window_size, backend=backend, **kw)
    return _swap(out, shard, heads_to_tokens=False)
