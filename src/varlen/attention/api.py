"""``varlen.attention``: one entry point over every packed-sequence kernel.

Inputs are checked before any kernel runs; a named backend that cannot take them raises with its
reasons and never falls back; ``backend="auto"`` takes the first backend, in a per-device order of
speed, whose declared capabilities fit, and :func:`choose_backend` says why.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

from ..seqinfo import SeqInfo
from .common import probe

BACKENDS = ("flash", "xformers", "flex", "sdpa", "nested", "reference")
# fastest first, as the study measures them (docs/benchmarks.md): FlashAttention varlen, then
# xFormers, Flex, SDPA on padding
AUTO_ORDER = {
    "cuda": ("flash", "xformers", "flex", "sdpa", "nested", "reference"),
    "cpu": ("sdpa", "nested", "flex", "reference"),
}


class BackendUnavailable(ValueError):
    """A named backend cannot run these inputs; the message lists why."""


def backend_module(name: str) -> ModuleType:
    match name:
        case "flash":
            from . import flash as m
        case "xformers":
            from . import xformers as m
        case "flex":
            from . import flex as m
        case "sdpa":
            from . import sdpa as m
        case "nested":
            from . import nested as m
        case "reference":
            from . import reference as m
        case _:
            raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS} or 'auto'")
    return m


def check_inputs(q: Tensor, k: Tensor, v: Tensor, info: SeqInfo, window_size) -> None:
    """Raise ValueError naming the first problem. Reads only shapes and host metadata."""
    if not isinstance(info, SeqInfo):
        raise ValueError(f"info must be a varlen.SeqInfo, got {type(info).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a packed [T, H, D] tensor, got {shape}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
        if x.shape[0] != info.total_tokens:
            raise ValueError(f"{name} has {x.shape[0]} tokens but cu_seqlens ends at {info.total_tokens}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v differ in tokens or heads: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k head sizes differ: {q.shape[-1]} vs {k.shape[-1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if info.cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {info.cu_seqlens.device}, q on {q.device}: call info.to(device)")
    if info.cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {info.cu_seqlens.dtype}")
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError(f"window_size must be (left, right) with -1 for unbounded, got {window_size}")


def split_backend(backend: str) -> tuple[str, dict]:
    """``"flash:fa4"`` -> ``("flash", {"impl": "fa4"})``: flash takes an implementation after a colon."""
    name, sep, impl = backend.partition(":")
    if not sep:
        return name, {}
    if name != "flash" or not impl:
        raise ValueError(f"backend {backend!r}: only 'flash:<impl>' takes an implementation")
    from .flash import forced_impl

    return name, {"impl": forced_impl(impl)}


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` (a name or ``"flash:<impl>"``) cannot run on this machine at all, or None."""
    name, kw = split_backend(backend)
    return backend_module(name).unavailable(**kw)


def prepare(info: SeqInfo, backend: str = "auto", device_type: str = "cpu") -> SeqInfo:
    """``info`` as ``backend``'s kernels (for ``"auto"``: the first backend that can run on
    ``device_type``) take it: each backend owns its shape policy. Host arithmetic, once per batch,
    before the batch goes to the device (``Engine.prepare`` calls it); the kernels then read it as it
    is, also under ``torch.compile``, where they cannot look at the batch's lengths without a guard
    per batch. SDPA pads to ``max_seqlen`` and gets the batch's longest as one of a few buckets
    instead of the collator's bound; the others take the bound (an upper bound is valid for them,
    and a constant one is no recompile)."""
    if backend == "auto":
        runnable = [b for b in AUTO_ORDER.get(device_type, ()) if not backend_unavailable(b)]
        backend = runnable[0] if runnable else "reference"
    m = backend_module(split_backend(backend)[0])
    return m.prepare(info) if hasattr(m, "prepare") else info


def backend_reasons(name: str, q: Tensor, k: Tensor, v: Tensor, info, causal: bool, window_size,
                    softcap: float = 0.0, sinks: bool = False) -> list[str]:
    """Why backend ``name`` cannot run these inputs here; empty if it can."""
    name, kw = split_backend(name)
    m = backend_module(name)
    why = m.unavailable(**kw)
    if why:
        return [why]
    why = m.CAPS.reasons(q, k, causal, window_size, softcap, sinks)
    if softcap and m.CAPS.softcap:  # only backends that can cap take the argument
        kw["softcap"] = softcap
    if sinks and m.CAPS.sinks:  # likewise sinks
        kw["sinks"] = sinks
    return why + m.reasons(q, k, v, info, causal, window_size, **kw)


def choose_backend(q, k, v, info, *, causal=False, window_size=(-1, -1), softcap=0.0, sinks=False,
                   order=None) -> tuple[str, str]:
    """``(backend, why)`` that ``backend="auto"`` uses: the first backend of ``order`` (default
    :data:`AUTO_ORDER` for the device) that takes inputs of this kind.

    Decided once per kind of input (device, dtype, head counts and size, causal, window, grad),
    and a constant under ``torch.compile``: the choice is made outside the traced graph, so a
    model compiled with ``auto`` gets no extra graph when the choice is first made.
    """
    window_size = (int(window_size[0]), int(window_size[1]))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    order = tuple(order) if order is not None else AUTO_ORDER.get(q.device.type, ("reference",))
    return _decide(q.device.type, q.dtype, q.shape[1], k.shape[1], q.shape[-1], bool(causal), window_size,
                   float(softcap), bool(sinks), grad, order)


@probe
def _decide(device, dtype, heads, kv_heads, head_dim, causal, window_size, softcap, sinks, grad, order
            ) -> tuple[str, str]:
    # backends judge tensors: one token of the same kind stands for the batch
    with torch.set_grad_enabled(grad):
        q = torch.empty(1, heads, head_dim, device=device, dtype=dtype, requires_grad=grad)
        k = torch.empty(1, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=grad)
        info = SeqInfo.from_lengths([1], device=device)
        skipped = []
        for name in order:
            why = backend_reasons(name, q, k, k, info, causal, window_size, softcap, sinks)
            if not why:
                note = f"; skipped {'; '.join(skipped)}" if skipped else ""
                if name == "flash":
                    from .flash import FA4_MIN_TOKENS

                    note += (f"; flash tries fa4 > fa2 > torch on batches of >= {FA4_MIN_TOKENS} tokens, "
                             "fa2 > torch > fa4 below (FA4's host cost per call outweighs its faster kernel there)")
                return name, f"auto chose {name}: the fastest backend on {device} that takes these inputs{note}"
            skipped.append(f"{name} ({', '.join(why)})")
    raise BackendUnavailable("no attention backend can run these inputs: " + "; ".join(skipped))


def attention(
    q: Tensor,  # [T, H, D]
    k: Tensor,  # [T, Hkv, D]
    v: Tensor,  # [T, Hkv, Dv]
    info: SeqInfo,
    *,
    causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    backend: str = "auto",
    sinks: Tensor | None = None,  # [H]
) -> Tensor:  # [T, H, Dv]
    """Attention inside each sequence of a packed batch.

    ``backend``: ``"auto"``, one of :data:`BACKENDS`, or ``"flash:fa4"`` / ``"flash:fa2"`` /
    ``"flash:torch"`` for one FlashAttention implementation.

    ``window_size=(left, right)`` limits query i to keys ``i-left .. i+right`` (-1: unbounded);
    ``causal=True`` sets ``right=0``. k/v may have fewer heads than q (GQA), v another head size than
    q and k (MLA; scale defaults to q's size). ``softcap > 0`` caps
    the scaled scores at ``softcap * tanh(score / softcap)`` (Gemma 2); backends that cannot refuse.
    ``sinks`` [H]: a learned logit per head that joins every row's softmax and takes its share of the
    weight away from the keys (GPT-OSS's attention sinks); gradients reach it.
    """
    if isinstance(v, Tensor) and isinstance(q, Tensor) and v.shape[-1] != q.shape[-1]:
        check_inputs(q, k, v, info, window_size)  # q and k must still agree
        return _mixed_head_dims(q, k, v, info, causal=causal, scale=scale, window_size=window_size, softcap=softcap,
                                backend=backend, sinks=sinks)
    m, kw = _resolve(q, k, v, info, causal, scale, window_size, softcap, backend, sinks)
    return m.attention(q, k, v, info, causal=causal, **kw)


def _mixed_head_dims(q: Tensor, k: Tensor, v: Tensor, info: SeqInfo, *, scale, **kw) -> Tensor:  # [T, H, Dv]
    """v's head size unlike q's and k's (multi-head latent attention, DeepSeek: 192 and 128): all three
    zero-padded to the larger size, which changes no score (q.k gains zero terms) and no output
    column that is kept (v's padding is zero), then the output cut back to v's size. Exact on every
    backend, for the padded size's compute."""
    size = max(q.shape[-1], v.shape[-1])
    pad = lambda x: x if x.shape[-1] == size else torch.nn.functional.pad(x, (0, size - x.shape[-1]))  # noqa: E731
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return attention(pad(q), pad(k), pad(v), info, scale=scale, **kw)[..., : v.shape[-1]]


def attention_qkvpacked(
    qkv: Tensor,  # [T, 3, H, D]
    info: SeqInfo,
    *,
    causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    backend: str = "auto",
) -> Tensor:  # [T, H, D]
    """:func:`attention` on one projection's output ``qkv`` viewed as ``[T, 3, H, D]`` (q, k, v the
    three blocks of heads, as FlashAttention's ``*_qkvpacked_func``). Backends that read q, k, v in
    place and write their gradients into one ``[T, 3, H, D]`` buffer (``flash`` with FA4) spare the
    backward a cat of three gradients; the others run :func:`attention` on the three views."""
    if not isinstance(qkv, Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must be a packed [T, 3, H, D] tensor, got {shape}")
    q, k, v = qkv.unbind(1)
    m, kw = _resolve(q, k, v, info, causal, scale, window_size, softcap, backend)
    if hasattr(m, "attention_qkvpacked"):
        return m.attention_qkvpacked(qkv, info, causal=causal, **kw)
    return m.attention(q, k, v, info, causal=causal, **kw)


def _resolve(q, k, v, info, causal, scale, window_size, softcap, backend, sinks=None) -> tuple[ModuleType, dict]:
    """The checked inputs' backend module and its keyword arguments; raises before any kernel runs.

    Decided once per batch and kind of input: the first layer checks the inputs and chooses the
    backend (and flash's implementation), and every later layer with the same ``info``, shapes,
    dtypes, devices and flags reuses that decision from the batch's cache instead of deciding again.
    """
    if torch.compiler.is_compiling() or not isinstance(info, SeqInfo):  # traced once: nothing to reuse
        return _with_sinks(*_decide_call(q, k, v, info, causal, scale, window_size, softcap, backend, sinks), sinks)
    try:
        key = ("attention", backend, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device,
               v.device, bool(causal), tuple(window_size), softcap, scale, None if sinks is None else sinks.shape,
               torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        hash(key)
    except (AttributeError, TypeError):  # not tensors, or an unhashable argument: the checks name it
        key = None
    if key is None:
        m, kw = _decide_call(q, k, v, info, causal, scale, window_size, softcap, backend, sinks)
    else:
        m, kw = info.cached(key, lambda: _decide_call(q, k, v, info, causal, scale, window_size, softcap, backend,
                                                      sinks))
    return _with_sinks(m, kw, sinks)


def _with_sinks(m: ModuleType, kw: dict, sinks) -> tuple[ModuleType, dict]:
    # the tensor of this call (only backends that take sinks get here with them); the cached dict stays as it was
    return (m, kw) if sinks is None else (m, {**kw, "sinks": sinks})


def _decide_call(q, k, v, info, causal, scale, window_size, softcap, backend, sinks) -> tuple[ModuleType, dict]:
    check_inputs(q, k, v, info, window_size)
    window_size = (int(window_size[0]), int(window_size[1]))
    softcap = float(softcap or 0.0)
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0: no capping), got {softcap}")
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != q.shape[1]):
        raise ValueError(f"sinks must be [H] = [{q.shape[1]}], one logit per query head, got {tuple(sinks.shape)}")
    if backend == "auto":
        backend, _ = choose_backend(q, k, v, info, causal=causal, window_size=window_size, softcap=softcap,
                                    sinks=sinks is not None)
    else:
        why = backend_reasons(backend, q, k, v, info, causal, window_size, softcap, sinks is not None)
        if why:
            raise BackendUnavailable(f"backend {backend!r} cannot run these inputs: {'; '.join(why)}")
    name, kw = split_backend(backend)
    m = backend_module(name)
    if hasattr(m, "resolve_impl"):  # flash: its implementation for these inputs, chosen here once
        kw["impl"] = m.resolve_impl(q, k, causal, window_size, kw.get("impl"), softcap, sinks is not None)
    kw["scale"] = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kw["window_size"] = window_size
    if softcap:  # only backends that can cap get here with it
        kw["softcap"] = softcap
    return m, kw


def kernel_name(backend: str, q: Tensor, k: Tensor, v: Tensor, info: SeqInfo, *, causal: bool = False,
                window_size=(-1, -1)) -> str:
    """What runs for these inputs under ``backend``: the backend ``auto`` resolves to, the flash
    implementation, or the operator xFormers dispatches to."""
    window_size = (int(window_size[0]), int(window_size[1]))
    if backend == "auto":
        backend, _ = choose_backend(q, k, v, info, causal=causal, window_size=window_size)
    name, kw = split_backend(backend)
    if name == "flash":
        from .flash import choose_impl

        return f"flash:{choose_impl(q, k, causal, window_size, kw.get('impl'))[0]}"
    if name == "xformers":
        from .xformers import operator

        return f"xformers {operator(q, k, v, info, causal)}"
    return name


def backend_status() -> dict[str, dict]:
    """Each backend's declared capabilities and whether it can run on this machine."""
    out = {}
    for name in BACKENDS:
        m = backend_module(name)
        c = m.CAPS
        out[name] = {
            "available": m.unavailable() is None,
            "reason": m.unavailable(),
            "devices": sorted(c.devices),
            "dtypes": sorted(str(d).removeprefix("torch.") for d in c.dtypes),
            "head_dims": c.head_dims,
            "causal": c.causal,
            "window": c.window,
            "softcap": c.softcap,
            "gqa": c.gqa,
            "autograd": c.autograd,
            "notes": c.notes,
        }
    return out
