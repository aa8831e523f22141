"""FlashAttention-4 varlen as one pair of ``torch.library`` custom ops (forward, backward), so
``torch.compile`` sees one opaque node per call.

Called directly, ``flash_attn.cute.flash_attn_varlen_func`` is traced into by dynamo, which breaks
the graph on FA4's DLPack wrappers: the compiled study model got slower with FA4 than with torch's
FA2 (docs/gpu-notes.md). Here the forward and the backward are ops with fake (shape-only)
implementations and a registered autograd formula; the CuTe kernels run only on real tensors.

The pair takes q, k, v apart or as one projection's ``[T, 3, H, D]`` output (k and v None): then the
backward hands FA4 the views of one gradient buffer to write into, the projection's gradient as it
is. Logit soft-capping and attention sinks (``learnable_sink``, its gradient from FA4's backward) ride
on either form.

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


def _views(q: Tensor, k: Tensor | None, v: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    # k and v None: q is one projection's output [T, 3, H, D], read in place as three strided views
    return q.unbind(1) if k is None else (q, k, v)


@torch.library.custom_op("varlen::fa4_varlen_fwd", mutates_args=())
def fa4_varlen_fwd(
    q: Tensor,  # [T, H, D], or [T, 3, H, D] (q, k, v packed) with k and v None
    k: Tensor | None,  # [T, Hkv, D]
    v: Tensor | None,  # [T, Hkv, Dv]
    cu_seqlens: Tensor,  # [B + 1] int32
    max_seqlen: int,
    scale: float,
    causal: bool,
    left: int,
    right: int,
    softcap: float = 0.0,
    sinks: Tensor | None = None,  # [H]
) -> tuple[Tensor, Tensor]:  # out [T, H, Dv], lse [H, T] float32
    return _kernels()[0](*_views(q, k, v), cu_seqlens, max_seqlen, scale, causal, left, right, softcap, sinks)


@fa4_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, causal, left, right, softcap=0.0, sinks=None):
    q, k, v = _views(q, k, v)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("varlen::fa4_varlen_bwd", mutates_args=())
def fa4_varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor | None,
    v: Tensor | None,
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # dq, dk, dv, dsinks; packed: dqkv [T, 3, H, D] and two [0]
    """Packed, FA4 writes dq, dk, dv into the views of one ``[T, 3, H, D]`` buffer: the gradient of the
    projection's output as it is, no cat of three gradients. An op returns tensors, so what a call
    has none of (dk and dv packed, dsinks without sinks) comes back as ``[0]``."""
    bwd = _kernels()[1]
    if k is None:
        dqkv = torch.empty_like(q)
        *_, dsinks = bwd(dout, *q.unbind(1), out, lse, cu_seqlens, max_seqlen, scale, causal, left, right, softcap,
                         sinks, *dqkv.unbind(1))
        grads = dqkv, q.new_empty(0), q.new_empty(0)
    else:
        *grads, dsinks = bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, left, right, softcap,
                             sinks)
    return *grads, q.new_empty(0) if dsinks is None else dsinks


@fa4_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, left, right, softcap=0.0, sinks=None):
    dsinks = q.new_empty(0) if sinks is None else torch.empty_like(sinks)
    if k is None:
        return torch.empty_like(q), q.new_empty(0), q.new_empty(0), dsinks
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
    if k is None:  # packed: q's gradient is the whole [T, 3, H, D]
        dk = dv = None
    return dq, dk, dv, None, None, None, None, None, None, None, None if sinks is None else dsinks


fa4_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


def bucket(max_seqlen: int) -> int:
    """``max_seqlen`` rounded up to a power of two (at least 128): FA4 picks its kernel
    configuration from it and JIT-compiles each new one for seconds, so eager batches whose
    longest sample changes every step would compile every step. An upper bound is valid: the kernels read each sequence's length from
    ``cu_seqlens``."""
    return pow2_bucket(max_seqlen, 128)


def _sinks(sinks: Tensor | None) -> Tensor | None:
    # FA4 reads a contiguous [H] in a dtype of its own list
    if sinks is None or sinks.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return None if sinks is None else sinks.contiguous()
    return sinks.float()


def attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, scale: float, causal: bool,
              left: int, right: int, softcap: float = 0.0, sinks: Tensor | None = None) -> Tensor:  # [T, H, D]
    return fa4_varlen_fwd(q, k, v, cu_seqlens, bucket(max_seqlen), float(scale), bool(causal), int(left),
                          int(right), float(softcap), _sinks(sinks))[0]


def attention_qkvpacked(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, scale: float, causal: bool, left: int,
                        right: int, softcap: float = 0.0, sinks: Tensor | None = None) -> Tensor:
    # qkv [T, 3, H, D] -> [T, H, D]
    return fa4_varlen_fwd(qkv, None, None, cu_seqlens, bucket(max_seqlen), float(scale), bool(causal), int(left),
                          int(right), float(softcap), _sinks(sinks))[0]
