"""FlashAttention-4 varlen as two ``torch.library`` custom ops, so ``torch.compile`` sees one
opaque node per call.

Called directly, ``flash_attn.cute.flash_attn_varlen_func`` is traced into by dynamo, which breaks
the graph on FA4's DLPack wrappers: the compiled study model got slower with FA4 than with torch's
FA2 (docs/gpu-notes.md). Here the forward and the backward are ops with fake (shape-only)
implementations and a registered autograd formula; the CuTe kernels run only on real tensors.

Logit soft-capping and attention sinks (``learnable_sink``, its gradient from FA4's backward) ride on
the plain pair; the qkv-packed pair has neither (``flash.py`` sends such calls to the plain pair).

The kernels are FA4's own low-level entry points (``_flash_attn_fwd`` / ``_flash_attn_bwd`` of
flash-attn-4 4.0.0b3x), imported on first use: ``import flash_attn.cute`` takes seconds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..buckets import pow2_bucket


def _window(left: int, right: int) -> tuple[int | None, int | None]:
    # varlen's -1 = unbounded is FA4's None
    return (None if left < 0 else left), (None if right < 0 else right)


def _kernels():
    """``(fwd, bwd)``: FA4's kernels behind the ops; tests swap in a torch implementation."""
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    def fwd(q, k, v, cu_seqlens, max_seqlen, scale, causal, left, right, softcap=0.0, sinks=None):
        wl, wr = _window(left, right)
        out, lse, *_ = _flash_attn_fwd(
            q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen, softmax_scale=scale, causal=causal, window_size_left=wl,
            window_size_right=wr, softcap=softcap, learnable_sink=sinks, return_lse=True,
        )
        return out, lse

    def bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, left, right, softcap=0.0, sinks=None,
            dq=None, dk=None, dv=None):
        # dq, dk, dv given: FA4 writes the gradients into them (views of one [T, 3, H, D] buffer);
        # with sinks FA4 returns their gradient too (lse then counts the sink's term)
        wl, wr = _window(left, right)
        grads = _flash_attn_bwd(
            q, k, v, out, dout, lse, scale, causal, softcap, window_size_left=wl, window_size_right=wr,
            cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen, dq=dq, dk=dk, dv=dv, learnable_sink=sinks,
        )
        return (*grads[:3], grads[3] if sinks is not None else None)

    return fwd, bwd


@torch.library.custom_op("varlen::fa4_varlen_fwd", mutates_args=())
def fa4_varlen_fwd(
    q: Tensor,  # [T, H, D]
    k: Tensor,  # [T, Hkv, D]
    v: Tensor,  # [T, Hkv, D]
    cu_seqlens: Tensor,  # [B + 1] int32
    max_seqlen: int,
    scale: float,
    causal: bool,
    left: int,
    right: int,
    softcap: float = 0.0,
    sinks: Tensor | None = None,  # [H]
) -> tuple[Tensor, Tensor]:  # out [T, H, D], lse [H, T] float32
    return _kernels()[0](q, k, v, cu_seqlens, max_seqlen, scale, causal, left, right, softcap, sinks)


@fa4_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, causal, left, right, softcap=0.0, sinks=None):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("varlen::fa4_varlen_bwd", mutates_args=())
def fa4_varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    left: int,
    right: int,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # dq, dk, dv, dsinks ([0] without sinks: an op returns tensors)
    dq, dk, dv, dsinks = _kernels()[1](dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, left, right,
                                       softcap, sinks)
    return dq, dk, dv, q.new_empty(0) if dsinks is None else dsinks


@fa4_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, left, right, softcap=0.0, sinks=None):
    dsinks = q.new_empty(0) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, *args, sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, sinks)
    ctx.args = args  # max_seqlen, scale, causal, left, right, softcap
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = fa4_varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens, *ctx.args, sinks)
    return dq, dk, dv, None, None, None, None, None, None, None, None if sinks is None else dsinks


fa4_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


# qkv-packed: one projection's output [T, 3, H, D] in, its gradient [T, 3, H, D] out. FA4 reads q, k, v
# as strided views and its backward writes dq, dk, dv into views of one buffer, so the backward has
# no cat of three gradients into the projection's [T, 3C].
@torch.library.custom_op("varlen::fa4_varlen_qkv_fwd", mutates_args=())
def fa4_varlen_qkv_fwd(
    qkv: Tensor,  # [T, 3, H, D]
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    left: int,
    right: int,
) -> tuple[Tensor, Tensor]:  # out [T, H, D], lse [H, T] float32
    q, k, v = qkv.unbind(1)
    return _kernels()[0](q, k, v, cu_seqlens, max_seqlen, scale, causal, left, right)


@fa4_varlen_qkv_fwd.register_fake
def _(qkv, cu_seqlens, max_seqlen, scale, causal, left, right):
    return qkv.new_empty(qkv.shape[0], *qkv.shape[2:]), qkv.new_empty(qkv.shape[2], qkv.shape[0], dtype=torch.float32)


@torch.library.custom_op("varlen::fa4_varlen_qkv_bwd", mutates_args=())
def fa4_varlen_qkv_bwd(
    dout: Tensor,
    qkv: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    left: int,
    right: int,
) -> Tensor:  # dqkv [T, 3, H, D]
    dqkv = torch.empty_like(qkv)
    _kernels()[1](dout, *qkv.unbind(1), out, lse, cu_seqlens, max_seqlen, scale, causal, left, right, 0.0, None,
                  *dqkv.unbind(1))
    return dqkv


@fa4_varlen_qkv_bwd.register_fake
def _(dout, qkv, out, lse, cu_seqlens, max_seqlen, scale, causal, left, right):
    return torch.empty_like(qkv)


def _setup_qkv_context(ctx, inputs, output):
    qkv, cu_seqlens, *args = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cu_seqlens)
    ctx.args = args  # max_seqlen, scale, causal, left, right
    ctx.mark_non_differentiable(lse)


def _qkv_backward(ctx, dout, dlse):
    qkv, out, lse, cu_seqlens = ctx.saved_tensors
    return fa4_varlen_qkv_bwd(dout.contiguous(), qkv, out, lse, cu_seqlens, *ctx.args), *[None] * 6


fa4_varlen_qkv_fwd.register_autograd(_qkv_backward, setup_context=_setup_qkv_context)


def bucket(max_seqlen: int) -> int:
    """``max_seqlen`` rounded up to a power of two (at least 128): FA4 picks its kernel
    configuration from it and JIT-compiles each new one for seconds, so eager batches whose
    longest sample changes every step would compile every step. An upper bound is valid: the kernels read each sequence's length from
    ``cu_seqlens``."""
    return pow2_bucket(max_seqlen, 128)


def attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, scale: float, causal: bool,
              left: int, right: int, softcap: float = 0.0, sinks: Tensor | None = None) -> Tensor:  # [T, H, D]
    if sinks is not None:  # FA4 reads a contiguous [H] in a dtype of its own list
        sinks = sinks.contiguous() if sinks.dtype in (torch.float16, torch.bfloat16, torch.float32) else sinks.float()
    return fa4_varlen_fwd(q, k, v, cu_seqlens, bucket(max_seqlen), float(scale), bool(causal), int(left),
                          int(right), float(softcap), sinks)[0]


def attention_qkvpacked(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, scale: float, causal: bool, left: int,
                        right: int) -> Tensor:  # qkv [T, 3, H, D] -> [T, H, D]
    return fa4_varlen_qkv_fwd(qkv, cu_seqlens, bucket(max_seqlen), float(scale), bool(causal), int(left),
                              int(right))[0]
