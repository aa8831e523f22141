"""Test oracles written independently of varlen's backends."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def truth_attention(q, k, v, lengths, causal=False, window_size=(-1, -1), dtype=torch.float64, softcap=0.0,
                    sinks=None):
    """Sequence by sequence, in ``dtype``, through SDPA's math on an explicit mask (or, with
    ``softcap`` or ``sinks`` [H], by hand: softmax(softcap * tanh(q k^T / sqrt(d) / softcap)) v, each
    head's sink logit one more column of the softmax, dropped after it)."""
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
        if softcap or sinks is not None:
            scores = (qs @ ks.transpose(-1, -2)) / math.sqrt(qs.shape[-1])
            scores = softcap * torch.tanh(scores / softcap) if softcap else scores
            scores = scores.masked_fill(~allowed.to(q.device), float("-inf"))
            if sinks is not None:  # [1, H, n, n + 1]
                scores = torch.cat([scores, sinks.to(dtype)[None, :, None, None].expand(1, heads, n, 1)], -1)
            o = scores.softmax(-1)[..., :n] @ vs
        else:
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


def assert_matches_truth(out, q, k, v, lengths, causal=False, window_size=(-1, -1), *, grad=True, seed=0,
                         softcap=0.0, sinks=None):
    """``out`` (computed from q, k, v and ``sinks``) against a float64 truth, forward and gradients
    (the sinks' too), within 2x the error of the same computation in q's dtype (plus a few ulps)."""
    dtype = q.dtype
    q64, k64, v64 = (x.detach().double().requires_grad_(grad) for x in (q, k, v))
    s64 = None if sinks is None else sinks.detach().double().requires_grad_(grad)
    truth = truth_attention(q64, k64, v64, lengths, causal, window_size, softcap=softcap, sinks=s64)
    qb, kb, vb = (x.detach().clone().requires_grad_(grad) for x in (q, k, v))
    sb = None if sinks is None else sinks.detach().clone().requires_grad_(grad)
    base = truth_attention(qb, kb, vb, lengths, causal, window_size, dtype=dtype, softcap=softcap, sinks=sb)
    assert out.shape == (*q.shape[:-1], v.shape[-1]) and out.dtype == dtype  # v's head size may differ (MLA)
    assert max_err(out, truth) <= bound(max_err(base, truth), dtype), (max_err(out, truth), max_err(base, truth))
    if not grad:
        return
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    out.backward(dout.to(dtype))
    truth.backward(dout)
    base.backward(dout.to(dtype))
    magnitude = max(x.grad.abs().max().item() for x in (q64, k64, v64))
    for x, x64, xb, name in ((q, q64, qb, "dq"), (k, k64, kb, "dk"), (v, v64, vb, "dv")):
        err, base_err = max_err(x.grad, x64.grad), max_err(xb.grad, x64.grad)
        assert err <= bound(base_err, dtype, magnitude), (name, err, base_err)
    if sinks is not None:
        err, base_err = max_err(sinks.grad, s64.grad), max_err(sb.grad, s64.grad)
        assert err <= bound(base_err, dtype, s64.grad.abs().max().item()), ("dsinks", err, base_err)
