"""``PackedBatch``: one packed row and its metadata, typed; what ``varlen train`` and the model
families pass around. HF models receive it through :meth:`PackedBatch.hf_kwargs`, the one place
where it becomes HF's keyword arguments."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..seqinfo import SeqInfo


@dataclass(frozen=True)
class PackedBatch:
    input_ids: Tensor  # [T] int64, the samples back to back (and filler sequences, if any)
    labels: Tensor  # [T] int64, each token's target; IGNORE_INDEX where there is none
    info: SeqInfo  # the sequences' boundaries (cu_seqlens, max_seqlen, position_ids)
    num_tokens: int | None = None  # the samples' tokens, filler excluded (None: all T)
    # context parallelism: this rank holds a slice of the row (varlen.parallel.ContextShard), the
    # info above stays the whole row's; None: the whole row is here
    context: object = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        return replace(self, input_ids=self.input_ids.to(device, non_blocking=non_blocking),
                       labels=self.labels.to(device, non_blocking=non_blocking),
                       info=self.info.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        """Called by ``DataLoader(pin_memory=True)``: the copy to the GPU can then be non-blocking."""
        return replace(self, input_ids=self.input_ids.pin_memory(), labels=self.labels.pin_memory(),
                       info=self.info.pin_memory())

    def mark_dynamic(self) -> None:
        """Tell ``torch.compile`` that the token and sequence counts change from batch to batch."""
        mark = torch._dynamo.maybe_mark_dynamic
        for t in (self.input_ids, self.labels, self.info.position_ids, self.info.document_ids, self.info.cu_seqlens):
            mark(t, 0)

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[0] if self.num_tokens is None else self.num_tokens

    def hf_kwargs(self) -> dict:
        """What an HF causal LM with ``attn_implementation="varlen"`` takes: ``[1, T]`` rows, the
        restarting ``position_ids`` and the metadata as ``varlen_info``."""
        if self.context is None:
            return {"input_ids": self.input_ids[None], "position_ids": self.info.position_ids[None],
                    "varlen_info": self.info}
        mine = self.context.slice(self.info.total_tokens)  # this rank's slice of the row
        return {"input_ids": self.input_ids[None], "position_ids": self.info.position_ids[mine][None],
                "varlen_info": self.info, "varlen_context": self.context}
