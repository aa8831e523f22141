"""xFormers ``memory_efficient_attention`` with a ``BlockDiagonalMask`` over the packed row.

xFormers picks its own operator for the inputs (:func:`operator` names it, and the bench's
``kernel`` column shows it): its FlashAttention-2 operator, which may run the FlashAttention that
torch ships, or its CUTLASS kernels. Every operator is refused by xFormers
while its C++ library fails to load (a wheel built for another CUDA runtime, e.g. the PyPI wheel
needs ``libcudart.so.12`` beside a CUDA 13 torch): that is said as the reason, with the loader's
error, rather than discovered at the first call.

Under ``torch.compile`` the call runs behind a graph break: the mask holds the batch's offsets
as a Python list, which a traced graph would specialise on (a recompile for every batch).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from ..seqinfo import SeqInfo
from .common import HALF, Capabilities, probe, repeat_kv

CAPS = Capabilities(
    name="xformers",
    devices=frozenset({"cuda"}),
    dtypes=HALF | {torch.float32},
    head_dims="at most 256",
    head_dim_ok=lambda d: d <= 256,
    notes="BlockDiagonalMask (make_causal() to train); behind a graph break when compiled",
)


@probe
def unavailable() -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers not installed (pip install varlen[xformers] on a CUDA machine)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        _cpp_lib, fmha = _import_xformers()
    except Exception as e:  # a broken build should be a reason, not a crash
        return f"xformers fails to import: {e}"
    if not _cpp_lib._built_with_cuda:
        err = _cpp_lib._cpp_library_load_exception
        cause = err.__cause__ or err
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        return f"xFormers' C++ library did not load, so it refuses every CUDA operator ({first})"
    ops = [getattr(getattr(fmha, m, None), "FwOp", None) for m in ("flash", "cutlass", "flash3")]
    if not any(op is not None and _op_works(op) for op in ops):
        return "installed xFormers build has no CUDA operator"
    return None


def _import_xformers():
    """Import xFormers' attention, hiding a FlashAttention-4-only ``flash_attn`` package.

    xFormers 0.0.35 takes any importable ``flash_attn`` for FlashAttention-2 and imports
    ``flash_attn.flash_attn_interface``, which flash-attn-4 (``flash_attn.cute`` only) lacks: the
    import fails. Hidden, xFormers uses the FlashAttention that torch ships instead.
    """
    import sys

    if "xformers.ops.fmha" not in sys.modules and _fa4_only():
        saved = sys.modules.get("flash_attn")
        sys.modules["flash_attn"] = None  # find_spec answers None for a None entry
        try:
            import xformers.ops.fmha  # noqa: F401
        finally:
            if saved is None:
                del sys.modules["flash_attn"]
            else:
                sys.modules["flash_attn"] = saved
    from xformers import _cpp_lib
    from xformers.ops import fmha

    return _cpp_lib, fmha


def _fa4_only() -> bool:
    """Is the installed ``flash_attn`` FlashAttention-4 alone (no FlashAttention-2 interface)?"""
    spec = importlib.util.find_spec("flash_attn")
    if spec is None or not spec.submodule_search_locations:
        return False
    from pathlib import Path

    return not any((Path(p) / "flash_attn_interface.py").exists() for p in spec.submodule_search_locations)


def _op_works(op) -> bool:
    try:
        return bool(op.is_available())
    except Exception:
        return False


def reasons(q, k, v, info, causal, window_size) -> list[str]:
    return []


def _bias(info: SeqInfo, causal: bool):
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    def build():
        mask = BlockDiagonalMask.from_seqlens(list(info.lengths), device=info.device)
        return mask.make_causal() if causal else mask

    return info.cached(("xformers_bias", causal), build)


def _layout(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Packed ``[T, H, D]`` -> xFormers' ``[1, T, H, D]``; k/v with fewer heads (GQA) repeated to H.

    xFormers' own GQA layout (``[1, T, G, H/G, D]`` with k/v expanded) gave wrong results on a
    GPU (docs/gpu-notes.md); repeating k/v costs memory, never correctness.
    """
    heads = q.shape[1]
    return q[None], repeat_kv(k, heads)[None], repeat_kv(v, heads)[None]


def operator(q: Tensor, k: Tensor, v: Tensor, info: SeqInfo, causal: bool) -> str:
    """The name of the operator xFormers dispatches these inputs to (forward, and backward if
    they need gradients)."""
    from xformers.ops import fmha

    q5, k5, v5 = _layout(q, k, v)
    inp = fmha.Inputs(query=q5, key=k5, value=v5, attn_bias=_bias(info, causal))
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    fw = fmha._dispatch_fw(inp, grad)
    if not grad:
        return fw.NAME
    return f"{fw.NAME} + {fmha._dispatch_bw(inp, varlen_lse_packed=fw.VARLEN_LSE_PACKED).NAME}"


def attention(q: Tensor, k: Tensor, v: Tensor, info: SeqInfo, *, causal, scale, window_size) -> Tensor:
    if torch.compiler.is_compiling():
        return _behind_break(q, k, v, info, causal, scale)
    return _eager(q, k, v, info, causal, scale)


def _eager(q: Tensor, k: Tensor, v: Tensor, info: SeqInfo, causal: bool, scale: float) -> Tensor:
    from xformers.ops import memory_efficient_attention

    out = memory_efficient_attention(*_layout(q, k, v), attn_bias=_bias(info, causal), scale=scale)
    return out[0]  # [T, H, D]


_behind_break = torch.compiler.disable(_eager)
