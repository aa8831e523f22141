"""Held-out evaluation: the exact token-weighted loss over every held-out target, all ranks
together, and its perplexity."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ..data import TokenBudgetSampler, move_batch
from ..loss import cross_entropy_sum, num_targets
from ..parallel import shard_batch


class Part(Dataset):
    """The samples ``indices`` of ``ds``, with their lengths (what the token-budget sampler reads)."""

    def __init__(self, ds, indices: list[int]):
        self.ds, self.indices = ds, indices
        self.lengths = [ds.lengths[i] for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.ds[self.indices[i]]


def hold_out(ds, fraction: float, seed: int) -> tuple[Part, Part | None]:
    """(training part, held-out part): ``fraction`` of the samples, chosen by ``seed``, at least one
    each way; ``fraction`` 0 holds out nothing."""
    if not fraction:
        return Part(ds, list(range(len(ds)))), None
    n = len(ds)
    k = min(n - 1, max(1, round(n * fraction)))
    if k < 1:
        raise ValueError(f"--eval-split {fraction}: {n} sample(s) cannot be split into training and held-out parts")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return Part(ds, sorted(order[k:])), Part(ds, sorted(order[:k]))


@torch.no_grad()
def evaluate(model, forward, part: Part, collate, budget: int, *, device, dp: int, dp_rank: int, shard=None,
             autocast=None, loss_sum=cross_entropy_sum) -> dict:
    """Every held-out sample once, packed into rows of ``budget`` tokens, the data-parallel ranks
    sharing them (each runs the same number of batches, so FSDP2's collectives match)."""
    sampler = TokenBudgetSampler(part.lengths, budget, seed=0, world_size=dp, rank=dp_rank)
    loader = torch.utils.data.DataLoader(part, batch_sampler=sampler, collate_fn=collate)
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = torch.zeros((), dtype=torch.int64, device=device)
    model.eval()
    try:
        for b in loader:
            b = move_batch(b if shard is None else shard_batch(b, shard), device)
            with autocast or nullcontext():
                total += loss_sum(forward(model, b), b.labels).double()
            n += num_targets(b.labels)
    finally:
        model.train()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(n)
    loss = (total / n.clamp_min(1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_targets": int(n)}
