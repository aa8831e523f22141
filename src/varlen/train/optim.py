"""The optimizer and the learning-rate schedule of ``varlen train``.

Weight decay follows the convention of GPT-2, nanoGPT and HF's ``Trainer``: matrices of linear
layers decay; biases, norms' weights and embeddings do not (decaying a norm's gain or an
embedding row pulls it towards zero for no regularising gain). The schedule is a pure function
of the step, so a resumed run sets exactly the rate an uninterrupted one would: nothing of it
needs a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SCHEDULES = ("constant", "linear", "cosine")
NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def decay_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters that decay, parameters that do not), each parameter once (tied weights too).

    No decay for biases, 1-D parameters (the gains of any norm, also HF's own RMSNorm classes) and
    every parameter of an embedding or a norm module; a weight tied to an embedding (an LM head)
    stays with the embedding."""
    no_decay = set()
    for module in model.modules():
        if isinstance(module, NO_DECAY_MODULES) or "norm" in type(module).__name__.lower():
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, keep, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) in no_decay or p.ndim < 2 or name.endswith("bias"):
            keep.append(p)
        else:
            decay.append(p)
    return decay, keep


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, fused: bool) -> torch.optim.Optimizer:
    """``sgd`` (no decay) or ``adamw`` with ``weight_decay`` on the decaying group only."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, fused=fused)
    decay, keep = decay_split(model)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused)


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up over ``warmup_steps`` from ``lr / warmup_steps`` to ``lr``, then ``kind``:
    ``constant``, or ``linear`` / ``cosine`` decay to ``lr * min_ratio`` at ``total_steps``."""

    kind: str = "constant"
    lr: float = 1e-3
    warmup_steps: int = 0
    total_steps: int = 1
    min_ratio: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; choose from {', '.join(SCHEDULES)}")
        if not 0 <= self.min_ratio <= 1:
            raise ValueError(f"min_ratio {self.min_ratio} is outside 0..1")

    def rate(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1-based: the first update is step 1)."""
        if step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        span = max(1, self.total_steps - self.warmup_steps)
        done = min(1.0, (step - self.warmup_steps) / span)
        shape = 1 - done if self.kind == "linear" else 0.5 * (1 + math.cos(math.pi * done))
        return self.lr * (self.min_ratio + (1 - self.min_ratio) * shape)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's rate for step ``step``; returns it."""
        lr = self.rate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
