"""PyTorch SDPA on padded batches: unpack to ``[B, H, L, D]``, one boolean mask, repack.

SDPA refuses ``is_causal=True`` together with ``attn_mask``, so padding, causality and the window
go into one mask. ``L`` is the batch's longest sample rounded up to a power of two
(:func:`padded_length`): with an unaligned boolean mask SDPA leaves its fast kernels.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..buckets import pow2_bucket, round_up, seqlen_bucket
from ..seqinfo import SeqInfo
from .common import Capabilities, band, window_bounds

CAPS = Capabilities(
    name="sdpa",
    window=True,
    notes="pads to the longest sample (a power of two) and masks; memory grows with B * L^2",
)

ALIGN = 64  # SDPA with a mask keeps its fast kernels at multiples of 64 (16 at the least)


def unavailable() -> str | None:
    return None


def reasons(q, k, v, info, causal, window_size) -> list[str]:
    return []


def prepare(info: SeqInfo) -> SeqInfo:
    """``max_seqlen`` the batch's longest sequence as a power of two, capped at the collator's bound
    (:func:`varlen.buckets.seqlen_bucket`: at most 8 values a run, a compiled graph each): compiled,
    :func:`padded_length` pads to ``max_seqlen``, so memory follows the batch, not the bound."""
    bucket = seqlen_bucket(max(info.lengths), info.max_seqlen)
    return info if bucket == info.max_seqlen else replace(info, max_seqlen=bucket, _cache={})


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
    """The length sequences are padded to, a multiple of ``ALIGN``. Eager: the batch's longest as a
    power of two (at least 64), or ``max_seqlen`` rounded up to ``ALIGN`` where that is shorter
    (``max_seqlen`` may be far longer than any sample: ``varlen train --max-len 5000`` on 100-token
    samples once padded each to 5000 and ran out of memory). SDPA with a mask leaves its fast
    kernels at lengths off multiples of 16, and a power of two capped at a collator's
    ``max_seqlen`` (1000, not 1024) lands there (docs/gpu-notes.md). Compiled: ``max_seqlen`` itself, aligned
    (reading the host lengths would guard on them, a recompile per batch; :func:`prepare` buckets it
    per batch)."""
    aligned_bound = round_up(info.max_seqlen, ALIGN)
    if torch.compiler.is_compiling():
        return aligned_bound
    return min(pow2_bucket(max(info.lengths), 64), aligned_bound)


def check_fits(info: SeqInfo, heads: int, length: int, device: torch.device | None = None) -> None:
    """Say so before allocating what the device does not have. The boolean mask is
    ``[B, 1, L, L]``; on the CPU, SDPA's math kernel also holds ``[B, H, L, L]`` float32 scores
    (and their softmax)."""
    device = device or torch.device("cpu")
    need = info.num_seqs * length * length
    if device.type == "cpu":
        need += 2 * info.num_seqs * heads * length * length * 4
    avail = available_memory(device)
    if avail is not None and need > avail:
        raise MemoryError(f"sdpa: {info.num_seqs} sequences padded to {length} tokens need ~{need / 2**30:.1f} GiB for "
                          f"the attention mask and scores, {avail / 2**30:.1f} GiB is free on {device.type}; use fewer "
                          "tokens a batch or the flash / flex backends")


def available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated on ``device``: free on the GPU plus what torch's caching
    allocator holds unused; on the CPU what the kernel says can be had without swapping (Linux)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
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
    if not torch.compiler.is_compiling():  # once per batch: the first layer's check holds for all
        info.cached(("sdpa_fits", length), lambda: check_fits(info, q.shape[1], length, q.device) or True)
    mask = info.cached(
        ("sdpa_mask", length, causal, tuple(window_size)),
        lambda: padded_mask(info.padding_mask(length), causal, window_size),
    )

    def pad(x: Tensor) -> Tensor:  # [T, H, D] -> [B, H, L, D]
        return info.unpack(x, length).transpose(1, 2)

    out = padded_attention(pad(q), pad(k), pad(v), mask, scale=scale)
    return info.pack(out.transpose(1, 2))
