"""A rank's share of a token-budget step as one packed row: what ``varlen train``, the scaling sweep
and the cost fit collate with."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..buckets import graph_num_seqs, round_up
from ..loss import IGNORE_INDEX
from ..seqinfo import SeqInfo
from .batch import PackedBatch
from .collate import PackCollator, filler_lengths


STATIC_ROW_MULTIPLE = 128  # --static rows: a whole number of 128-token tiles


class TrainCollator:
    """A rank's share of a step -> one :class:`PackedBatch`; an empty share -> one ignored filler
    token, so the rank still runs forward/backward and its collectives match the others'."""

    def __init__(self, pad_to: int | None = None, max_seqlen: int | None = None, multiple_of: int = 1,
                 num_seqs: int | None = None, pad_to_bucket: int | None = None):
        # pad_to (--static): rows of at least this many tokens, rounded up to STATIC_ROW_MULTIPLE;
        # multiple_of: rows split evenly over a context group (filler tokens make up the rest);
        # num_seqs, pad_to_bucket: CUDA graphs (PackCollator's: one number of sequences, few row sizes)
        self.quantum = math.lcm(STATIC_ROW_MULTIPLE, multiple_of)
        pad_to = round_up(pad_to, self.quantum) if pad_to else None
        self.pack = PackCollator(max_seqlen=max_seqlen, pad_to=pad_to, num_seqs=num_seqs, pad_to_bucket=pad_to_bucket,
                                 pad_to_multiple_of=multiple_of if multiple_of > 1 else None)
        self.pad_to, self.multiple_of = pad_to, multiple_of

    def __call__(self, samples) -> PackedBatch:
        if samples:
            return self.fitting([len(s[0]) for s in samples])(samples)
        n = self.pad_to or self.multiple_of
        lengths = filler_lengths(n, self.pack.max_seqlen)
        info = SeqInfo.from_lengths(lengths, max_seqlen=self.pack.max_seqlen, filler=range(len(lengths)))
        return PackedBatch(torch.zeros(n, dtype=torch.long), torch.full((n,), IGNORE_INDEX), info)

    def fitting(self, lengths: list[int]) -> PackCollator:
        """The collator for a row of samples of ``lengths``. The static row size and the CUDA graphs'
        sequence count are planned from one epoch's rows; another epoch (or a resumed run) can pack a
        row past them (the study's long-tailed data: 200 samples in a row of epoch 5, 198 planned).
        Such a row gets room of its own, a new shape (a recompile or one more graph), not a crash."""
        pack, total = self.pack, sum(lengths)
        if pack.pad_to is not None and total > pack.pad_to:
            pack = replace(pack, pad_to=round_up(total, self.quantum))
        if pack.num_seqs is not None and pack.max_seqlen is not None:
            needed = graph_num_seqs(len(lengths), total, pack.max_seqlen)
            if needed > pack.num_seqs:
                pack = replace(pack, num_seqs=round_up(needed, 8))  # few distinct counts
        return pack

