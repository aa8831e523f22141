"""PyTorch SDPA on padded batches: unpack to ``[B, H, L, D]``, one boolean mask, repack.

SDPA refuses ``is_causal=True`` together with ``attn_mask``, so padding, causality and the window
go into one mask. ``L`` is the batch's longest sample rounded up to a multiple of 8: with an
unaligned boolean mask SDPA leaves its fast kernels.
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
    notes="pads to the longest sample (multiple of 8) and masks; memory grows with B * L^2",
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


def padded_length(info: SeqInfo) -> int:
    """The length sequences are padded to: the batch's longest, rounded up to ALIGN. Compiled, the
    SeqInfo's ``max_seqlen`` bound instead (reading the host lengths would make the graph guard on
    them, a recompile per batch); eager, never the bound, which may be far longer than any sample
    (``varlen train --max-len 5000`` on 100-token samples padded each to 5000 and ran out of memory)."""
    longest = info.max_seqlen if torch.compiler.is_compiling() else min(info.max_seqlen, max(info.lengths))
    return -(-longest // ALIGN) * ALIGN


def check_fits(info: SeqInfo, heads: int, length: int) -> None:
    """On the CPU, SDPA's math kernel holds [B, H, L, L] float32 scores (and their softmax): say so
    before allocating what the machine does not have."""
    need = 2 * info.num_seqs * heads * length * length * 4
    avail = available_memory()
    if avail is not None and need > avail:
        raise MemoryError(f"sdpa: {info.num_seqs} sequences padded to {length} tokens need ~{need / 2**30:.1f} GiB for "
                          f"the attention scores, {avail / 2**30:.1f} GiB is free; use fewer tokens a batch or the "
                          "flash / flex backends")


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def attention(q: Tensor, k: Tensor, v: Tensor, info: SeqInfo, *, causal, scale, window_size) -> Tensor:
    length = padded_length(info)
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        check_fits(info, q.shape[1], length)
    mask = info.cached(
        ("sdpa_mask", length, causal, tuple(window_size)),
        lambda: padded_mask(info.padding_mask(length), causal, window_size),
    )

    def pad(x: Tensor) -> Tensor:  # [T, H, D] -> [B, H, L, D]
        return info.unpack(x, length).transpose(1, 2)

    out = padded_attention(pad(q), pad(k), pad(v), mask, scale=scale)
    return info.pack(out.transpose(1, 2))
