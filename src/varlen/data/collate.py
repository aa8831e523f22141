"""Collators for the four ways to batch variable-length samples; each is a DataLoader ``collate_fn``.

Samples are ``(input_ids, targets)`` pairs or dicts with ``input_ids`` and ``labels``, targets
already aligned with inputs (position t predicts ``targets[t]``). Padding gets token ``pad_id``
in the inputs and ``ignore_index`` in the targets, so it never reaches the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..seqinfo import SeqInfo

IGNORE_INDEX = -100


def _pairs(samples: Sequence[Any]) -> list[tuple[Tensor, Tensor]]:
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
        out.append((inp.long(), tgt.long()))
    return out


def _pad(pairs, length: int, pad_id: int, ignore_index: int) -> dict[str, Tensor]:
    longest = max(len(i) for i, _ in pairs)
    if longest > length:
        raise ValueError(f"a sample of length {longest} does not fit the padded length {length}")
    inputs = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), length), ignore_index, dtype=torch.long)
    for row, (inp, tgt) in enumerate(pairs):
        inputs[row, : len(inp)] = inp
        labels[row, : len(tgt)] = tgt
    lens = torch.tensor([len(i) for i, _ in pairs])
    mask = torch.arange(length)[None, :] < lens[:, None]
    return {"input_ids": inputs, "labels": labels, "attention_mask": mask}


@dataclass(frozen=True)
class PadCollator:
    """Strategy 1: pad every sample to ``length`` -> ``input_ids``/``labels``/``attention_mask`` ``[B, L]``."""

    length: int = 1024
    pad_id: int = 0
    ignore_index: int = IGNORE_INDEX

    def __call__(self, samples):
        return _pad(_pairs(samples), self.length, self.pad_id, self.ignore_index)


@dataclass(frozen=True)
class PadToLongestCollator:
    """Strategy 2: pad to the longest sample, rounded up to ``pad_to_multiple_of``.

    Rounding matters: SDPA with a boolean mask whose length is not a multiple of 8 leaves its fast
    kernels (on an H100, pad-to-longest unaligned ran at 2x the time of padding to 1024).
    """

    pad_to_multiple_of: int = 8
    pad_id: int = 0
    ignore_index: int = IGNORE_INDEX

    def __call__(self, samples):
        pairs = _pairs(samples)
        m = self.pad_to_multiple_of
        length = -(-max(len(i) for i, _ in pairs) // m) * m
        return _pad(pairs, length, self.pad_id, self.ignore_index)


@dataclass(frozen=True)
class PackCollator:
    """Strategy 4-6: concatenate into one row -> ``input_ids``/``labels`` ``[T]`` and ``info``.

    Each sample keeps its own targets, so no token learns to predict the next sample. ``max_seqlen``
    (optional) is a fixed upper bound handed to the kernels, which keeps it constant for
    ``torch.compile``.
    """

    max_seqlen: int | None = None

    def __call__(self, samples):
        pairs = _pairs(samples)
        info = SeqInfo.from_lengths([len(i) for i, _ in pairs], max_seqlen=self.max_seqlen)
        return {
            "input_ids": torch.cat([i for i, _ in pairs]),
            "labels": torch.cat([t for _, t in pairs]),
            "info": info,
        }


@dataclass(frozen=True)
class NestedCollator:
    """Strategy 3: jagged nested tensors ``[B, j]`` for inputs, labels and position ids."""

    def __call__(self, samples):
        pairs = _pairs(samples)
        info = SeqInfo.from_lengths([len(i) for i, _ in pairs])
        return {
            "input_ids": info.nested(torch.cat([i for i, _ in pairs])),
            "labels": info.nested(torch.cat([t for _, t in pairs])),
            "position_ids": info.nested(info.position_ids),
        }


def move_batch(batch: Any, device: torch.device | str, non_blocking: bool = True) -> Any:
    """Move every tensor and SeqInfo of a batch (dict, list, tuple) to ``device``."""
    if isinstance(batch, (Tensor, SeqInfo)):
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
    "nested": NestedCollator,
}
