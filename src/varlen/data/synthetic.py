"""The study's synthetic data: random lengths, random tokens, targets shifted by one."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

LENGTH_DISTS = ("uniform", "fixed", "lognormal")


def sample_lengths(n: int, dist: str, max_len: int, seed: int = 0) -> list[int]:
    """``n`` lengths in ``1..max_len``.

    ``uniform``: the study's integers 1..max_len; ``fixed``: all max_len; ``lognormal``: long-tailed,
    median max_len / 8, clipped to 1..max_len; any other string is a file of lengths (one integer a
    line or whitespace-separated), cycled.
    """
    g = torch.Generator().manual_seed(seed)
    match dist:
        case "uniform":
            lens = torch.randint(1, max_len + 1, (n,), generator=g)
        case "fixed":
            lens = torch.full((n,), max_len)
        case "lognormal":
            z = torch.randn(n, generator=g, dtype=torch.float64)
            lens = torch.exp(math.log(max_len / 8) + 1.0 * z).round().clamp(1, max_len).long()
        case path:
            p = Path(path)
            if not p.is_file():
                raise ValueError(f"length distribution {dist!r} is neither one of {LENGTH_DISTS} nor a file")
            table = read_lengths(p, max_len)
            lens = torch.tensor([table[i % len(table)] for i in range(n)])
    return [int(x) for x in lens.tolist()]


def read_lengths(path: Path, max_len: int) -> list[int]:
    """A file of lengths (whitespace-separated integers), each in 1..max_len; a bad one is an error
    naming its line."""
    table = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        for word in line.split():
            try:
                value = int(word)
            except ValueError:
                raise ValueError(f"{path}:{n}: {word!r} is not an integer length") from None
            if not 1 <= value <= max_len:
                raise ValueError(f"{path}:{n}: length {value} is outside 1..{max_len} (the longest sample, --max-len)")
            table.append(value)
    if not table:
        raise ValueError(f"{path}: no lengths in the file")
    return table


class SyntheticDataset(Dataset):
    """Sample i: ``(input_ids, targets)`` of length ``lengths[i]``, tokens in ``1..vocab-1``.

    Token 0 is padding and never appears in a sample. Deterministic for a seed, whichever worker
    draws the sample.
    """

    def __init__(self, num_samples: int, *, max_len: int = 1023, vocab_size: int = 1024,
                 length_dist: str = "uniform", seed: int = 0):
        self.lengths = sample_lengths(num_samples, length_dist, max_len, seed)
        self.vocab_size = vocab_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        tokens = torch.randint(1, self.vocab_size, (self.lengths[i] + 1,), generator=g)
        return tokens[:-1], tokens[1:]
