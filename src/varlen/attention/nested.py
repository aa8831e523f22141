"""SDPA on jagged nested tensors (``torch.nested``, ``layout=torch.jagged``).

The packed ``[T, H, D]`` tensor *is* the values buffer of a jagged ``[B, j, H, D]`` tensor, so
the conversion is free. ``min_seqlen``/``max_seqlen`` come from the host so that nothing syncs.
On the CPU only the math kernel takes jagged inputs, and it refuses ``is_causal``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..seqinfo import SeqInfo
from .common import Capabilities, repeat_kv

CAPS = Capabilities(
    name="nested",
    notes="jagged NJT + SDPA; causal needs CUDA",
)


def unavailable() -> str | None:
    return None


def reasons(q, k, v, info, causal, window_size) -> list[str]:
    if causal and q.device.type != "cuda":
        return [NO_CPU_CAUSAL]
    return []


NO_CPU_CAUSAL = "causal nested SDPA needs CUDA (the CPU math kernel refuses is_causal on jagged tensors)"


def nested_sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None = None) -> Tensor:
    """SDPA on jagged ``[B, H, j, D]`` q/k/v (each made contiguous as ``[B, j, H, D]`` first)."""
    if causal and q.device.type != "cuda":
        raise ValueError(NO_CPU_CAUSAL)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def attention(q: Tensor, k: Tensor, v: Tensor, info: SeqInfo, *, causal, scale, window_size) -> Tensor:
    heads = q.shape[1]
    qn, kn, vn = (info.nested(x).transpose(1, 2) for x in (q, repeat_kv(k, heads), repeat_kv(v, heads)))
    out = nested_sdpa(qn, kn, vn, causal=causal, scale=scale)  # [B, H, j, D]
    return out.transpose(1, 2).values()
