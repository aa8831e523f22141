"""A model built once and how a batch goes through it: ``varlen train``, the bench's worker, the
scaling sweep and the cost fit build here (family, levers, compile, DDP/FSDP2 wrapping) and step
here (context slice, move, dynamic marks, forward/backward, update). Each keeps its own clock
(``varlen.measure``): the engine adds no synchronisation."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..attention import prepare
from ..data import Batch, move_batch
from ..levers import Levers
from ..loss import cross_entropy_sum, num_targets
from ..models import DecoderConfig, ModelFamily
from ..parallel import ContextShard, shard_batch
from ..parallel.distributed import Dist, Wrapping, wrap
from .step import StepStats, train_step


@dataclass(frozen=True)
class Objective:
    """What a step computes: ``forward(model, batch)`` -> an output, ``loss_sum(output, labels)`` -> its
    summed cross-entropy (float32 at least) over ``count(labels)`` targets. The step divides by the
    count of the whole step (all micro-batches, all ranks)."""

    forward: Callable[[nn.Module, Batch], Tensor]
    loss_sum: Callable[[Tensor, Tensor], Tensor] = cross_entropy_sum
    count: Callable[[Tensor], Tensor] = num_targets

    @classmethod
    def logits(cls, fam: ModelFamily, causal: bool = True) -> Objective:
        """The family's logits against the batch's labels: what every varlen loop trains on."""
        return cls(lambda m, b: fam.logits(m, b, causal=causal))


def build_model(fam: ModelFamily, cfg: DecoderConfig, backend: str, device: torch.device, *, levers: Levers = Levers(),
                train: bool = True, **build_kwargs) -> nn.Module:
    """The family's model of ``cfg``'s size (a folder's own), in training or eval mode, the levers'
    conversions made, on ``device``. Raises ValueError for a folder transformers cannot load or a
    model varlen cannot pack (``varlen.hf.PackingRefused``)."""
    model = fam.build(cfg, backend, **build_kwargs)
    model.train(train)
    levers.convert(model)
    return model.to(device)


@dataclass
class Engine:
    """``model`` wrapped once (compiled, DDP / FSDP2) and stepped on typed batches."""

    model: nn.Module  # as built: its parameters are the optimizer's, a rank can step it alone
    wrapped: nn.Module  # what the steps call
    objective: Objective
    device: torch.device
    dtype: torch.dtype | None = None  # autocast's, or None
    shard: ContextShard | None = None  # context parallelism: this rank's slice of every row
    dynamic: bool = False  # compiled on rows of varying shapes: mark each batch's sizes dynamic
    attention: str | None = None  # the attention backend whose shape policy each batch gets (None: none)
    autocast: object = field(init=False, repr=False)

    def __post_init__(self):
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else None

    @classmethod
    def around(cls, model: nn.Module, objective: Objective, d: Dist, *, parallel: str = "none",
               wrapping: Wrapping = Wrapping(), compile: bool = False, compile_mode: str | None = None,
               dtype: torch.dtype | None = None, shard: ContextShard | None = None, static: bool = False,
               attention: str | None = None) -> Engine:
        """``model`` compiled and wrapped for ``parallel`` (``none``, ``ddp``, ``fsdp2``): FSDP2 gathers
        parameters in ``dtype``; ``static``: every row has one shape (nothing marked dynamic);
        ``attention``: the backend varlen's attention runs in the model (None: attention of its own),
        whose shape policy each batch gets, except under CUDA graphs (rows the collator shaped once)."""
        wrapped = wrap(model, parallel, d, **wrapping.wrap_kwargs(),
                       param_dtype=dtype if dtype == torch.bfloat16 else None, compile=compile,
                       compile_mode=compile_mode)
        graphs = compile and compile_mode in ("reduce-overhead", "max-autotune")
        return cls(model, wrapped, objective, d.device, dtype, shard, dynamic=compile and not static,
                   attention=None if graphs else attention)

    def prepare(self, host: Batch, dynamic: bool | None = None) -> Batch:
        """A collated batch as the model takes it: its metadata as the attention backend's kernels take
        it (``varlen.attention.prepare``), this rank's context slice, on the device (without waiting for
        the copy), its sizes marked dynamic when compiled on varying shapes."""
        b = host if self.attention is None else host.for_kernels(lambda i: prepare(i, self.attention, self.device.type))
        b = shard_batch(b, self.shard) if self.shard is not None else b
        b = move_batch(b, self.device, non_blocking=True)
        return b.mark_dynamic() if (self.dynamic if dynamic is None else dynamic) else b

    def step(self, micro: Sequence[Batch], optimizer: torch.optim.Optimizer | None = None, *,
             module: nn.Module | None = None, **kwargs) -> StepStats:
        """One optimizer step over prepared micro-batches (:func:`~varlen.engine.train_step`'s keywords:
        ``group``, ``max_grad_norm``, ``before_update``); ``module``: another module than the wrapped
        one (a rank stepping alone)."""
        o = self.objective
        return train_step(self.wrapped if module is None else module, micro, optimizer, o.forward,
                          autocast=self.autocast, loss_sum=o.loss_sum, count=o.count, **kwargs)

    @torch.no_grad()
    def loss_and_count(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """A prepared batch's summed loss (float64) and its targets, without gradients (device scalars)."""
        with self.autocast or nullcontext():
            total = self.objective.loss_sum(self.objective.forward(self.wrapped, batch), batch.labels)
        return total.double(), self.objective.count(batch.labels)

    def eval_loss(self, batch: Batch) -> Tensor:
        """A prepared batch's mean loss over its targets, without gradients (a device scalar)."""
        total, n = self.loss_and_count(batch)
        return total / n.clamp_min(1)
