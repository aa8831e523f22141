"""Closed-form matmul FLOPs of the decoder on the real tokens of a batch (docs/study.md, 'The floor').

Per token and layer: qkv (3 d^2), proj (d^2), fc1 and fc2 (2 * 4 d^2) = 12 d^2 multiply-adds,
plus the output layer (d * V). Attention: QK^T and PV, 2 * L^2 * d multiply-adds per sequence
and layer, half of it when causal. A training step is 3x the forward (backward = 2x). The study's decoder trains causal and
evaluates bidirectional; HF causal LMs are causal either way: the caller says which.
"""

from __future__ import annotations

from typing import Sequence


def linear_flops(tokens: int, dim: int, n_layers: int, vocab_size: int, mlp_ratio: int = 4) -> float:
    per_token = n_layers * (4 + 2 * mlp_ratio) * dim * dim + dim * vocab_size
    return 2.0 * tokens * per_token


def attention_flops(lengths: Sequence[int], dim: int, n_layers: int, causal: bool) -> float:
    full = 4.0 * n_layers * dim * sum(n * n for n in lengths)
    return full / 2 if causal else full


def step_flops(lengths: Sequence[int], *, dim: int, n_layers: int, vocab_size: int, train: bool, causal: bool,
               mlp_ratio: int = 4) -> float:
    """One step's matmul FLOPs: the forward, and 3x that when training (backward = 2x)."""
    fwd = linear_flops(sum(lengths), dim, n_layers, vocab_size, mlp_ratio) + attention_flops(lengths, dim, n_layers, causal)
    return 3 * fwd if train else fwd
