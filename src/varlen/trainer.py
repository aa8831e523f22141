"""varlen's batching inside HF's ``Trainer`` and TRL's ``SFTTrainer``.

``token_budget_trainer(Trainer)`` (or ``(SFTTrainer)``) returns a subclass that takes
``max_tokens=`` and trains on what ``varlen train`` trains on: each step's samples chosen by
varlen's token-budget sampler (best-fit packing in shuffled windows, each global micro-batch split
over the ranks by a FLOPs cost model, resumable through the Trainer's own batch skipping), each
rank's share packed into one ``[1, T]`` row through ``attn_implementation="varlen"``.

A sample of n tokens is n - 1 inputs and their n - 1 next tokens (``Labels.SHIFTED``, handed to
the model as ``shift_labels``, which HF's causal-LM loss takes as they are), as in ``varlen
train``: no row carries a token that predicts nothing. The loss is normalised over every target
of the step on every rank (the Trainer's ``num_items_in_batch`` counts ``shift_labels``, summed
over the ranks with ``average_tokens_across_devices``), so the gradients equal one process over
all samples -- and equal ``varlen train``'s on the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from .data import CostModel, TokenBudgetSampler
from .loss import IGNORE_INDEX
from .seqinfo import SeqInfo

MASK_KEYS = ("assistant_masks", "completion_mask")  # TRL's: 1 where a token is trained


@dataclass(frozen=True)
class ShiftedRowCollator:
    """Samples (dicts with ``input_ids``; optional ``labels`` in HF's unshifted convention, or one
    of TRL's trained-token masks) -> one packed row: ``input_ids`` ``[1, T]`` without each sample's
    last token, ``labels``/``shift_labels`` its next tokens, ``position_ids``, ``varlen_info``.
    An empty share (fewer samples than ranks) is one ignored token."""

    pad_id: int = 0
    max_seqlen: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        ids, targets = [], []
        for i, f in enumerate(features):
            x = torch.as_tensor(f["input_ids"]).long().flatten()
            if x.numel() < 2:
                raise ValueError(f"sample {i} has {x.numel()} token(s): no input/target pair")
            y = torch.as_tensor(f["labels"]).long().flatten() if f.get("labels") is not None else x.clone()
            mask = next((f[k] for k in MASK_KEYS if f.get(k) is not None), None)
            if mask is not None:
                y = y.masked_fill(~torch.as_tensor(mask).bool().flatten(), IGNORE_INDEX)
            if y.shape != x.shape:
                raise ValueError(f"sample {i}: labels ({y.numel()}) and input_ids ({x.numel()}) differ in length")
            ids.append(x[:-1])
            targets.append(y[1:])
        if not ids:
            ids, targets = [torch.tensor([self.pad_id])], [torch.tensor([IGNORE_INDEX])]
        info = SeqInfo.from_lengths([len(x) for x in ids], max_seqlen=self.max_seqlen)
        shifted = torch.cat(targets)[None]
        return {"input_ids": torch.cat(ids)[None], "labels": shifted, "shift_labels": shifted,
                "position_ids": info.position_ids[None], "varlen_info": info}


class _EpochLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` reaches its batch sampler (the Trainer calls it)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def cost_model(config) -> CostModel:
    """The FLOPs cost model ``varlen train`` uses for a model of this config."""
    from .models.families import decoder_sizes

    s = decoder_sizes(config)
    return CostModel.from_flops(s.dim, s.n_layers, s.vocab_size)


def input_lengths(dataset) -> list[int]:
    """Each sample's inputs (its tokens less the last), read from the ``input_ids`` column."""
    column = dataset["input_ids"] if hasattr(dataset, "column_names") else [r["input_ids"] for r in dataset]
    return [len(ids) - 1 for ids in column]


def token_budget_trainer(base):
    """A subclass of ``base`` (``transformers.Trainer``, ``trl.SFTTrainer``, ...) whose training batches
    are varlen's: ``max_tokens`` tokens an optimizer step over all ranks and accumulation steps."""

    class TokenBudgetTrainer(base):
        def __init__(self, *args, max_tokens: int, max_seqlen: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            micro = max_tokens // self.args.gradient_accumulation_steps
            if micro < 1:
                raise ValueError(f"max_tokens={max_tokens} over {self.args.gradient_accumulation_steps} "
                                 "accumulation steps leaves no token a micro-step")
            self.varlen_micro_tokens, self.varlen_max_seqlen = micro, max_seqlen

        def get_train_dataloader(self) -> DataLoader:
            args = self.args
            sampler = TokenBudgetSampler(input_lengths(self.train_dataset), self.varlen_micro_tokens, seed=args.seed,
                                         world_size=args.world_size, rank=args.process_index,
                                         cost=cost_model(self.model.config))
            # not accelerator.prepare-d: the sampler is rank-aware already, and its shares are the batches
            return _EpochLoader(self.train_dataset, batch_sampler=sampler, num_workers=args.dataloader_num_workers,
                                collate_fn=ShiftedRowCollator(max_seqlen=self.varlen_max_seqlen),
                                pin_memory=args.dataloader_pin_memory)

    TokenBudgetTrainer.__name__ = TokenBudgetTrainer.__qualname__ = f"TokenBudget{base.__name__}"
    return TokenBudgetTrainer
