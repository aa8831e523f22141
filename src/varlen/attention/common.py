"""What every backend shares: its declared capabilities and the window rule.

A backend module exposes ``CAPS`` (a :class:`Capabilities`), ``unavailable()`` (why it cannot run
on this machine at all, or ``None``), ``reasons(q, k, v, info, causal, window_size)`` (why it
cannot run these inputs) and ``attention(q, k, v, info, *, causal, scale, window_size)``; and where its kernels want the batch's
metadata otherwise than the collator made it, ``prepare(info)`` (host-side, once per batch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
HALF = frozenset({torch.float16, torch.bfloat16})


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports; the defaults are what torch's own kernels take (CPU and CUDA, every
    float dtype, any head size), so a backend states only where it differs."""

    name: str
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: frozenset[torch.dtype] = FLOATS
    head_dims: str = "any"  # human-readable rule, checked by ``head_dim_ok``
    head_dim_ok: Callable[[int], bool] = lambda d: d >= 1
    causal: bool = True
    window: bool = False
    softcap: bool = False  # logit soft-capping, softcap * tanh(score / softcap) (Gemma 2)
    sinks: bool = False  # attention sinks: a learned logit per head beside every row's scores (GPT-OSS)
    gqa: bool = True
    autograd: bool = True
    notes: str = ""

    def reasons(self, q: Tensor, k: Tensor, causal: bool, window_size: tuple[int, int], softcap: float = 0.0,
                sinks: bool = False) -> list[str]:
        out = []
        if q.device.type not in self.devices:
            out.append(f"runs on {'/'.join(sorted(self.devices))}, not {q.device.type}")
        if q.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            out.append(f"takes {names}, not {str(q.dtype).removeprefix('torch.')}")
        if not self.head_dim_ok(q.shape[-1]):
            out.append(f"head size {q.shape[-1]} unsupported (needs {self.head_dims})")
        if causal and not self.causal:
            out.append("no causal masking")
        if tuple(window_size) != (-1, -1) and not self.window:
            out.append("no sliding window")
        if softcap and not self.softcap:
            out.append("no logit soft-capping")
        if sinks and not self.sinks:
            out.append("no attention sinks")
        if k.shape[1] != q.shape[1] and not self.gqa:
            out.append("no grouped-query attention (k/v with fewer heads)")
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) and not self.autograd:
            out.append("forward only (no autograd)")
        return out


def window_bounds(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    """(left, right) key offsets a query may see; -1 = unbounded. Causal forces right = 0.

    Query i sees key j when ``i - left <= j <= i + right``, inside its own sequence::

        causal, window (-1, -1)    window (1, 0)     window (1, 1)
            1 0 0 0                  1 0 0 0          1 1 0 0
            1 1 0 0                  1 1 0 0          1 1 1 0
            1 1 1 0                  0 1 1 0          0 1 1 1
            1 1 1 1                  0 0 1 1          0 0 1 1
    """
    left, right = (int(w) for w in window_size)
    if causal:
        right = 0
    return left, right


def band(q_pos: Tensor, k_pos: Tensor, left: int, right: int) -> Tensor:
    """Elementwise: may a query at ``q_pos`` see a key at ``k_pos`` (same sequence assumed)."""
    ok = torch.ones_like(q_pos == k_pos)
    if right >= 0:
        ok = ok & (k_pos <= q_pos + right)
    if left >= 0:
        ok = ok & (k_pos >= q_pos - left)
    return ok


def repeat_kv(x: Tensor, heads: int) -> Tensor:
    """``[T, Hkv, D]`` -> ``[T, heads, D]``: query head h uses kv head h // (heads // Hkv)."""
    if x.shape[1] == heads:
        return x
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def probe(fn):
    """Memoise an environment probe and let ``torch.compile`` treat its answer as a constant.

    Probes look at packages and devices (``find_spec``, CUDA capability): dynamo cannot trace
    those, and a graph break in every attention call would split the compiled model per layer.
    """
    cache: dict = {}

    @functools.wraps(fn)
    def memo(*args):
        if args not in cache:
            cache[args] = fn(*args)
        return cache[args]

    return torch.compiler.assume_constant_result(memo)


def sink_softmax(scores: Tensor, sinks: Tensor | None) -> Tensor:
    """``scores`` [H, ..., L] -> probabilities; with ``sinks`` [H] one more logit per head joins every
    row's softmax and its share is dropped (GPT-OSS: the row may attend to nothing)."""
    if sinks is None:
        return scores.softmax(-1)
    sink = sinks.to(scores.dtype).view(-1, *([1] * (scores.dim() - 1))).expand(*scores.shape[:-1], 1)
    return torch.cat([scores, sink], -1).softmax(-1)[..., :-1]


def soft_cap(scores: Tensor, softcap: float) -> Tensor:
    """Gemma 2's logit soft-capping of (scaled) attention scores; 0 leaves them alone."""
    return softcap * torch.tanh(scores / softcap) if softcap else scores
