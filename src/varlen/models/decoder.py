"""The study's reference decoder (docs/study.md), in one file, on any batch layout and any backend.

    x = tok_emb(ids) + pos_emb(position_ids)
    24 x { x = x + proj(attn(qkv(LN(x))));  x = x + fc2(GELU(fc1(LN(x)))) }
    logits = head(LN(x))

The same blocks run three layouts:
- padded ``[B, L]`` with ``attention_mask``: SDPA on ``[B, H, L, D]`` with one combined mask;
- packed ``[T]`` with a :class:`~varlen.SeqInfo`: :func:`varlen.attention_qkvpacked` with any backend
  (the qkv projection's output read in place);
- jagged nested ``[B, j]``: SDPA on nested q/k/v. q, k, v are split before the head reshape,
  which is what lets the block run on nested tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from ..attention import attention_qkvpacked, nested_sdpa, padded_attention, padded_mask
from ..loss import lm_loss  # noqa: F401  (varlen.models.lm_loss, as before)
from ..parallel.context import ContextShard, ulysses_attention
from ..seqinfo import SeqInfo
from .mlp import ACTIVATIONS, MLP_KERNELS, check_batch



@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 1024
    max_len: int = 1024  # learned absolute positions
    dim: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    mlp_ratio: int = 4
    pad_id: int = 0
    # the residual stream between blocks: None keeps what autocast leaves it (float32 on CUDA: every
    # add, norm input and saved residual at 4 bytes); "bfloat16" halves those bytes. Weights stay
    # float32 (the optimizer's master copy); it needs autocast, which runs the GEMMs in bf16 anyway.
    residual_dtype: str | None = None
    # the MLP's GELU: "gelu" (exact, erf) or "gelu_tanh" (its tanh approximation, GPT2's "gelu_new")
    activation: str = "gelu"
    # the MLP's kernels (varlen.models.mlp): "torch" (Linear, GELU, Linear) or "quack" (GELU and its
    # derivative in the GEMMs' epilogues; gelu_tanh only, Hopper or newer)
    mlp_kernel: str = "torch"

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.residual_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"residual_dtype {self.residual_dtype!r}: None, 'bfloat16' or 'float16'")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}: choose from {', '.join(ACTIVATIONS)}")
        if self.mlp_kernel not in MLP_KERNELS:
            raise ValueError(f"mlp_kernel {self.mlp_kernel!r}: choose from {', '.join(MLP_KERNELS)}")
        if self.mlp_kernel == "quack" and self.activation != "gelu_tanh":
            raise ValueError(f"mlp_kernel='quack' fuses GELU's tanh approximation only; activation={self.activation!r} "
                             "would change the model: set activation='gelu_tanh' (and compare against the torch "
                             "kernels with it)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DecoderConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS = {
    "study": DecoderConfig(),  # 24 x 1024, 16 heads of 64: the study's model
    "small": DecoderConfig(max_len=512, dim=256, n_layers=4, n_heads=4),
    "tiny": DecoderConfig(max_len=256, dim=64, n_layers=2, n_heads=4),  # CPU tests
    # the GPU smoke: two layers (compile time) of heads of 64 (every GPU kernel takes them)
    "smoke": DecoderConfig(max_len=256, dim=256, n_layers=2, n_heads=4),
}


class _Ctx(NamedTuple):
    """What every layer needs about the batch; built once per forward."""

    layout: str  # "packed" | "padded" | "nested" | "context" (a slice of a packed row)
    causal: bool
    backend: str
    info: SeqInfo | None  # the whole row's, also for a slice
    mask: Tensor | None  # [B, 1, L, L] for padded
    context: ContextShard | None = None


class SelfAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor, ctx: _Ctx) -> Tensor:
        if ctx.layout == "packed":  # x: [T, C]; the projection's output read in place, gradient in one buffer
            qkv = self.qkv(x).unflatten(-1, (3, self.n_heads, self.head_dim))  # [T, 3, H, D]
            y = attention_qkvpacked(qkv, ctx.info, causal=ctx.causal, backend=ctx.backend)
            return self.proj(y.flatten(-2))
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # split first: works on nested tensors too
        match ctx.layout:
            case "context":  # x: [T/N, C], this rank's slice of the row
                q, k, v = (t.unflatten(-1, (self.n_heads, self.head_dim)) for t in (q, k, v))
                y = ulysses_attention(q, k, v, ctx.info, ctx.context, causal=ctx.causal, backend=ctx.backend)
            case "padded":  # x: [B, L, C]
                q, k, v = (t.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
                y = padded_attention(q, k, v, ctx.mask).transpose(1, 2)  # [B, L, H, D]
            case "nested":  # x: [B, j, C] jagged; SDPA wants each [B, j, H, D] contiguous
                q, k, v = (t.contiguous().unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
                y = nested_sdpa(q, k, v, causal=ctx.causal).transpose(1, 2)
        return self.proj(y.flatten(-2))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim, bias=False)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim, bias=False)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)
        self.mlp, self.approximate = MLP_KERNELS[cfg.mlp_kernel], ACTIVATIONS[cfg.activation]  # chosen once

    def forward(self, x: Tensor, ctx: _Ctx) -> Tensor:
        x = x + self.attn(self.ln1(x), ctx)
        return x + self.mlp(self.ln2(x), self.fc1, self.fc2, self.approximate)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig | str = "tiny", *, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg = DecoderConfig.from_name(cfg) if isinstance(cfg, str) else cfg
        self.backend = backend
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_id)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim, bias=False)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)

    def _residual(self, x: Tensor) -> Tensor:
        """The embeddings in the residual stream's dtype (``DecoderConfig.residual_dtype``)."""
        if self.cfg.residual_dtype is None:
            return x
        _check_residual(x, self.cfg.residual_dtype)
        return x.to(getattr(torch, self.cfg.residual_dtype))

    def forward(
        self,
        input_ids: Tensor,
        *,
        info: SeqInfo | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        causal: bool | None = None,
        backend: str | None = None,
        context: ContextShard | None = None,
    ) -> Tensor:
        """Logits in the layout of ``input_ids``.

        Packed ``[T]`` (or rows ``[B, L]``, flattened; logits ``[B * L, V]``) needs ``info``; padded ``[B, L]`` needs ``attention_mask``;
        nested ``[B, j]`` takes ``position_ids`` (nested) or restarts positions itself. With
        ``context`` (context parallelism), ``input_ids`` ``[T/N]`` are this rank's slice of the row
        ``info`` describes.
        ``causal`` defaults to ``self.training``: the study trains causal and evaluates non-causal.
        """
        causal = self.training if causal is None else causal
        backend = backend or self.backend
        check_batch(self.cfg.mlp_kernel, input_ids)
        if input_ids.is_nested:
            if position_ids is None:
                raise ValueError("nested input_ids need nested position_ids (NestedCollator makes them)")
            ctx = _Ctx("nested", causal, backend, None, None)
        elif context is not None:
            if info is None or input_ids.dim() != 1 or input_ids.shape[0] * context.size != info.total_tokens:
                raise ValueError(f"a context slice needs info of its whole row and input_ids [T/{context.size}], got "
                                 f"{tuple(input_ids.shape)} of {info.total_tokens if info is not None else '?'}")
            position_ids = info.position_ids[context.slice(info.total_tokens)]
            ctx = _Ctx("context", causal, backend, info, None, context)
        elif info is not None:
            input_ids = packed_ids(input_ids, info)
            position_ids = info.position_ids
            ctx = _Ctx("packed", causal, backend, info, None)
        elif attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            ctx = _Ctx("padded", causal, backend, None, padded_mask(attention_mask.bool(), causal))
        else:
            raise ValueError("pass info= for a packed batch, attention_mask= for a padded one, or nested input_ids")
        x = self._residual(self.tok_emb(input_ids) + self.pos_emb(position_ids))
        for block in self.blocks:
            x = block(x, ctx)
        return self.head(self.ln_f(x))


def packed_ids(input_ids: Tensor, info: SeqInfo) -> Tensor:
    """Packed token ids as ``[T]`` (one row ``[1, T]`` or packed rows ``[B, L]`` flattened), checked
    against ``info``'s token count."""
    if input_ids.dim() == 2:
        input_ids = input_ids.flatten()
    if input_ids.dim() != 1 or input_ids.shape[0] != info.total_tokens:
        raise ValueError(f"packed input_ids must be [T] with T={info.total_tokens} (from info), got {tuple(input_ids.shape)}")
    return input_ids


def _check_residual(x: Tensor, residual_dtype: str) -> None:
    if not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"residual_dtype={residual_dtype!r} needs autocast (torch.autocast('{x.device.type}', "
                         f"dtype=torch.{residual_dtype})): without it the float32 weights meet {residual_dtype} "
                         "activations")


def forward_batch(model: Decoder, batch, **kw) -> Tensor:
    """Run a collator's typed batch through the model: ``model(**batch.model_kwargs(), **kw)``."""
    return model(**batch.model_kwargs(), **kw)
