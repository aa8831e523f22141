"""``--cost measure`` (``varlen train``, the scaling sweep): the token-budget sampler's cost model
fitted to this model's own forward+backward times on this device."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from ..data import CostModel, TrainCollator, move_batch
from ..loss import IGNORE_INDEX
from ..measure import time_calls
from ..models import DecoderConfig, ModelFamily
from ..parallel.distributed import Dist


def cost_shares(cfg: DecoderConfig, device: torch.device) -> list[list[int]]:
    """The shares timed, in order: one token count cut into sequences of 8 tokens up to the longest,
    and half that count of the longest (so the per-token weight is not only an intercept)."""
    n = min(1024, cfg.max_len - 1)
    tokens = (16 if device.type == "cuda" else 4) * n  # a GPU needs a real batch to be busy
    shares = [[L] * (tokens // L) for L in sorted({min(L, n) for L in (8, 32, 128, n // 2, n)})]
    return shares + [[n] * (tokens // n // 2)]


def measure_cost(model: nn.Module, fam: ModelFamily, cfg: DecoderConfig, d: Dist,
                 dtype: torch.dtype | None = None) -> CostModel:
    """Time forward+backward of the same token count cut into sequences of 8 tokens up to the longest,
    and fit the cost model to it: per sequence, per token and per squared length, in this model on
    this device, under autocast to ``dtype`` (None: none), as the run's engine steps it. Rank 0
    measures; every rank gets its weights, so that all split alike."""
    coll = TrainCollator()
    autocast = torch.autocast(d.device.type, dtype=dtype) if dtype is not None else nullcontext()
    g = torch.Generator().manual_seed(0)

    def timed(lengths):
        ids = [torch.randint(1, cfg.vocab_size, (L,), generator=g) for L in lengths]
        samples = [(x, torch.full_like(x, IGNORE_INDEX)) for x in ids]  # timed on logits: no labels read
        batch = move_batch(coll(samples), d.device)
        def fwd_bwd():
            with autocast:
                fam.logits(model, batch).float().sum().backward()

        ts = time_calls(fwd_bwd, d.device, 3, warmup=1)
        model.zero_grad(set_to_none=True)
        return min(ts)

    shares = cost_shares(cfg, d.device)
    w = torch.full((2,), float("nan"), dtype=torch.float64)
    why = ""
    if d.rank == 0:  # rank 0's weights for every rank, so that all split alike
        try:
            fitted = CostModel.fit(shares, [timed(s) for s in shares])
            w = torch.tensor([fitted.per_token_sq, fitted.per_seq], dtype=torch.float64)
        except ValueError as e:
            why = f" ({e})"
    if dist.is_initialized():
        w = w.to(d.device)
        dist.broadcast(w, 0)
    if w.isnan().any():  # on every rank, not only where the fit failed: none is left waiting
        raise SystemExit(f"--cost measure could not fit rank 0's timings{why}; use --cost flops")
    return CostModel(1.0, float(w[0]), float(w[1]))
