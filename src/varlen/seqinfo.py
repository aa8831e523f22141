"""SeqInfo: the metadata of one packed batch, built once on the host and handed to every layer.

A packed batch is one row of ``T`` tokens holding ``B`` sequences back to back::

    tokens      a a a b c c c c
    cu_seqlens  0     3 4       8      # int32, device: what the kernels read
    lengths     (3, 1, 4)              # Python ints: what the host reads, never synced back
    position_ids 0 1 2 0 0 1 2 3       # restart at 0 in each sequence
    document_ids 0 0 0 1 2 2 2 2

Everything a kernel needs is derived here, once per batch, so no layer rebuilds masks or reads a
value back from the GPU. This module imports nothing else of varlen.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import Tensor


def _as_int_list(values: Sequence[int] | Tensor, what: str) -> list[int]:
    if isinstance(values, Tensor):
        if values.dim() != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(values.shape)}")
        if values.dtype.is_floating_point or values.dtype == torch.bool:
            raise ValueError(f"{what} must hold integers, got {values.dtype}")
        return [int(v) for v in values.tolist()]
    out = []
    for v in values:
        if isinstance(v, bool) or int(v) != v:
            raise ValueError(f"{what} must hold integers, got {v!r}")
        out.append(int(v))
    return out


@dataclass(frozen=True, eq=False)
class SeqInfo:
    """Sequence boundaries of a packed batch. Build with a ``from_*`` constructor."""

    cu_seqlens: Tensor  # [B + 1] int32, cumulative lengths starting at 0
    lengths: tuple[int, ...]  # host copy of the B lengths
    max_seqlen: int  # >= max(lengths); a bucketed upper bound is fine
    position_ids: Tensor  # [T] int64, restarting at 0 in each sequence
    document_ids: Tensor  # [T] int32, which sequence each token belongs to
    # indices of the filler sequences (a collator's padding, as sequences of their own with ignored
    # labels): what the host counts as real tokens leaves them out; the kernels treat them alike
    filler: tuple[int, ...] = ()
    # Per-batch derived objects (dense masks, Flex BlockMasks, gather indices), built on first
    # use by the first layer and reused by the others.
    # An init field (not init=False) so that dataclasses.replace works on a SeqInfo, as FSDP2's
    # input casting does; every copy made here starts with an empty cache.
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_lengths(
        cls,
        lengths: Sequence[int] | Tensor,
        *,
        device: torch.device | str | None = None,
        max_seqlen: int | None = None,
        filler: Sequence[int] = (),
    ) -> "SeqInfo":
        """``filler``: the indices of the sequences that are filler, not samples."""
        lens = _as_int_list(lengths, "lengths")
        if not lens:
            raise ValueError("empty batch: lengths has no sequence")
        bad = [(i, n) for i, n in enumerate(lens) if n <= 0]
        if bad:
            i, n = bad[0]
            raise ValueError(f"every length must be >= 1; lengths[{i}] = {n}")
        longest = max(lens)
        if max_seqlen is None:
            max_seqlen = longest
        elif int(max_seqlen) < longest:
            raise ValueError(f"max_seqlen={max_seqlen} is below the longest sequence ({longest})")
        lens_t = torch.tensor(lens, dtype=torch.int64)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens_t, 0)
        doc = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32), lens_t)
        pos = torch.arange(int(cu[-1]), dtype=torch.int64) - cu[:-1].long().repeat_interleave(lens_t)
        filler = tuple(sorted(set(_as_int_list(filler, "filler"))))
        if filler and not (0 <= filler[0] and filler[-1] < len(lens)):
            raise ValueError(f"filler indices must name sequences 0..{len(lens) - 1}, got {filler}")
        info = cls(cu, tuple(lens), int(max_seqlen), pos, doc, filler)
        return info.to(device) if device is not None else info

    @classmethod
    def from_cu_seqlens(
        cls, cu_seqlens: Sequence[int] | Tensor, *, max_seqlen: int | None = None
    ) -> "SeqInfo":
        if isinstance(cu_seqlens, Tensor) and cu_seqlens.dtype != torch.int32:
            raise ValueError(f"cu_seqlens must be int32 (what the kernels take), got {cu_seqlens.dtype}")
        cu = _as_int_list(cu_seqlens, "cu_seqlens")
        if len(cu) < 2:
            raise ValueError("empty batch: cu_seqlens needs at least 2 entries")
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
        steps = [b - a for a, b in zip(cu, cu[1:])]
        bad = [i for i, s in enumerate(steps) if s <= 0]
        if bad:
            i = bad[0]
            raise ValueError(
                f"cu_seqlens must be strictly increasing; cu_seqlens[{i}]={cu[i]} >= cu_seqlens[{i + 1}]={cu[i + 1]}"
            )
        device = cu_seqlens.device if isinstance(cu_seqlens, Tensor) else None
        return cls.from_lengths(steps, device=device, max_seqlen=max_seqlen)

    @classmethod
    def from_position_ids(cls, position_ids: Tensor, *, max_seqlen: int | None = None) -> "SeqInfo":
        """From HF-style packed ``position_ids`` ([T] or [1, T]) that restart at 0 per sequence."""
        if position_ids.dim() == 2 and position_ids.shape[0] == 1:
            position_ids = position_ids[0]
        if position_ids.dim() != 1:
            raise ValueError(f"position_ids must be [T] or [1, T], got {tuple(position_ids.shape)}")
        if position_ids.numel() == 0:
            raise ValueError("empty batch: position_ids has no token")
        pos = position_ids.detach().to("cpu", torch.int64)
        if int(pos[0]) != 0:
            raise ValueError(f"packed position_ids must start at 0, got {int(pos[0])}")
        starts = (pos == 0).nonzero().flatten()
        steps = pos[1:] - pos[:-1]
        broken = ((steps != 1) & (pos[1:] != 0)).nonzero().flatten()
        if broken.numel():
            i = int(broken[0]) + 1
            raise ValueError(
                f"packed position_ids must restart at 0 and step by 1 within a sequence; "
                f"position_ids[{i - 1}:{i + 1}] = {pos[i - 1:i + 1].tolist()}"
            )
        bounds = starts.tolist() + [pos.numel()]
        lens = [b - a for a, b in zip(bounds, bounds[1:])]
        return cls.from_lengths(lens, device=position_ids.device, max_seqlen=max_seqlen)

    @classmethod
    def from_padding_mask(cls, mask: Tensor, *, max_seqlen: int | None = None) -> "SeqInfo":
        """From a right-padded ``[B, L]`` mask (True / 1 = real token)."""
        if mask.dim() != 2:
            raise ValueError(f"padding mask must be [B, L], got {tuple(mask.shape)}")
        m = mask.detach().to("cpu").bool()
        lens = m.sum(1)
        prefix = torch.arange(m.shape[1])[None, :] < lens[:, None]
        if not torch.equal(prefix, m):
            row = int((prefix != m).any(1).nonzero()[0])
            raise ValueError(f"padding mask row {row} is not right-padded (real tokens first, then padding)")
        return cls.from_lengths(lens, device=mask.device, max_seqlen=max_seqlen)

    # ---------------------------------------------------------------- properties
    @property
    def num_seqs(self) -> int:
        # from the tensor's shape, not len(lengths): under torch.compile the shape is a symbol,
        # while the tuple's length would be a guard, i.e. a recompile for every sequence count
        return self.cu_seqlens.shape[0] - 1

    @property
    def total_tokens(self) -> int:
        return self.position_ids.shape[0]

    @property
    def real_lengths(self) -> tuple[int, ...]:
        """The samples' lengths, filler sequences left out (host ints)."""
        if not self.filler:
            return self.lengths
        skip = set(self.filler)
        return tuple(n for i, n in enumerate(self.lengths) if i not in skip)

    @property
    def real_tokens(self) -> int:
        """The samples' tokens, filler left out (host arithmetic, no device read)."""
        return sum(self.real_lengths)

    def real_tokens_in(self, span: slice) -> int:
        """The samples' tokens inside ``span`` of the row (a context-parallel rank's slice)."""
        out, start, skip = 0, 0, set(self.filler)
        for i, n in enumerate(self.lengths):
            if i not in skip:
                out += max(0, min(start + n, span.stop) - max(start, span.start))
            start += n
        return out

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    # ---------------------------------------------------------------- moving
    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SeqInfo":
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return replace(
            self,
            cu_seqlens=move(self.cu_seqlens),
            position_ids=move(self.position_ids),
            document_ids=move(self.document_ids),
            _cache={},
        )

    def pin_memory(self) -> "SeqInfo":
        """Called by ``DataLoader(pin_memory=True)`` so the copy to the GPU can be non-blocking."""
        return replace(
            self,
            cu_seqlens=self.cu_seqlens.pin_memory(),
            position_ids=self.position_ids.pin_memory(),
            document_ids=self.document_ids.pin_memory(),
            _cache={},
        )

    def cached(self, key: Any, build, *, when_compiling: bool = False):
        """``build()`` once per batch; later layers get the same object.

        Inside ``torch.compile`` the cache is skipped (unless ``when_compiling``): dynamo would
        guard on the dict's contents, and a model compiled block by block (FSDP2, DDP) would see
        an empty cache in its first block and a full one in the others, i.e. two graphs and a
        recompile whenever that changes. The rebuilt objects are small (a block-level mask, an
        index) and the compiler fuses them into the graph.
        """
        if not when_compiling and torch.compiler.is_compiling():
            return build()
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = build()
        return hit

    # ---------------------------------------------------------------- padded <-> packed
    def _flat_index(self, length: int) -> Tensor:
        # token t sits at row document_ids[t], column position_ids[t] of a [B, L] grid
        def build() -> Tensor:
            return self.document_ids.long() * length + self.position_ids

        return self.cached(("flat_index", length), build)

    def _check_length(self, length: int) -> None:
        # max_seqlen first: under torch.compile, reading the host lengths would make the compiled
        # graph guard on (and recompile for) every batch's lengths
        if length < self.max_seqlen and length < max(self.lengths):
            raise ValueError(f"padded length {length} is below the longest sequence ({max(self.lengths)})")

    def pack(self, x: Tensor) -> Tensor:
        """Right-padded ``[B, L, *]`` -> packed ``[T, *]``."""
        if x.shape[0] != self.num_seqs:
            raise ValueError(f"padded tensor has {x.shape[0]} rows, SeqInfo has {self.num_seqs} sequences")
        self._check_length(x.shape[1])
        return x.flatten(0, 1)[self._flat_index(x.shape[1])]

    def unpack(self, x: Tensor, length: int | None = None, value: float = 0) -> Tensor:
        """Packed ``[T, *]`` -> right-padded ``[B, L, *]`` (``L`` defaults to ``max_seqlen``)."""
        if x.shape[0] != self.total_tokens:
            raise ValueError(f"packed tensor has {x.shape[0]} tokens, SeqInfo has {self.total_tokens}")
        length = self.max_seqlen if length is None else length
        self._check_length(length)
        out = x.new_full((self.num_seqs * length, *x.shape[1:]), value)
        out = out.index_copy(0, self._flat_index(length), x)  # differentiable w.r.t. x
        return out.view(self.num_seqs, length, *x.shape[1:])

    def padding_mask(self, length: int | None = None) -> Tensor:
        """``[B, L]`` bool, True on real tokens."""
        length = self.max_seqlen if length is None else length

        def build() -> Tensor:
            seqlens = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
            return torch.arange(length, device=self.device)[None, :] < seqlens[:, None]

        return self.cached(("padding_mask", length), build)

    def nested(self, x: Tensor) -> Tensor:
        """Packed ``[T, *]`` -> jagged nested ``[B, j, *]`` on ``x``'s storage.

        Every nested tensor of a batch is built on one cached offsets tensor, so they share their
        ragged dimension (SDPA requires it of q, k and v). The sequence-length bounds come from the
        host, so nothing is read back from the device: ``max_seqlen`` (an upper bound, constant when
        the collator fixes it) and a minimum of 1. SDPA reads the minimum only to refuse empty
        sequences; the true minimum would make a compiled graph guard on it (dynamo assumes sizes
        >= 2) and recompile at the first batch holding a sequence of length 1.
        """
        # one offsets tensor for q, k and v even when compiling: SDPA needs their ragged dims equal
        offsets = self.cached("nested_offsets", lambda: self.cu_seqlens.long(), when_compiling=True)
        return torch.nested.nested_tensor_from_jagged(
            x.contiguous(), offsets=offsets, min_seqlen=1, max_seqlen=self.max_seqlen
        )

    def split(self, x: Tensor) -> tuple[Tensor, ...]:
        """Packed ``[T, *]`` -> one tensor per sequence (host lengths: no sync)."""
        return x.split(list(self.lengths))

    def __repr__(self) -> str:
        lens = self.lengths if len(self.lengths) <= 8 else (*self.lengths[:8], "...")
        return (
            f"SeqInfo(num_seqs={self.num_seqs}, total_tokens={self.total_tokens}, "
            f"max_seqlen={self.max_seqlen}, lengths={lens}, device={self.device})"
        )
