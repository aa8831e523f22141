"""Test oracles written independently of varlen's backends."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def truth_attention(q, k, v, lengths, causal=False, window_size=(-1, -1), dtype=torch.float64):
    """Sequence by sequence, in ``dtype``, through SDPA's math on an explicit mask."""
    left, right = window_size
    if causal:
        right = 0
    heads = q.shape[1]
    outs = []
    start = 0
    for n in lengths:
        qs, ks, vs = (x[start:start + n].to(dtype).transpose(0, 1)[None] for x in (q, k, v))
        ks = ks.repeat_interleave(heads // ks.shape[1], dim=1)
        vs = vs.repeat_interleave(heads // vs.shape[1], dim=1)
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        allowed = torch.ones(n, n, dtype=torch.bool)
        if right >= 0:
            allowed &= j <= i + right
        if left >= 0:
            allowed &= j >= i - left
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed.to(q.device))
        outs.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def bound(baseline_err: float, dtype: torch.dtype, magnitude: float = 1.0) -> float:
    """2x the error of a same-precision PyTorch computation, plus a few ulps of the data's
    magnitude (where the baseline happens to be exact, e.g. a zero gradient)."""
    return 2 * baseline_err + 8 * torch.finfo(dtype).eps * max(magnitude, 1.0)


def random_qkv(lengths, heads, kv_heads, head_dim, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    make = lambda h: torch.randn(t, h, head_dim, generator=g, dtype=torch.float64).to(device, dtype)
    return make(heads), make(kv_heads), make(kv_heads)


def scale_of(d):
    return 1 / math.sqrt(d)
