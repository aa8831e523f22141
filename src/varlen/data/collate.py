"""Collators for the four ways to batch variable-length samples; each is a DataLoader ``collate_fn``
returning a typed batch (:mod:`varlen.data.batch`): :class:`PaddedBatch`, :class:`PackedBatch` or
:class:`NestedBatch`.

Samples are ``(input_ids, labels)`` pairs or dicts with ``input_ids`` and ``labels``. Each
collator is told what the labels mean (``labels=``, :class:`varlen.loss.Labels`): ``SHIFTED``
(the default: position t predicts ``labels[t]``, varlen's decoder) or ``UNSHIFTED`` (the labels
are the inputs and the model shifts them, HF), so a packed row ignores exactly the labels that
would cross a sample boundary; labels that plainly follow the other convention are refused.
Padding gets token ``pad_id`` in the inputs and ``ignore_index`` in the labels, so it never
reaches the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..buckets import ceil_div, pow2_bucket, round_up, seqlen_bucket, token_bucket
from ..loss import IGNORE_INDEX, Labels
from ..seqinfo import SeqInfo
from .batch import Batch, NestedBatch, PackedBatch, PaddedBatch
from .binpack import best_fit_decreasing


def as_pairs(samples: Sequence[Any], labels: Labels = Labels.SHIFTED) -> list[tuple[Tensor, Tensor]]:
    """Samples as ``(input_ids, labels)`` pairs of 1-D int64 tensors: each sample a mapping with
    those keys or a pair; a malformed one, or one whose labels follow the other convention than
    ``labels``, is named by its index."""
    if not samples:
        raise ValueError("empty batch: no samples")
    out = []
    for i, s in enumerate(samples):
        if isinstance(s, Mapping):
            inp, tgt = s["input_ids"], s["labels"]
        else:
            inp, tgt = s
        inp, tgt = torch.as_tensor(inp), torch.as_tensor(tgt)
        if inp.dim() != 1 or inp.shape != tgt.shape:
            raise ValueError(
                f"sample {i}: input_ids and labels must be 1-D of the same length, got "
                f"{tuple(inp.shape)} and {tuple(tgt.shape)}"
            )
        if inp.numel() == 0:
            raise ValueError(f"sample {i} is empty")
        inp, tgt = inp.long(), tgt.long()
        labels.check(inp, tgt, f"sample {i}")
        out.append((inp, tgt))
    return out


def pad_pairs(pairs, length: int, pad_id: int, ignore_index: int) -> PaddedBatch:
    """Pairs right-padded into ``input_ids``/``labels``/``attention_mask`` ``[B, length]``."""
    longest = max(len(i) for i, _ in pairs)
    if longest > length:
        raise ValueError(f"a sample of length {longest} does not fit the padded length {length}")
    inputs = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), length), ignore_index, dtype=torch.long)
    for row, (inp, tgt) in enumerate(pairs):
        inputs[row, : len(inp)] = inp
        labels[row, : len(tgt)] = tgt
    lens = [len(i) for i, _ in pairs]
    mask = torch.arange(length)[None, :] < torch.tensor(lens)[:, None]
    return PaddedBatch(inputs, labels, mask, sum(lens))


@dataclass(frozen=True)
class PadCollator:
    """Strategy 1: pad every sample to ``length`` -> :class:`PaddedBatch` ``[B, L]``."""

    length: int = 1024
    pad_id: int = 0
    ignore_index: int = IGNORE_INDEX
    labels: Labels = Labels.SHIFTED  # each row holds one sample: no boundary to guard

    def __post_init__(self):
        object.__setattr__(self, "labels", Labels(self.labels))

    def __call__(self, samples) -> PaddedBatch:
        return pad_pairs(as_pairs(samples, self.labels), self.length, self.pad_id, self.ignore_index)


@dataclass(frozen=True)
class PadToLongestCollator:
    """Strategy 2: pad to the longest sample of the batch, bucketed.

    The padded length is the longest sample rounded up to a power of two, at least
    ``min_length`` and at most ``max_length`` (when given; a longer sample is an error), so a
    run sees at most ``log2(max_length / min_length) + 1`` shapes: each new shape costs
    ``torch.compile`` a graph, and lengths that are not a multiple of 16 drop SDPA with a mask to
    its slow kernels (docs/gpu-notes.md).
    ``bucket="multiple"`` rounds up to a multiple of ``min_length`` instead (finer, more shapes).
    """

    min_length: int = 64
    max_length: int | None = None
    bucket: str = "pow2"  # "pow2" | "multiple"
    pad_id: int = 0
    ignore_index: int = IGNORE_INDEX
    labels: Labels = Labels.SHIFTED  # each row holds one sample: no boundary to guard

    def __post_init__(self):
        object.__setattr__(self, "labels", Labels(self.labels))
        if self.bucket not in ("pow2", "multiple"):
            raise ValueError(f"bucket must be 'pow2' or 'multiple', got {self.bucket!r}")
        if self.min_length < 1 or (self.max_length is not None and self.max_length < self.min_length):
            raise ValueError(f"need 1 <= min_length <= max_length, got {self.min_length} and {self.max_length}")

    def length(self, longest: int) -> int:
        """The padded length of a batch whose longest sample has ``longest`` tokens."""
        if self.max_length is not None and longest > self.max_length:
            raise ValueError(f"a sample of length {longest} does not fit max_length={self.max_length}")
        if self.bucket == "pow2":
            return pow2_bucket(longest, self.min_length, self.max_length)
        n = round_up(longest, self.min_length)
        return n if self.max_length is None else min(n, self.max_length)

    def __call__(self, samples) -> PaddedBatch:
        pairs = as_pairs(samples, self.labels)
        return pad_pairs(pairs, self.length(max(len(i) for i, _ in pairs)), self.pad_id, self.ignore_index)


@dataclass(frozen=True)
class PackCollator:
    """Strategy 4-6: concatenate into one row -> :class:`PackedBatch` (``input_ids``/``labels`` ``[T]``, ``info``).

    Each sample keeps its own targets, so no token learns to predict the next sample. ``max_seqlen``
    (optional) is a fixed upper bound handed to the kernels, which keeps it constant for
    ``torch.compile``. ``pad_to`` fills the row up to that many tokens (static shapes for CUDA
    graphs), ``pad_to_multiple_of`` up to the next multiple (buckets): the filler forms sequences
    of its own, no longer than ``max_seqlen``, with ignored labels, so it never mixes with real
    tokens. ``num_seqs`` also fixes the number of sequences (``cu_seqlens`` has ``num_seqs + 1``
    entries every batch): the filler is split into as many sequences as the samples leave, so
    with ``pad_to`` and ``max_seqlen`` every batch has the same shapes and one CUDA graph serves
    them all. ``pad_to`` must then leave at least one filler token per missing sequence.
    ``pad_to_bucket`` (sizes per octave, :func:`varlen.buckets.token_bucket`) rounds the row up to
    one of a few sizes instead: with ``num_seqs``, a run has a few shapes, a CUDA graph each.
    Filler sequences are at most the longest sample's power-of-two bucket
    (:func:`varlen.buckets.seqlen_bucket`) long, so a kernel that pads to a per-batch ``max_seqlen``
    (SDPA's :func:`varlen.attention.prepare`) pads to what the samples need, not to the bound.
    """

    max_seqlen: int | None = None
    pad_to: int | None = None
    pad_to_multiple_of: int | None = None  # buckets of token counts: fewer shapes for the compiler
    num_seqs: int | None = None  # a fixed number of sequences (real + filler): CUDA graphs
    pad_to_bucket: int | None = None  # token_bucket(per_octave=...) of the row: a few shapes
    pad_id: int = 0
    ignore_index: int = IGNORE_INDEX
    labels: Labels = Labels.SHIFTED  # UNSHIFTED: each sample's first label is ignored

    def __post_init__(self):
        object.__setattr__(self, "labels", Labels(self.labels))

    def __call__(self, samples) -> PackedBatch:
        pairs = as_pairs(samples, self.labels)
        lengths = [len(i) for i, _ in pairs]
        total = sum(lengths)
        if self.pad_to is not None and total > self.pad_to:
            raise ValueError(f"batch has {total} tokens, more than pad_to={self.pad_to}")
        target = self.row_tokens(lengths)
        max_seqlen = self.max_seqlen
        # filler no longer than the longest sample's bucket, so its positions stay inside the model's
        # range and a kernel padding to the batch's longest (SDPA) pads no further for it
        cap = max_seqlen or max(lengths, default=None)
        if self.num_seqs is None:
            filler = filler_lengths(target - total, seqlen_bucket(max(lengths), cap) if max_seqlen and lengths else cap)
        else:  # the filler shared out over a fixed count: up to the bound (a smaller cap might not fit)
            filler = split_filler(target - total, len(lengths), self.num_seqs, cap)
        info = SeqInfo.from_lengths(lengths + filler, max_seqlen=max_seqlen,
                                    filler=range(len(lengths), len(lengths) + len(filler)))
        pad = sum(filler)
        labels = torch.cat([t for _, t in pairs] + [torch.full((pad,), self.ignore_index, dtype=torch.long)])
        return PackedBatch(torch.cat([i for i, _ in pairs] + [torch.full((pad,), self.pad_id, dtype=torch.long)]),
                           self.labels.packed(labels, info.cu_seqlens[:len(pairs)], self.ignore_index), info)

    def row_tokens(self, lengths: list[int]) -> int:
        """The row's token count for samples of ``lengths``, filler included."""
        target = self.pad_to or sum(lengths)
        if self.pad_to_bucket:  # at least one filler token for each sequence num_seqs adds
            target = token_bucket(target + max(0, (self.num_seqs or 0) - len(lengths)), self.pad_to_bucket)
        if self.pad_to_multiple_of:
            target = round_up(target, self.pad_to_multiple_of)
        return target


def split_filler(tokens: int, samples: int, num_seqs: int, cap: int) -> list[int]:
    """``tokens`` filler tokens as the ``num_seqs - samples`` sequences a batch of ``samples``
    lacks, of 1..``cap`` tokens each."""
    count = num_seqs - samples
    if count < 0:
        raise ValueError(f"batch has {samples} samples, more than num_seqs={num_seqs}")
    if count == 0 and tokens:
        raise ValueError(f"num_seqs={num_seqs} sequences are all samples, but {tokens} filler tokens remain: "
                         "raise num_seqs or lower pad_to")
    if tokens < count:
        raise ValueError(f"{count} filler sequences to reach num_seqs={num_seqs} need at least {count} filler "
                         f"tokens, the row has {tokens} left: raise pad_to (budget + num_seqs always fits)")
    if count and ceil_div(tokens, count) > cap:
        raise ValueError(f"{tokens} filler tokens in {count} sequences exceed {cap} tokens each: raise num_seqs")
    q, r = divmod(tokens, count) if count else (0, 0)
    return [q + 1] * r + [q] * (count - r)


def filler_lengths(tokens: int, max_seqlen: int | None) -> list[int]:
    """Filler tokens as sequences of at most ``max_seqlen`` (a kernel given a sequence longer than
    ``max_seqlen`` may leave its rows unwritten, and garbage there would reach the weight grads)."""
    if tokens <= 0:
        return []
    step = max_seqlen or tokens
    return [step] * (tokens // step) + ([tokens % step] if tokens % step else [])


@dataclass(frozen=True)
class PackRowsCollator:
    """Packed rows of a fixed length: HF's ``[B, L]`` packed format (TRL's best-fit packing).

    Samples fill rows of ``row_len`` best-fit decreasing; each row's tail is filler (sequences of
    their own, no longer than the batch's longest sample so that their positions stay inside the
    model's range; ignored labels). Returns a :class:`PackedBatch` of the ``B * L`` tokens with
    ``row_len``: HF models get ``input_ids``/``position_ids`` ``[B, L]`` from its ``hf_kwargs()``
    (positions restart at 0 per sample and per filler). ``rows`` pads the batch to that many rows
    (static shapes). For HF models, whose labels are the inputs, collate with
    ``labels=Labels.UNSHIFTED``: each sample's first label is then ignored, so no token learns to
    predict the next sample's first.
    """

    row_len: int
    rows: int | None = None
    pad_id: int = 0
    ignore_index: int = IGNORE_INDEX
    labels: Labels = Labels.SHIFTED

    def __post_init__(self):
        object.__setattr__(self, "labels", Labels(self.labels))

    def __call__(self, samples) -> PackedBatch:
        pairs = as_pairs(samples, self.labels)
        lengths = [len(i) for i, _ in pairs]
        if max(lengths) > self.row_len:
            raise ValueError(f"a sample has {max(lengths)} tokens, more than row_len={self.row_len}")
        groups = best_fit_decreasing(lengths, range(len(pairs)), self.row_len)
        if self.rows is not None:
            if len(groups) > self.rows:
                raise ValueError(f"samples need {len(groups)} rows of {self.row_len}, more than rows={self.rows}")
            groups += [[] for _ in range(self.rows - len(groups))]
        ids, labels, seq_lengths, filler = [], [], [], []
        for g in groups:
            used = sum(lengths[i] for i in g)
            pad = self.row_len - used
            ids += [pairs[i][0] for i in g] + [torch.full((pad,), self.pad_id, dtype=torch.long)]
            labels += [pairs[i][1] for i in g] + [torch.full((pad,), self.ignore_index, dtype=torch.long)]
            seq_lengths += [lengths[i] for i in g]
            tail = filler_lengths(pad, max(lengths))
            filler += range(len(seq_lengths), len(seq_lengths) + len(tail))
            seq_lengths += tail
        info = SeqInfo.from_lengths(seq_lengths, max_seqlen=self.row_len, filler=filler)
        labels = self.labels.packed(torch.cat(labels), info.cu_seqlens[:-1], self.ignore_index)
        return PackedBatch(torch.cat(ids), labels, info, row_len=self.row_len)


@dataclass(frozen=True)
class NestedCollator:
    """Strategy 3: jagged nested tensors ``[B, j]`` for inputs, labels and position ids (:class:`NestedBatch`).

    ``max_seqlen`` (optional) is a fixed upper bound on the lengths, as for :class:`PackCollator`:
    constant, it keeps ``torch.compile`` from specialising on each batch's longest sample.
    """

    max_seqlen: int | None = None
    labels: Labels = Labels.SHIFTED  # each sample its own sequence: no boundary to guard

    def __post_init__(self):
        object.__setattr__(self, "labels", Labels(self.labels))

    def __call__(self, samples) -> NestedBatch:
        pairs = as_pairs(samples, self.labels)
        info = SeqInfo.from_lengths([len(i) for i, _ in pairs], max_seqlen=self.max_seqlen)
        return NestedBatch(info.nested(torch.cat([i for i, _ in pairs])), info.nested(torch.cat([t for _, t in pairs])),
                           info.nested(info.position_ids), info)


def move_batch(batch: Any, device: torch.device | str, non_blocking: bool = True) -> Any:
    """Move every tensor and SeqInfo of a batch (a typed batch, or HF's dict, list, tuple) to ``device``."""
    if isinstance(batch, (Tensor, SeqInfo, Batch)):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device, non_blocking) for v in batch)
    return batch


COLLATORS = {
    "padded": PadCollator,
    "longest": PadToLongestCollator,
    "packed": PackCollator,
    "packed-rows": PackRowsCollator,
    "nested": NestedCollator,
}
