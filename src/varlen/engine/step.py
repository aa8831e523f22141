"""One optimizer step over micro-batches, with the loss normalised by the whole step's targets.

Each rank counts its target tokens over all its micro-batches *before* the first backward and the
count is summed over the data-parallel group, so every micro-batch's loss is ``sum(CE) / N`` with
the same global ``N``. Gradients then equal those of one process over the union of all
micro-batches of all ranks, whatever the token counts per rank or per micro-step (averaging
per-micro-batch means is the bug that made HF's gradient accumulation drift).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..data.batch import Batch
from ..loss import cross_entropy_sum, num_targets


@dataclass
class StepStats:
    loss: Tensor  # mean CE over the step's global targets (a device scalar: read it when logging)
    targets: Tensor  # global number of target tokens
    local_tokens: int  # tokens (filler excluded) this rank processed
    grad_norm: Tensor | None = None  # the gradients' 2-norm before clipping (device scalar; when clipped or checked)


def total_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The 2-norm of all ``tensors`` together, as one device scalar, the same on every rank (FSDP2's
    sharded DTensors are reduced over their mesh). Non-finite if any element is."""
    norm = torch.nn.utils.get_total_norm([t.detach() for t in tensors], foreach=tensors[0].device.type != "cpu")
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def count_targets(micro_batches: Sequence[Batch], group=None, device=None, async_op: bool = False,
                  count: Callable[[Tensor], Tensor] = num_targets):
    """Target tokens of all micro-batches of this step (``count(labels)`` each), summed over the
    data-parallel group.

    ``async_op``: returns ``(n, wait)`` with the sum still in flight; ``wait()`` before reading
    ``n``. Nothing needs the count until the first backward, so the forward runs meanwhile
    instead of every rank's GPU waiting at the start of the step for the slowest rank to arrive.
    """
    device = device or micro_batches[0].labels.device
    n = torch.zeros((), dtype=torch.int64, device=device)
    for b in micro_batches:
        n += count(b.labels)
    work = dist.all_reduce(n, group=group, async_op=True) if _world(group) > 1 else None
    if not async_op:
        if work is not None:
            work.wait()
        return n
    return n, (work.wait if work is not None else lambda: None)


def train_step(model: torch.nn.Module, micro_batches: Sequence[Batch],
               optimizer: torch.optim.Optimizer | None, forward: Callable[[torch.nn.Module, Batch], Tensor],
               *, group=None, autocast=None, max_grad_norm: float | None = None,
               before_update: Callable[[StepStats], None] | None = None,
               loss_sum: Callable[[Tensor, Tensor], Tensor] = cross_entropy_sum,
               count: Callable[[Tensor], Tensor] = num_targets) -> StepStats:
    """Forward/backward every micro-batch, then one optimizer step (skipped when ``optimizer`` is None).

    With an optimizer and ``max_grad_norm`` or ``before_update``, the gradients' total norm is
    measured (``grad_norm``), the gradients are scaled down to ``max_grad_norm`` where given, and
    ``before_update(stats)`` runs before the update: raising there (a non-finite loss or norm)
    leaves the weights as they were.

    ``forward(model, batch)`` returns logits aligned with the batch's labels (a collator's typed
    batch), and ``loss_sum(output, labels)`` sums their cross-entropy over the ``count(labels)``
    targets (or ``forward`` returns hidden states and ``loss_sum`` applies the head, chunked). ``model`` may be
    DDP-wrapped (gradient sync only on the last micro-batch) or FSDP2-sharded; both average
    gradients over ranks, which the ``world`` factor undoes so that the sum over ranks divided by
    the global target count is what remains.
    """
    if len(micro_batches) > 1 and getattr(model, "static_graph", False):
        # DDP(static_graph=True) under no_sync crashes on an internal assert, and once past it stops
        # all-reducing (pytorch/pytorch#143580, #187732): refuse rather than train on wrong gradients
        raise ValueError("gradient accumulation (several micro-batches) with DDP's static_graph is broken in "
                         "PyTorch (pytorch/pytorch#187732); use one micro-batch a step or static_graph=False")
    world = _world(group)
    n, counted = count_targets(micro_batches, group, async_op=True, count=count)  # in flight during the first forward
    total = torch.zeros((), dtype=torch.float64, device=n.device)
    tokens = 0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once, at the end
            model.set_requires_gradient_sync(last)
        with sync:
            with autocast or nullcontext():
                ce = loss_sum(forward(model, batch), batch.labels)  # float32 at least, also under bf16
            if i == 0:
                counted()
                n = n.clamp_min(1)
            (ce * (world / n.to(ce.dtype))).backward()
        total += ce.detach()
        tokens += batch.tokens
    if world > 1:
        dist.all_reduce(total, group=group)
    stats = StepStats(total / n, n, tokens)
    if optimizer is not None:
        if max_grad_norm is not None or before_update is not None:
            _norm_and_clip(optimizer, stats, max_grad_norm)
        if before_update is not None:
            before_update(stats)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return stats


def _norm_and_clip(optimizer: torch.optim.Optimizer, stats: StepStats, max_grad_norm: float | None) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    stats.grad_norm = total_norm([p.grad for p in params]) if params else torch.zeros((), device=stats.loss.device)
    if max_grad_norm is not None and params:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, stats.grad_norm)
