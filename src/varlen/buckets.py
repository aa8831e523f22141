"""Rounding rules for shapes: few distinct shapes keep ``torch.compile`` to few graphs and kernels
on their fast, aligned paths. This module imports nothing else of varlen."""

from __future__ import annotations


def ceil_div(n: int, d: int) -> int:
    """``n / d`` rounded up."""
    return -(-n // d)


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return ceil_div(n, multiple) * multiple


def pow2_bucket(n: int, lo: int = 1, hi: int | None = None) -> int:
    """``n`` rounded up to a power of two, at least ``lo``, at most ``hi`` (``hi`` need not be a
    power of two: it is the cap, e.g. a model's longest sequence)."""
    b = max(lo, 1 << (max(int(n), 1) - 1).bit_length())
    return b if hi is None else min(b, hi)


GRAPH_BUCKETS_PER_OCTAVE = 8  # row sizes of CUDA-graphed runs, a graph each; filler under 1/8 of a row


def token_bucket(n: int, per_octave: int = GRAPH_BUCKETS_PER_OCTAVE) -> int:
    """``n`` rounded up to one of ``per_octave`` evenly spaced sizes of its octave (``(2**k, 2**(k+1)]``
    in steps of ``2**k / per_octave``): a token count that varies from batch to batch takes few
    distinct values (a CUDA graph each), padded by less than ``1 / per_octave`` of itself."""
    return round_up(n, max(1, pow2_bucket(n) // (2 * per_octave)))


def graph_num_seqs(samples: int, tokens: int, max_seqlen: int) -> int:
    """The sequence count of a CUDA-graphed row (``PackCollator(num_seqs=, pad_to_bucket=)``) that
    holds ``samples`` samples of ``tokens`` tokens in all: the samples, and room for the filler that
    :func:`token_bucket` adds (under 1/8 of the row, a token for each filler sequence, each at most
    ``max_seqlen`` long)."""
    return samples + ceil_div(tokens, GRAPH_BUCKETS_PER_OCTAVE * max_seqlen) + 2


MAX_SEQLEN_BUCKETS = 8  # torch.compile's default recompile limit per frame


def seqlen_bucket(longest: int, bound: int) -> int:
    """A per-batch ``max_seqlen`` for kernels that pad to it (SDPA): the longest sample as a power
    of two, capped at ``bound``, at least ``max(64, bound / 2**7)`` so that a run sees at most
    :data:`MAX_SEQLEN_BUCKETS` values (each a compiled graph). Padding is then at most twice the
    longest sample, never the bound itself for a batch of short samples."""
    lo = max(64, pow2_bucket(bound) >> (MAX_SEQLEN_BUCKETS - 1))
    return pow2_bucket(longest, lo, bound)
