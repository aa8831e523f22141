"""FlexAttention with a document mask: the PyTorch-native way to attend within sequences.

The ``BlockMask`` is built once per batch (cached on the SeqInfo) from ``cu_seqlens`` at block
granularity, and reused by every layer; on the GPU ``flex_attention`` runs through one
module-level ``torch.compile`` (eager Flex is a dense reference implementation) at whole 128-token
blocks. Mask functions are small named closures, as in attention-gym.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from ..buckets import ceil_div, round_up
from ..seqinfo import SeqInfo
from .common import Capabilities, window_bounds

CAPS = Capabilities(
    name="flex",
    head_dims="any (on CUDA zero-padded up to a power of two >= 16 for the Triton kernel)",
    window=True,
    softcap=True,
    sinks=True,  # from the log-sum-exp, which Flex returns with its gradient
    notes="document BlockMask built once per batch; compiled on CUDA; forward-only on CPU",
)


def unavailable() -> str | None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - torch >= 2.5 has it
        return f"torch.nn.attention.flex_attention missing ({e})"
    return None


def reasons(q, k, v, info, causal, window_size, softcap=0.0, sinks=False) -> list[str]:
    out = []
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if q.device.type == "cpu" and grad:
        out.append("no backward on CPU (torch's FlexAttention is forward-only there)")
    return out


def kernel_head_dim(d: int, device_type: str) -> int:
    """The head size Flex runs a head of ``d`` at: on CUDA its Triton kernel takes powers of two from
    16, so other sizes (MLA's 192 and 96, 80) are zero-padded up to one: zeros add nothing to a
    score or an output, and the scale stays that of ``d``."""
    if device_type != "cuda":
        return d
    return max(16, 1 << (d - 1).bit_length())


def generate_doc_mask_mod(document_ids: Tensor, left: int, right: int):
    """Query and key in the same sequence, and inside the (left, right) window.

    ``document_ids`` covers the real tokens; Flex may ask about indices past them (the filler that
    rounds the row up to whole blocks): filler attends only to filler. The closure holds the
    SeqInfo's own tensor, never one computed in the traced graph: a mask over an in-graph tensor
    failed to lower on the H100 (``'function' object has no attribute 'graph'``).
    """
    n = document_ids.shape[0]

    def doc_mask(b, h, q_idx, kv_idx):
        q_real, kv_real = q_idx < n, kv_idx < n
        same = document_ids[q_idx.clamp(max=n - 1)] == document_ids[kv_idx.clamp(max=n - 1)]
        ok = (same & q_real & kv_real) | (~q_real & ~kv_real)
        # inside one sequence the index difference is the position difference
        if right >= 0:
            ok = ok & (kv_idx <= q_idx + right)
        if left >= 0:
            ok = ok & (kv_idx >= q_idx - left)
        return ok

    return doc_mask


BLOCK = 128  # Flex's default Q and KV block size


def padded_tokens(info: SeqInfo) -> int:
    """The token count Flex runs at on CUDA: ``T`` rounded up to a whole block.

    Compiled Flex with a symbolic token count below one block (GQA, ``T = 120``) made Inductor
    fail with ``NoValidChoicesError`` on the H100; whole blocks also keep the BlockMask free of a
    partial last block. Filler tokens form a document of their own and are sliced off.
    """
    t = info.total_tokens
    return round_up(t, BLOCK) if info.device.type == "cuda" else t


def block_mask(info: SeqInfo, causal: bool, window_size: tuple[int, int]):
    left, right = window_bounds(causal, window_size)
    t = padded_tokens(info)

    def build():
        return doc_block_mask(info, t, left, right, generate_doc_mask_mod(info.document_ids, left, right))

    return info.cached(("flex_block_mask", left, right, t), build)


def doc_block_mask(info: SeqInfo, t: int, left: int, right: int, mask_mod):
    """The BlockMask of a packed batch from ``cu_seqlens`` alone, at block granularity.

    ``create_block_mask`` evaluates ``mask_mod`` on all T x T pairs (or compiles a kernel for each
    new T). A document mask needs far less: the q block holding tokens [a, b] sees the kv tokens
    from the start of a's document to the end of b's (cut by causality and the window), so its kv
    blocks are one contiguous range; a kv block is full when both blocks lie in one document and,
    if masked, wholly inside the causal / window band. O((T / 128)^2) work on small integer tensors.
    """
    from torch.nn.attention.flex_attention import BlockMask

    dev = info.device
    nb = ceil_div(t, BLOCK)
    starts = torch.arange(nb, device=dev) * BLOCK  # first token of each block
    ends = (starts + BLOCK - 1).clamp_max(t - 1)  # last token
    # document of every token, filler (past the real tokens) as one more document
    cu = torch.cat([info.cu_seqlens.long(), torch.tensor([t], device=dev, dtype=torch.long)])
    doc = torch.searchsorted(cu, torch.arange(t, device=dev), right=True) - 1
    d_first, d_last = doc[starts], doc[ends]  # [nb]
    lo = cu[d_first]  # kv range of q block i: [lo, hi] (token indices)
    hi = cu[d_last + 1] - 1
    if right >= 0:
        hi = torch.minimum(hi, ends + right)
    if left >= 0:
        lo = torch.maximum(lo, starts - left)
    kv_start, kv_end = starts[None, :], ends[None, :]  # [1, nb]
    any_pair = (kv_end >= lo[:, None]) & (kv_start <= hi[:, None])  # [nb q, nb kv]
    single = d_first == d_last  # [nb]: the block lies in one document
    one_doc = single[:, None] & single[None, :] & (d_first[:, None] == d_first[None, :])
    whole = ends - starts == BLOCK - 1  # a last block cut short by T is never called full
    full = any_pair & one_doc & whole[:, None] & whole[None, :]
    if right >= 0:  # every kv <= q + right: the block's last kv against its first q
        full &= kv_end <= starts[:, None] + right
    if left >= 0:  # every kv >= q - left
        full &= kv_start >= ends[:, None] - left
    partial = any_pair & ~full

    def as_indices(m):  # [nb, nb] bool -> counts [1, 1, nb], indices [1, 1, nb, nb] (used ones first)
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return m.sum(-1, dtype=torch.int32)[None, None], order[None, None]

    kv_num, kv_idx = as_indices(partial)
    full_num, full_idx = as_indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(t, t))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def soft_cap_mod(softcap: Tensor):
    """A score_mod capping the (scaled) scores: softcap * tanh(score / softcap). ``softcap`` is a
    0-d tensor, not a float: compiled with ``dynamic=True``, a float closed over becomes a symbol
    that Inductor's Flex lowering reads back (``LoweringException: unbacked_bindings``)."""

    def soft_cap(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return soft_cap


def _lse_request() -> dict:
    # torch >= 2.9 asks with return_aux (return_lse is deprecated there); older torch with return_lse
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return {"return_lse": True}
    return {"return_aux": AuxRequest(lse=True)}


def with_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:  # out [1, H, T, D], lse [1, H, T]
    """Attention sinks from the output without them: a sink logit s beside the keys' scores takes
    the share ``1 - sigmoid(lse - s)`` of every row's weight away from the keys, so the output
    scales by ``sigmoid(lse - s)``; gradients reach q, k (through lse) and the sinks."""
    return out * torch.sigmoid(lse - sinks.float()[None, :, None])[..., None].to(out.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, info: SeqInfo, *, causal, scale, window_size,
              softcap: float = 0.0, sinks: Tensor | None = None) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    mask = block_mask(info, causal, window_size)
    t, pad = q.shape[0], padded_tokens(info) - info.total_tokens
    dq, dv = q.shape[-1], v.shape[-1]
    pad_q, pad_v = kernel_head_dim(dq, q.device.type) - dq, kernel_head_dim(dv, v.device.type) - dv
    if pad or pad_q or pad_v:
        q, k = (torch.nn.functional.pad(x, (0, pad_q, 0, 0, 0, pad)) for x in (q, k))
        v = torch.nn.functional.pad(v, (0, pad_v, 0, 0, 0, pad))
    qf, kf, vf = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T_pad, D_kernel]
    scale = dq ** -0.5 if scale is None else scale  # the padded size must not change it
    kw = {"block_mask": mask, "scale": scale, "enable_gqa": k.shape[1] != q.shape[1]}
    if softcap:
        cap = info.cached(("flex_softcap", float(softcap)),
                          lambda: torch.tensor(float(softcap), dtype=torch.float32, device=q.device))
        kw["score_mod"] = soft_cap_mod(cap)
    if sinks is not None:
        kw.update(_lse_request())
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        out = _compiled_flex()(qf, kf, vf, **kw)
    elif q.device.type == "cuda":  # inside the caller's torch.compile: it fuses Flex itself
        out = flex_attention(qf, kf, vf, **kw)
    else:
        with warnings.catch_warnings():  # eager Flex warns that it is unfused; on CPU that is the point
            warnings.simplefilter("ignore", UserWarning)
            out = flex_attention(qf, kf, vf, **kw)
    if sinks is not None:
        out, aux = out
        out = with_sinks(out, getattr(aux, "lse", aux), sinks)
    return out[0].transpose(0, 1)[:t, :, :dv]  # [T, H, Dv]
