"""FlashAttention varlen on ``cu_seqlens``: the fastest kernels for packed rows.

Three implementations of the same call; ``auto`` prefers them in this order on batches of at
least :data:`FA4_MIN_TOKENS` tokens, and FA2 first below that:

- ``fa4``: FlashAttention-4's CuTe kernels (Hopper/Blackwell), as custom ops (``fa4.py``).
- ``fa2``: the ``flash_attn`` package's ``flash_attn_varlen_func`` (FlashAttention-2/3 builds).
- ``torch``: PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (FA2 inside torch >= 2.10).

``backend="flash:fa4"`` (or ``fa2``, ``torch``) or ``VARLEN_FLASH_IMPL=fa4|fa2|torch`` forces one;
a forced one that cannot run raises, never falls back. torch 2.10 spelled causality
``is_causal``; 2.11+ takes ``window_size=(-1, 0)``: the signature is probed, not the version.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path

import torch
from torch import Tensor

from ..seqinfo import SeqInfo
from .common import HALF, Capabilities, probe, repeat_kv, window_bounds

IMPLS = ("fa4", "fa2", "torch")

CAPS = Capabilities(
    name="flash",
    devices=frozenset({"cuda"}),
    dtypes=HALF,
    head_dims="a multiple of 8, at most 256 (fa4 on Blackwell: up to 128, or 256)",
    head_dim_ok=lambda d: d % 8 == 0 and d <= 256,
    window=True,
    softcap=True,  # fa2 and fa4: torch's says so in its reasons
    sinks=True,  # fa4 only
    notes="FlashAttention varlen: " + " > ".join(IMPLS),
)


try:  # torch's own module: importing it costs nothing extra
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = frozenset(inspect.signature(_varlen_attn).parameters)
except ImportError:
    _varlen_attn, _VARLEN_PARAMS = None, frozenset()


def _has_fa4() -> bool:
    spec = importlib.util.find_spec("flash_attn")  # finds, does not import
    return bool(spec and spec.submodule_search_locations) and any(
        (Path(p) / "cute" / "interface.py").exists() for p in spec.submodule_search_locations
    )


@probe
def impl_unavailable(impl: str) -> str | None:
    """Why ``impl`` cannot run on this machine, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, _ = torch.cuda.get_device_capability()
    match impl:
        case "torch":
            if _varlen_attn is None:
                return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.10)"
            return None if major >= 8 else f"needs compute capability >= 8.0, have {major}.x"
        case "fa2":
            if importlib.util.find_spec("flash_attn_2_cuda") is None:
                return "flash-attn (2.x) not installed (pip install flash-attn; source build)"
            return None if major >= 8 else f"needs compute capability >= 8.0, have {major}.x"
        case "fa4":
            if not _has_fa4():
                return "flash-attn-4 (flash_attn.cute) not installed"
            return None if major >= 9 else f"needs Hopper or newer (compute capability >= 9.0), have {major}.x"
    raise ValueError(f"unknown flash implementation {impl!r}; choose from {IMPLS}")


def impl_reasons(impl: str, q: Tensor, k: Tensor, causal: bool, window_size, softcap: float = 0.0,
                 sinks: bool = False) -> list[str]:
    why = impl_unavailable(impl)
    if why:
        return [why]
    out = []
    if softcap and impl == "torch":
        out.append("no logit soft-capping (fa2 and fa4 have it)")
    if sinks and impl != "fa4":
        out.append("no attention sinks (fa4 has them)")
    if impl == "fa4" and not fa4_head_dim_ok(q.shape[-1]):
        out.append(f"head size {q.shape[-1]} unsupported (Hopper: a multiple of 8 up to 256; Blackwell: up to 128, "
                   "or 256)")
    if impl == "torch":
        if tuple(window_size) != (-1, -1) and "window_size" not in _VARLEN_PARAMS:
            out.append(f"torch {torch.__version__} varlen_attn has no window_size")
    return out


def fa4_head_dim_ok(d: int) -> bool:
    """FlashAttention-4's head sizes (flash-attn-4 4.0.0b36, forward and backward): Hopper takes any
    multiple of 8 up to 256; Blackwell up to 128, or 256."""
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 9
    return d % 8 == 0 and (d <= 256 if major == 9 else d <= 128 or d == 256)


def forced_impl(impl: str | None = None) -> str | None:
    """The implementation asked for: ``backend="flash:<impl>"``, else ``VARLEN_FLASH_IMPL``."""
    impl = impl or os.environ.get("VARLEN_FLASH_IMPL") or None
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"unknown flash implementation {impl!r} (backend 'flash:<impl>' or "
                         f"VARLEN_FLASH_IMPL); choose from {IMPLS}")
    return impl


def unavailable(impl: str | None = None) -> str | None:
    impl = forced_impl(impl)
    whys = {i: impl_unavailable(i) for i in ((impl,) if impl else IMPLS)}
    if not all(whys.values()):
        return None
    if len(set(whys.values())) == 1:
        return next(iter(whys.values()))
    return "; ".join(f"{i}: {w}" for i, w in whys.items())


# Below this many tokens a batch runs FA2 first. FA4's kernels are faster, but each call costs
# more host time (its Python launch path): a step of few tokens is bound by the host, and there
# FA2 wins. Where the threshold comes from: docs/gpu-notes.md, "FlashAttention-4".
FA4_MIN_TOKENS = 12288


def preferred(tokens: int) -> tuple[str, ...]:
    """The implementations in the order ``auto`` tries them for a batch of ``tokens`` tokens."""
    return IMPLS if tokens >= FA4_MIN_TOKENS else ("fa2", "torch", "fa4")


def choose_impl(q: Tensor, k: Tensor, causal: bool, window_size, impl: str | None = None, softcap: float = 0.0,
                sinks: bool = False) -> tuple[str | None, list[str]]:
    """The implementation to use, or None with every implementation's reasons."""
    impl = forced_impl(impl)
    whys = []
    for i in (impl,) if impl else preferred(q.shape[0]):
        r = impl_reasons(i, q, k, causal, window_size, softcap, sinks)
        if not r:
            return i, []
        whys += [f"{i}: {w}" for w in r]
    return None, whys


def reasons(q, k, v, info, causal, window_size, impl: str | None = None, softcap: float = 0.0,
            sinks: bool = False) -> list[str]:
    return choose_impl(q, k, causal, window_size, impl, softcap, sinks)[1]


def resolve_impl(q: Tensor, k: Tensor, causal: bool, window_size, impl: str | None = None, softcap: float = 0.0,
                 sinks: bool = False) -> str:
    """The implementation that runs these inputs (``varlen.attention`` asks once per batch and
    passes it to :func:`attention`); raises with every implementation's reasons."""
    impl, whys = choose_impl(q, k, causal, window_size, impl, softcap, sinks)
    if impl is None:
        raise ValueError("flash cannot run: " + "; ".join(whys))
    return impl


def attention(q: Tensor, k: Tensor, v: Tensor, info: SeqInfo, *, causal, scale, window_size,
              impl: str | None = None, softcap: float = 0.0, sinks: Tensor | None = None) -> Tensor:
    """``impl``: the implementation :func:`resolve_impl` chose (None: choose it here)."""
    impl = impl or resolve_impl(q, k, causal, window_size, None, softcap, sinks is not None)
    left, right = window_bounds(causal, window_size)
    cu, m = info.cu_seqlens, info.max_seqlen
    match impl:
        case "torch":
            kw = {"scale": scale}
            if "window_size" in _VARLEN_PARAMS:
                kw["window_size"] = (left, right)
            else:  # torch 2.10
                kw["is_causal"] = causal
            if k.shape[1] != q.shape[1]:
                if "enable_gqa" in _VARLEN_PARAMS:
                    kw["enable_gqa"] = True
                else:
                    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
            return _varlen_attn(q, k, v, cu, cu, m, m, **kw)
        case "fa2":
            from flash_attn import flash_attn_varlen_func

            extra = {"softcap": softcap} if softcap else {}
            return flash_attn_varlen_func(
                q, k, v, cu, cu, m, m, softmax_scale=scale, causal=causal, window_size=(left, right), **extra
            )
        case "fa4":
            from . import fa4  # custom ops: one opaque node for torch.compile

            return fa4.attention(q, k, v, cu, m, scale=scale, causal=causal, left=left, right=right, softcap=softcap,
                                 sinks=sinks)


def attention_qkvpacked(qkv: Tensor, info: SeqInfo, *, causal, scale, window_size, impl: str | None = None,
                        softcap: float = 0.0) -> Tensor:  # qkv [T, 3, H, D] -> [T, H, D]
    """FA4 takes ``qkv`` whole (its gradient comes back as one buffer); the others take the views."""
    q, k, v = qkv.unbind(1)
    impl = impl or resolve_impl(q, k, causal, window_size, None, softcap)
    if impl != "fa4":
        return attention(q, k, v, info, causal=causal, scale=scale, window_size=window_size, impl=impl, softcap=softcap)
    from . import fa4

    left, right = window_bounds(causal, window_size)
    return fa4.attention_qkvpacked(qkv, info.cu_seqlens, info.max_seqlen, scale=scale, causal=causal, left=left,
                                   right=right, softcap=softcap)
