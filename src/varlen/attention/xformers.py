"""xFormers ``memory_efficient_attention`` with a ``BlockDiagonalMask`` over the packed row.

Needs an xFormers build with CUDA kernels; the PyPI wheel for recent torch has none, and that is
said as the reason rather than discovered at the first call.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from ..seqinfo import SeqInfo
from .common import HALF, Capabilities, probe

CAPS = Capabilities(
    name="xformers",
    devices=frozenset({"cuda"}),
    dtypes=HALF | {torch.float32},
    head_dims="at most 256",
    head_dim_ok=lambda d: d <= 256,
    window=False,
    notes="BlockDiagonalMask (make_causal() to train)",
)


@probe
def unavailable() -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers not installed (pip install varlen[xformers] on a CUDA machine)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from xformers.ops import fmha
    except Exception as e:  # a broken build should be a reason, not a crash
        return f"xformers fails to import: {e}"
    ops = [getattr(getattr(fmha, m, None), "FwOp", None) for m in ("flash", "cutlass", "flash3")]
    if not any(op is not None and _op_works(op) for op in ops):
        return "installed xFormers build has no CUDA kernels (the PyPI wheel ships none)"
    return None


def _op_works(op) -> bool:
    try:
        return bool(op.is_available())
    except Exception:
        return False


def reasons(q, k, v, info, causal, window_size) -> list[str]:
    return []


def _bias(info: SeqInfo, causal: bool):
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    def build():
        mask = BlockDiagonalMask.from_seqlens(list(info.lengths), device=info.device)
        return mask.make_causal() if causal else mask

    return info.cached(("xformers_bias", causal), build)


def attention(q: Tensor, k: Tensor, v: Tensor, info: SeqInfo, *, causal, scale, window_size) -> Tensor:
    from xformers.ops import memory_efficient_attention

    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:  # xFormers' GQA layout: [B, T, G, H/G, D]
        g = kv_heads
        q5 = q.unflatten(1, (g, heads // g))[None]
        k5 = k[:, :, None].expand(-1, -1, heads // g, -1)[None]
        v5 = v[:, :, None].expand(-1, -1, heads // g, -1)[None]
        out = memory_efficient_attention(q5, k5, v5, attn_bias=_bias(info, causal), scale=scale)
        return out[0].flatten(1, 2)
    out = memory_efficient_attention(q[None], k[None], v[None], attn_bias=_bias(info, causal), scale=scale)
    return out[0]
