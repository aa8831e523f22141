"""PyTorch SDPA on padded batches: unpack to ``[B, H, L, D]``, one boolean mask, repack.

SDPA refuses ``is_causal=True`` together with ``attn_mask``, so padding, causality and the window
go into one mask. ``L`` is rounded up to a multiple of 8: with an unaligned boolean mask SDPA
leaves its fast kernels (pad-to-longest ran at 2x the time of pad-to-1024 on an H100).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..seqinfo import SeqInfo
from .common import FLOATS, Capabilities, band, window_bounds

CAPS = Capabilities(
    name="sdpa",
    devices=frozenset({"cpu", "cuda"}),
    dtypes=FLOATS,
    head_dims="any",
    head_dim_ok=lambda d: d >= 1,
    window=True,
    notes="pads to max_seqlen (multiple of 8) and masks; memory grows with B * L^2",
)

ALIGN = 8


def unavailable() -> str | None:
    return None


def reasons(q, k, v, info, causal, window_size) -> list[str]:
    return []


def padded_mask(key_valid: Tensor, causal: bool, window_size: tuple[int, int] = (-1, -1)) -> Tensor:
    """``[B, L]`` real-token mask -> ``[B, 1, L, L]`` boolean SDPA mask (True = attend).

    Padded query rows attend to everything: their output is thrown away, and a fully masked row
    would give NaN, which poisons the backward pass even when multiplied by zero.
    """
    left, right = window_bounds(causal, window_size)
    pos = torch.arange(key_valid.shape[1], device=key_valid.device)
    allowed = band(pos[:, None], pos[None, :], left, right)[None]  # [1, L, L]
    allowed = (allowed & key_valid[:, None, :]) | ~key_valid[:, :, None]
    return allowed[:, None]


def padded_attention(
    q: Tensor,  # [B, H, L, D]
    k: Tensor,  # [B, Hkv, L, D]
    v: Tensor,
    mask: Tensor,  # [B, 1, L, L] from padded_mask
    *,
    scale: float | None = None,
) -> Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


def attention(q: Tensor, k: Tensor, v: Tensor, info: SeqInfo, *, causal, scale, window_size) -> Tensor:
    length = -(-info.max_seqlen // ALIGN) * ALIGN
    mask = info.cached(
        ("sdpa_mask", length, causal, tuple(window_size)),
        lambda: padded_mask(info.padding_mask(length), causal, window_size),
    )

    def pad(x: Tensor) -> Tensor:  # [T, H, D] -> [B, H, L, D]
        return info.unpack(x, length).transpose(1, 2)

    out = padded_attention(pad(q), pad(k), pad(v), mask, scale=scale)
    return info.pack(out.transpose(1, 2))
