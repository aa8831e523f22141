"""The oracle: plain PyTorch math in float32 (float64 stays float64), one sequence at a time.

Slow and simple on purpose. It needs no optional package, runs on any device with autograd, and
loops over the host copy of the lengths, so it never reads a value back from the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..seqinfo import SeqInfo
from .common import Capabilities, band, repeat_kv, sink_softmax, soft_cap, window_bounds

CAPS = Capabilities(
    name="reference",
    window=True,
    softcap=True,
    sinks=True,
    notes="float32 math per sequence; defines correctness",
)


def unavailable() -> str | None:
    return None


def reasons(q, k, v, info, causal, window_size, softcap=0.0, sinks=False) -> list[str]:
    return []


def attention(
    q: Tensor,  # [T, H, D]
    k: Tensor,  # [T, Hkv, D]
    v: Tensor,  # [T, Hkv, D]
    info: SeqInfo,
    *,
    causal: bool,
    scale: float,
    window_size: tuple[int, int],
    softcap: float = 0.0,
    sinks: Tensor | None = None,  # [H]: a logit per head beside every row's scores
) -> Tensor:
    left, right = window_bounds(causal, window_size)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads = q.shape[1]
    outs = []
    for qs, ks, vs in zip(info.split(q), info.split(k), info.split(v)):
        qs = qs.to(compute).transpose(0, 1)  # [H, L, D]
        ks = repeat_kv(ks.to(compute), heads).transpose(0, 1)
        vs = repeat_kv(vs.to(compute), heads).transpose(0, 1)
        scores = soft_cap((qs @ ks.transpose(1, 2)) * scale, softcap)  # [H, L, L]
        pos = torch.arange(qs.shape[1], device=q.device)
        allowed = band(pos[:, None], pos[None, :], left, right)  # the diagonal is always allowed
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append((sink_softmax(scores, sinks) @ vs).transpose(0, 1))  # [L, H, D]
    return torch.cat(outs).to(q.dtype)
