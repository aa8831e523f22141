"""Bin packing of samples into rows of a token capacity: the rule shared by the token-budget
sampler and the packed-rows collator."""

from __future__ import annotations

from typing import Sequence


def best_fit_decreasing(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack the samples ``order`` (indices into ``lengths``) into bins of ``capacity`` tokens."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(order, key=lambda i: -lengths[i]):
        n = lengths[i]
        best = -1
        for b, r in enumerate(room):  # the fullest bin that still fits (bins are few per window)
            if n <= r and (best < 0 or r < room[best]):
                best = b
        if best < 0:
            bins.append([i])
            room.append(capacity - n)
        else:
            bins[best].append(i)
            room[best] -= n
    return bins
