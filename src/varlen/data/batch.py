"""The typed batches every collator returns, one class a layout: :class:`PaddedBatch` (rows of
one sample each and a padding mask), :class:`PackedBatch` (samples back to back with their
:class:`~varlen.SeqInfo`, as one row ``[T]`` or rows of ``row_len``, HF's ``[B, L]`` format) and
:class:`NestedBatch` (jagged nested tensors).

A batch says how a model takes it: :meth:`~Batch.model_kwargs` for varlen's decoder,
:meth:`~Batch.hf_kwargs` for a transformers causal LM (the one place where a batch becomes HF's
keyword arguments). It knows its real tokens (``tokens``: filler and padding excluded, host
ints, no device read) and the tokens the model computes on (``computed_tokens``). Nothing outside
the HF boundary inspects dict keys or branches on a batch's class.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from ..seqinfo import SeqInfo


class Batch:
    """What the typed batches share: moving, pinning and the interface models and loops read."""

    input_ids: Tensor
    labels: Tensor
    info: SeqInfo | None

    def _map(self, fn) -> "Batch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (Tensor, SeqInfo)):
                moved[f.name] = fn(value)
        return replace(self, **moved)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)``: the copy to the GPU can then be non-blocking."""
        return self._map(lambda x: x.pin_memory())

    def for_kernels(self, prepare) -> "Batch":
        """This batch with ``prepare(info)`` for its packed metadata (``varlen.attention.prepare``: the
        shapes an attention backend's kernels take); padded and nested batches have none."""
        return self

    def mark_dynamic(self) -> "Batch":
        """This batch, its changing sizes marked for ``torch.compile`` (no recompile to learn they
        change). Padded rows stay static: their lengths come from a few buckets, and static
        kernels are faster than dynamic ones."""
        return self

    @property
    def varlen_info(self) -> SeqInfo | None:
        """The metadata varlen's packed kernels run on, or None (padded and nested batches)."""
        return None

    @property
    def tokens(self) -> int:
        """The samples' tokens: what a step trains on, filler and padding excluded."""
        raise NotImplementedError

    @property
    def computed_tokens(self) -> int:
        """The tokens the model computes on: padded rows, or a packed row with its filler."""
        raise NotImplementedError

    def model_kwargs(self) -> dict:
        """varlen's decoder's keyword arguments (``Decoder(**kwargs, causal=...)``)."""
        raise NotImplementedError

    def hf_kwargs(self, labels: bool = False, varlen_info: bool = True, flash_kwargs: bool = False) -> dict:
        """A transformers causal LM's keyword arguments; ``labels=True`` adds the labels (for the
        model's own loss, which shifts them: collate with ``Labels.UNSHIFTED``). ``varlen_info``
        (packed batches): hand the metadata to ``attn_implementation="varlen"``. ``flash_kwargs``
        (packed batches): also the boundaries as transformers names them for its FlashAttention path
        and for linear-attention / state-space layers (``cu_seq_lens_q/k``, ``max_length_q/k``,
        ``seq_idx``), as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True,
        return_seq_idx=True)`` gives them."""
        raise NotImplementedError


@dataclass(frozen=True)
class PaddedBatch(Batch):
    input_ids: Tensor  # [B, L] int64, each row one sample then pad_id
    labels: Tensor  # [B, L] int64, IGNORE_INDEX on padding
    attention_mask: Tensor  # [B, L] bool, True on the samples' tokens
    num_tokens: int  # the samples' tokens (host int)
    info = None

    @property
    def tokens(self) -> int:
        return self.num_tokens

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel()

    def model_kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def hf_kwargs(self, labels: bool = False, varlen_info: bool = True, flash_kwargs: bool = False) -> dict:
        if flash_kwargs:
            raise ValueError("flash_kwargs: padded rows have no sequence boundaries to give; collate with PackCollator")
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return {**out, "labels": self.labels} if labels else out


@dataclass(frozen=True)
class PackedBatch(Batch):
    input_ids: Tensor  # [T] int64, the samples back to back (and filler sequences, if any)
    labels: Tensor  # [T] int64, each token's target; IGNORE_INDEX where there is none
    info: SeqInfo  # the sequences' boundaries (cu_seqlens, max_seqlen, position_ids), filler marked
    # context parallelism: this rank holds a slice of the row (varlen.parallel.ContextShard), the
    # info above stays the whole row's; None: the whole row is here
    context: object = None
    row_len: int | None = None  # HF's [T / row_len, row_len] rows (PackRowsCollator); None: one row [1, T]
    dynamic: bool = False  # token and sequence counts marked as changing for torch.compile

    def for_kernels(self, prepare) -> "PackedBatch":
        return replace(self, info=prepare(self.info))

    def mark_dynamic(self) -> "PackedBatch":
        mark = torch._dynamo.maybe_mark_dynamic
        for t in (self.input_ids, self.labels, self.info.position_ids, self.info.document_ids, self.info.cu_seqlens):
            mark(t, 0)
        return replace(self, dynamic=True)

    @property
    def varlen_info(self) -> SeqInfo:
        return self.info

    @property
    def tokens(self) -> int:
        if self.context is None:
            return self.info.real_tokens
        return self.info.real_tokens_in(self.context.slice(self.info.total_tokens))

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.shape[0]

    def model_kwargs(self) -> dict:
        out = {"input_ids": self.input_ids, "info": self.info}
        return out if self.context is None else {**out, "context": self.context}

    def hf_kwargs(self, labels: bool = False, varlen_info: bool = True, flash_kwargs: bool = False) -> dict:
        """``[1, T]`` rows (or ``[T / row_len, row_len]``), the restarting ``position_ids`` and the
        metadata as ``varlen_info`` (``varlen_info=False``: HF's own padding-free path, which
        finds the boundaries in ``position_ids``); ``flash_kwargs``: see :meth:`Batch.hf_kwargs`."""
        positions = self.info.position_ids
        if self.context is not None:
            positions = positions[self.context.slice(self.info.total_tokens)]  # this rank's slice of the row
        out = {"input_ids": self._rows(self.input_ids), "position_ids": self._rows(positions)}
        if labels:
            out["labels"] = self._rows(self.labels)
        if varlen_info:
            out["varlen_info"] = self.info
        if self.context is not None:
            out["varlen_context"] = self.context
        if flash_kwargs:
            out.update(self.flash_kwargs())
        return out

    def flash_kwargs(self) -> dict:
        """The boundaries as transformers names them: ``cu_seq_lens_q/k`` [S + 1] int32,
        ``max_length_q/k`` (host ints) and ``seq_idx`` (each token's sequence, int32, shaped as the rows)."""
        if self.context is not None:  # they would describe the whole row beside a slice of its tokens
            raise ValueError("flash_kwargs: this batch holds one rank's slice of the row (context parallelism); "
                             "its layers get the row's boundaries through varlen_info")
        cu = self.info.cu_seqlens.to(torch.int32)
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": self.info.max_seqlen,
                "max_length_k": self.info.max_seqlen, "seq_idx": self._rows(self.info.document_ids.to(torch.int32))}

    def _rows(self, x: Tensor) -> Tensor:  # [T] -> [1, T] or [T / row_len, row_len]
        rows = x[None] if self.row_len is None else x.view(-1, self.row_len)
        if self.dynamic:  # a new view each call: tell the compiler which size changes
            torch._dynamo.maybe_mark_dynamic(rows, 1 if self.row_len is None else 0)
        return rows


@dataclass(frozen=True)
class NestedBatch(Batch):
    input_ids: Tensor  # [B, j] jagged nested int64
    labels: Tensor  # [B, j] jagged nested int64
    position_ids: Tensor  # [B, j] jagged nested int64, restarting at 0 in each sample
    info: SeqInfo  # the samples' lengths (its offsets are the nested tensors')

    @property
    def tokens(self) -> int:
        return self.info.total_tokens

    @property
    def computed_tokens(self) -> int:
        return self.info.total_tokens

    def model_kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids}

    def hf_kwargs(self, labels: bool = False, varlen_info: bool = True, flash_kwargs: bool = False) -> dict:
        raise ValueError("transformers models take no nested tensors: collate with PackCollator or "
                         "PadCollator for them")
