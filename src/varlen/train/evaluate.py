"""Held-out evaluation: the exact token-weighted loss over every held-out target, all ranks
together, and its perplexity."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ..data import TokenBudgetSampler
from ..engine import Engine


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


class Evaluator:
    """Every held-out sample once, packed into rows of ``budget`` tokens, the data-parallel ranks
    sharing them (each runs the same number of batches, so FSDP2's collectives match). The rows are
    planned once, when the evaluator is made, not at every evaluation."""

    def __init__(self, engine: Engine, part: Part, collate, budget: int, *, dp: int, dp_rank: int):
        self.engine = engine
        sampler = TokenBudgetSampler(part.lengths, budget, seed=0, world_size=dp, rank=dp_rank)
        sampler.global_batches()  # the plan, made here and kept by the sampler
        self.loader = torch.utils.data.DataLoader(part, batch_sampler=sampler, collate_fn=collate)

    @torch.no_grad()
    def __call__(self) -> dict:
        engine = self.engine
        total = torch.zeros((), dtype=torch.float64, device=engine.device)
        n = torch.zeros((), dtype=torch.int64, device=engine.device)
        engine.wrapped.eval()
        try:
            for b in self.loader:
                b_total, b_n = engine.loss_and_count(engine.prepare(b, dynamic=False))
                total += b_total
                n += b_n
        finally:
            engine.wrapped.train()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(n)
        loss = (total / n.clamp_min(1)).item()
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_targets": int(n)}
