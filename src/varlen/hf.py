"""varlen inside stock HuggingFace models: ``attn_implementation="varlen"``, no patched modeling files.

Importing this module registers the implementation with transformers' ``AttentionInterface`` (and
a mask function, so padded batches keep their 2-D ``attention_mask``)::

    import varlen.hf
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="varlen")
    varlen.hf.use(backend="flash")        # default "auto"

A batch is one of:
- packed rows ``[B, L]`` whose ``position_ids`` restart at 0 at each sample (what
  ``DataCollatorWithFlattening`` and TRL's padding-free packing make), optionally with the
  ``cu_seq_lens_q``/``max_length_q`` flash kwargs, or with a ``varlen_info`` SeqInfo from
  :class:`VarlenCollator` (no device read at all);
- padded rows with a 2-D ``attention_mask`` (unpadded once per batch);
- plain rows (one sequence each).
Sequence boundaries are derived once per batch, not per layer, and are found from
``position_ids`` whether or not a KV cache is active (transformers' own ``sdpa`` path stops looking
for packed rows when ``use_cache=True`` and silently attends across samples).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary
from torch import Tensor

from .attention import BACKENDS, BackendUnavailable, attention
from .attention.api import prepare, split_backend
from .attention.common import band, sink_softmax, soft_cap, window_bounds
from .data.batch import PackedBatch
from .loss import IGNORE_INDEX, Labels
from .parallel.context import ulysses_attention
from .packable import PackingRefused
from .samplewise import CACHES, FROM_PACKED, run_sample_wise
from .seqinfo import SeqInfo

NAME = "varlen"


class NotVarlen(PackingRefused):
    """A model whose attention does not go through transformers' attention registry, so
    ``attn_implementation="varlen"`` never reaches it."""


def reaches_varlen(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether a forward of ``model`` on one short row calls varlen's attention at all (some modeling
    files compute attention themselves and accept the name without using it); and the error the
    forward raised, if any."""
    from transformers import AttentionInterface

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return varlen_attention_forward(*args, **kwargs)

    device, training = next(model.parameters()).device, model.training
    AttentionInterface.register(NAME, counting)
    error = ""
    try:
        with torch.no_grad():
            model.train(False)  # what a forward reaches, not what training would refuse (dropout)
            model(input_ids=torch.tensor([[2, 3, 4, 5]], device=device), use_cache=False)
    except (PackingRefused, BackendUnavailable):  # refusals say themselves
        raise
    except Exception as e:  # a model whose own attention cannot take what the name hands it
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    finally:
        AttentionInterface.register(NAME, varlen_attention_forward)
        model.train(training)
    return bool(calls), error

_STATE = {"backend": "auto"}  # the process default; a model's own choice is in its config
# A batch's metadata, derived once from the position_ids / mask tensor that every layer of a forward
# sees, kept while that tensor lives (keyed by the tensor itself, not a global "last batch": two
# models or threads interleaving batches each find their own, and no batch is kept alive).
_PER_BATCH = WeakIdKeyDictionary()


def use(backend: str = "auto", model: torch.nn.Module | None = None) -> None:
    """Choose the kernel behind ``attn_implementation="varlen"``: for ``model`` alone (kept in its
    config as ``varlen_backend``, so it is saved with it), or the default of every model that has
    no choice of its own."""
    if backend != "auto" and split_backend(backend)[0] not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}, 'flash:<impl>' or 'auto'")
    if model is None:
        _STATE["backend"] = backend
        return
    from .packable import refusal

    wrapped = run_sample_wise(model, batch_info)  # stateful mixers: one packed sample at a time
    why = refusal(model, wrapped)
    if why:  # refused when chosen, not when the first packed batch arrives
        raise PackingRefused(f"varlen cannot pack this model exactly: {why}; train it on padded rows instead")
    # every config the model's modules hold: a composite model's text config is another object
    for config in {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if c is not None}.values():
        config.varlen_backend = backend
        _MODELS[id(config)] = ModelState(weakref.ref(config), wrapped)
    if _at_model_entry not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_at_model_entry, with_kwargs=True)


def _at_model_entry(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """What varlen does before the first layer of a model :func:`use` saw (a forward pre-hook).

    With a KV cache, a packed batch is refused if the cache holds tokens or is static: refused in
    attention instead, the first layer would already have written its keys into the cache, and
    decoding on would carry them silently (attention keeps its own check for models ``use`` never
    saw). Without one (training, evaluation), the batch's sequences are read once and handed to
    every layer as ``varlen_info``, as varlen's collators hand them: otherwise every layer looks
    them up, and a compiled model leaves its graph in every layer to do so."""
    cache = next((kwargs[k] for k in CACHES if kwargs.get(k) is not None), None)
    if cache is None and any(kwargs.get(k) is not None for k in ("varlen_info", "varlen_context")):
        return None  # described by varlen's collators, or one rank's slice: nothing to read (and no graph break)
    return _read_batch(model, args, kwargs, cache)


@torch.compiler.disable  # it reads the batch on the host: once a forward, at the model's entry
def _read_batch(model: torch.nn.Module, args: tuple, kwargs: dict, cache) -> tuple[tuple, dict] | None:
    if cache is not None:
        _check_cache(model, kwargs, cache)
        return None
    described = _describe_batch(model, args, kwargs)
    return None if described is None else (args, {**kwargs, **described})


def _describe_batch(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """``varlen_info`` (and ``varlen_indices`` of padded rows' real tokens) for a call that has none,
    as the attention layers would derive them, shaped for the model's backend."""
    x = kwargs.get("input_ids", args[0] if args else None)
    x = x if x is not None else kwargs.get("inputs_embeds")
    pos, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    if (not isinstance(x, Tensor) or x.dim() < 2 or not _takes_kwargs(type(model))
            or (pos is not None and pos.dim() != 2) or (mask is not None and mask.dim() != 2)):
        return None  # mRoPE positions, a model's own mask: left to attention
    rows, length = x.shape[:2]
    info, indices = batch_info(rows, length, x.device, mask, {k: kwargs.get(k) for k in METADATA})
    info = prepare(info, backend_of(model), x.device.type)
    return {"varlen_info": info} if indices is None else {"varlen_info": info, "varlen_indices": indices}


@functools.cache
def _takes_kwargs(cls: type) -> bool:
    """Does the model's forward take ``**kwargs`` (and so carry ``varlen_info`` to its layers)?"""
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.forward).parameters.values())


def _check_cache(model: torch.nn.Module, kwargs: dict, cache) -> None:
    """A packed batch takes an empty dynamic cache only, and marks it: the rows it leaves hold several
    samples each, so decoding on from that cache is refused (here, before the first layer writes,
    also when the model is compiled; attention's own marks are eager only)."""
    if not hasattr(cache, "get_seq_length"):
        return
    mask = kwargs.get("attention_mask")  # generate() may hand over one per layer type, each 2-D or None
    masks = list(mask.values()) if isinstance(mask, dict) else [mask]
    mask = next((m for m in masks if isinstance(m, Tensor) and m.dim() == 2), None)
    packed = _packed_metadata(kwargs, mask)
    if packed and (_is_static(cache) or int(cache.get_seq_length()) > 0):  # (a static cache's length is on the device)
        raise PackingRefused(_packed_cache_message(packed, type(model).__name__))
    if packed:
        setattr(cache, FROM_PACKED, True)
    elif getattr(cache, FROM_PACKED, False) and int(cache.get_seq_length()) > 0:
        raise PackingRefused(_packed_filled_message(type(model).__name__))


def _is_static(cache) -> bool:
    from transformers.cache_utils import StaticLayer

    return any(isinstance(layer, StaticLayer) for layer in getattr(cache, "layers", ()))


def refuse_packing(config) -> None:
    """Packed rows reached a model with layers that would mix its samples: one line, before any kernel."""
    if config is None:
        return
    state = _MODELS.get(id(config))
    if state is None or state.config() is not config:  # a model varlen.hf.use never saw (or a new one at that id)
        state = _MODELS[id(config)] = ModelState(weakref.ref(config))
    if state.refusal is None:  # once per model: decided from its config alone (all a layer sees)
        from .packable import config_refusal

        state.refusal = config_refusal(config, state.sample_wise) or ""
    if state.refusal:
        raise PackingRefused(f"varlen cannot pack this model exactly: {state.refusal}; varlen.hf.use(backend, model) "
                             "runs its known state-space / linear-attention mixers one sample at a time, otherwise "
                             "train it on padded rows")


@dataclass
class ModelState:
    """What varlen keeps of one model, found from the config every layer of it holds: the mixers
    ``use`` set to run sample by sample, and whether packed rows are refused (decided once). Kept
    beside the config, not on it: a config saves every attribute it holds with the model."""

    config: weakref.ref
    sample_wise: tuple[str, ...] = ()
    refusal: str | None = None  # None: not decided yet; "": packs exactly


_MODELS: dict[int, ModelState] = {}  # id(config) -> its model's state (a plain dict: torch.compile traces it)


def backend_of(module: torch.nn.Module) -> str:
    """The kernel an attention module runs: its model's choice, else the process default."""
    return getattr(getattr(module, "config", None), "varlen_backend", None) or _STATE["backend"]


@torch.compiler.disable  # host-side derivation (it reads the tensor), cached across layers also when compiled
def _once_per_batch(tensor: Tensor, what: str, build):
    """``build()``, the ``what`` of ``tensor`` (one tensor may stand for several things: a row's
    sequences, whether it is packed), derived by the first layer and kept for the others."""
    version, values = _PER_BATCH.get(tensor, (None, None))
    if version != tensor._version:  # a tensor changed in place is derived again
        values = {}
        _PER_BATCH[tensor] = (tensor._version, values)
    if what not in values:
        values[what] = build()
    return values[what]


def _is_packed(pos: Tensor, real: Tensor | None = None) -> bool:
    """Does any row restart its positions at a (real) token after its first?"""
    restarts = pos[:, 1:] == 0
    if real is not None:
        restarts &= real[:, 1:] & real[:, :-1]
    return bool(restarts.any())


def _from_mask(mask: Tensor, pos: Tensor | None) -> tuple[SeqInfo, Tensor] | None:
    """Padded rows (left or right): lengths and the flat indices of real tokens; None if no padding."""
    m = mask.detach().to("cpu", torch.bool)
    if bool(m.all()):
        return None
    lens = m.sum(1)
    starts = m.int().argmax(1)
    spans = torch.arange(m.shape[1])[None, :] - starts[:, None]
    if not torch.equal((spans >= 0) & (spans < lens[:, None]), m):
        raise ValueError("varlen: every row's attention_mask must be one contiguous run of real tokens")
    if int(lens.sum()) == 0:
        raise ValueError("varlen: attention_mask has no real token")
    indices = m.flatten().nonzero().flatten()
    pos = None if pos is None else pos.detach().cpu().expand(m.shape[0], -1)
    if pos is not None and _is_packed(pos, m):
        info = SeqInfo.from_position_ids(pos.flatten()[indices])
    else:
        info = SeqInfo.from_lengths([int(n) for n in lens if n > 0])
    return info, indices


def _from_positions(pos: Tensor, rows: int) -> SeqInfo:
    pos = pos.detach().cpu()
    if pos.shape[0] != rows:
        pos = pos.expand(rows, -1)
    if not _is_packed(pos):
        if pos[:, 0].any():
            raise ValueError("varlen: position_ids of a row must start at 0")
        return SeqInfo.from_lengths([pos.shape[1]] * rows)
    if pos[:, 0].any():
        raise ValueError("varlen: packed rows must start at position 0 (each row begins a sample)")
    return SeqInfo.from_position_ids(pos.flatten())


def _check_positions(pos: Tensor | None, info: SeqInfo, rows: int) -> None:
    """A packed row needs positions that restart with each sample, or RoPE / learned positions run
    on across samples while attention stays inside them: a silently wrong model."""
    if info.num_seqs == rows:
        return
    if pos is None:
        raise PackingRefused(
            f"varlen: the batch's sequence metadata packs {info.num_seqs} samples into {rows} row(s) but the "
            "attention layer got no position_ids (the model does not pass them, or the batch had none), so "
            "nothing shows that positions restart with each sample; pass the collator's position_ids (models with 3-D "
            "mRoPE positions, the Qwen2-VL family, take them as VarlenCollator(mrope=True) makes them), or use "
            "padded rows with this model"
        )
    pos = pos.expand(rows, -1).reshape(-1)
    if pos.numel() != info.total_tokens:
        raise ValueError(f"varlen: position_ids cover {pos.numel()} tokens, the sequence metadata {info.total_tokens}")
    message = ("varlen: position_ids do not restart at 0 with each packed sample as cu_seqlens / varlen_info say; "
               "a packed row needs its collator's position_ids")
    if pos.device.type == "cpu" and not torch.compiler.is_compiling():
        if not torch.equal(pos.long(), info.position_ids.to(pos.device)):
            raise ValueError(message)
    else:  # checked on the device, without reading anything back to the host
        torch._assert_async((pos == info.position_ids.to(pos.device)).all(), message)


def _check_positions_once(pos: Tensor | None, info: SeqInfo, rows: int) -> None:
    if torch.compiler.is_compiling():  # an async device check, fused into the graph
        return _check_positions(pos, info, rows)
    # every layer gets the same tensor, alive for the whole forward: checked by the first layer
    info.cached(("positions_checked", id(pos)), lambda: _check_positions(pos, info, rows) or True)


def batch_info(rows: int, length: int, device, attention_mask: Tensor | None, kwargs: dict) -> tuple[SeqInfo, Tensor | None]:
    """SeqInfo for the flattened ``rows * length`` tokens, and the real-token indices when padded."""
    info = kwargs.get("varlen_info")
    indices = kwargs.get("varlen_indices")  # padded rows' real tokens, when the model's entry read them
    if info is None:
        pos = kwargs.get("position_ids")
        cu = kwargs.get("cu_seq_lens_q")
        unpadded = None
        if attention_mask is not None and attention_mask.dim() == 2:
            unpadded = _once_per_batch(attention_mask, "unpadded", lambda: _from_mask(attention_mask, pos))
        if unpadded is not None:
            info, indices = unpadded
        elif cu is not None:
            info = _once_per_batch(cu, "info", lambda: SeqInfo.from_cu_seqlens(cu.to(torch.int32), max_seqlen=kwargs.get("max_length_q")))
            _check_positions_once(pos, info, rows)
        elif pos is not None:
            info = _once_per_batch(pos, "info", lambda: _from_positions(pos, rows))
        else:
            info = SeqInfo.from_lengths([length] * rows)
    elif indices is None:  # padded rows' samples are their masks' runs, whatever positions they carry
        _check_positions_once(kwargs.get("position_ids"), info, rows)
    expected = rows * length if indices is None else indices.numel()
    if info.total_tokens != expected:
        raise ValueError(f"varlen: sequence metadata covers {info.total_tokens} tokens, the batch has {expected}")
    info = _on_device(info, device)
    if indices is not None and indices.device != torch.device(device):
        indices = indices.to(device, non_blocking=True)
    return info, indices


def _on_device(info: SeqInfo, device) -> SeqInfo:
    """``info`` on ``device``: one copy a batch, kept in its cache (also when compiling), not one
    a layer (a fresh copy per layer would also rebuild every mask cached on it)."""
    if info.device == torch.device(device):
        return info
    return info.cached(("to", str(device)), lambda: info.to(device, non_blocking=True), when_compiling=True)


def _decode_step(query, key, value, attention_mask, scaling, causal, window, softcap, sinks=None, position_ids=None):
    """Queries fewer than keys (generation with a KV cache): no packing there; plain math, with
    the window, the soft-capping and the sinks honoured."""
    key, value, allowed = _cache_slots(query, key, value, attention_mask, position_ids, causal, window)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    compute = torch.promote_types(query.dtype, torch.float32)  # float64 stays float64
    scores = soft_cap((query @ key.transpose(-1, -2)).to(compute) * scale, softcap or 0.0)
    probs = sink_softmax(scores.masked_fill(~allowed, float("-inf")).transpose(0, 1), sinks).transpose(0, 1)
    probs = probs.masked_fill(~allowed, 0.0)  # a padding query sees no key: zeros, as the packed path gives it, not NaN
    return (probs.to(value.dtype) @ value).transpose(1, 2)


def _cache_slots(query, key, value, attention_mask, position_ids, causal, window) -> tuple[Tensor, Tensor, Tensor]:
    """The cache's keys and values, and which of them each query sees ``[B | 1, 1, lq, lk]``.

    A static cache's keys are all its slots, the ones past what it holds empty (zeros that a
    softmax would still weigh). With a 2-D padding mask, the mask covers the slots filled (as
    transformers' FlashAttention path reads it): the rest are cut off and the queries are the last
    of the slots. Without one, a query's slot is its position (static: slots are positions) or its
    place from the end (a sliding window's cache that has rolled), whichever comes first; in a
    dynamic cache the two agree."""
    lq = query.shape[2]
    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    if mask is not None and key.shape[2] > mask.shape[-1]:
        key, value = key[:, :, : mask.shape[-1]], value[:, :, : mask.shape[-1]]
    lk = key.shape[2]
    slot = torch.arange(lq, device=query.device)[None] + (lk - lq)  # [1, lq]
    if mask is None and position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == lq:
        slot = torch.minimum(position_ids.to(query.device), slot)  # [B, lq]
    j = torch.arange(lk, device=query.device)
    allowed = band(slot[:, :, None], j, *window_bounds(causal, window))[:, None]  # [B | 1, 1, lq, lk]
    if mask is not None:
        allowed = allowed & mask[:, None, None, -lk:].bool()
    return key, value, allowed


# What transformers' attention call sites pass beside q/k/v/mask (inventory of its modeling files:
# docs/hf-attention-kwargs.md). Read here: the batch's sequence metadata. Harmless: the cache is
# the model's business, and so are the loss's arguments that reach attention through **kwargs.
# Refused when set: features varlen cannot honour; any other argument with a
# value is refused too, by name, rather than ignored.
METADATA = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "varlen_info",
            "varlen_indices", "varlen_context", "seq_idx")  # seq_idx: TRL's sequence index per token, for linear-attention layers
PACKED_METADATA = ("varlen_info", "cu_seq_lens_q", "cu_seq_lens_k", "varlen_context")  # a packed batch's own
HARMLESS = ("use_cache", "cache_position", "past_key_values", "deterministic", "num_items_in_batch", "shift_labels",
            "labels", "logits_to_keep")
SINKS = ("s_aux", "sinks")  # attention sinks (GPT-OSS's s_aux): honoured where the backend has them
REFUSED = {
    "position_bias": "a position-dependent attention bias (T5-style)",
    "output_attentions": "attention weights (output_attentions=True): no varlen kernel returns them",
}


def check_features(module: torch.nn.Module, dropout: float, kwargs: dict) -> None:
    """Raise before any kernel runs if the model asks for a feature varlen would otherwise drop."""
    if dropout:
        raise ValueError(
            f"varlen attention has no dropout (got p={dropout}); set the model's attention dropout to 0 "
            "(GPT2: attn_pdrop=0.0)"
        )
    if getattr(module, "is_cross_attention", False):
        raise ValueError(f"varlen attention: {type(module).__name__} is cross-attention, which packed rows "
                         "do not describe; use another attn_implementation for encoder-decoder models")
    for key, value in kwargs.items():
        if key in METADATA or key in HARMLESS or value is None or value is False:
            continue
        what = REFUSED.get(key, f"the attention argument {key}={value!r}, unknown to varlen")
        raise PackingRefused(f"varlen attention cannot honour {what} ({type(module).__name__}); "
                             "refusing rather than ignoring it")


def varlen_attention_forward(
    module: torch.nn.Module,
    query: Tensor,  # [B, H, L, D]
    key: Tensor,  # [B, Hkv, L, D]
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:  # [B, L, H, D]
    sinks = next((kwargs.pop(k) for k in SINKS if kwargs.get(k) is not None), None)  # [H]
    check_features(module, dropout, kwargs)
    if attention_mask is not None and attention_mask.dim() != 2:  # varlen's mask function hands over 2-D or None
        raise PackingRefused(f"varlen attention cannot honour the {attention_mask.dim()}-D attention mask or bias "
                             f"{type(module).__name__} built itself; refusing rather than ignoring it")
    if torch.is_autocast_enabled(query.device.type):  # as SDPA under autocast: q, k, v in its dtype (rotary
        dtype = torch.get_autocast_dtype(query.device.type)  # embeddings leave q, k float32 beside a bf16 v)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    b, h, length, d = query.shape
    window = (-1, -1) if not sliding_window else (sliding_window - 1, -1)
    if key.shape[2] != length:
        _refuse_packed_cache(module, kwargs, key.shape[2] - length, attention_mask)
        return _decode_step(query, key, value, attention_mask, scaling, causal, window, softcap, sinks,
                            kwargs.get("position_ids")), None
    if kwargs.get("varlen_context") is not None:  # this rank's slice of a packed row (context parallelism)
        if sinks is not None:
            raise PackingRefused(f"varlen attention cannot honour attention sinks ({type(module).__name__}) with "
                                 "context parallelism; refusing rather than ignoring them")
        out = _context_attention(query, key, value, kwargs, causal=causal, scale=scaling, window_size=window,
                                 softcap=softcap or 0.0, backend=backend_of(module))
        return out, None
    info, indices = batch_info(b, length, query.device, attention_mask, kwargs)
    if info.num_seqs > b:  # packed rows: every other layer must keep the samples apart too
        refuse_packing(getattr(module, "config", None))
    if kwargs.get("use_cache") and not torch.compiler.is_compiling():  # these keys go into a cache
        setattr(module, PACKED_PREFILL, length if info.num_seqs > b else None)
    # [B*L, H, D]; v's head size may differ (MLA)
    q, k, v = (x.transpose(1, 2).reshape(b * length, x.shape[1], x.shape[-1]) for x in (query, key, value))
    if indices is not None:
        q, k, v = q[indices], k[indices], v[indices]
    out = attention(q, k, v, info, causal=causal, scale=scaling, window_size=window, softcap=softcap or 0.0,
                    backend=backend_of(module), sinks=sinks)
    dv = value.shape[-1]
    if indices is not None:
        out = out.new_zeros(b * length, h, dv).index_copy(0, indices, out)
    return out.view(b, length, h, dv), None


# an attention module whose last prefill into a cache was a packed row: that row's length (keys a row)
PACKED_PREFILL = "varlen_packed_prefill"


def _refuse_packed_cache(module: torch.nn.Module, kwargs: dict, cached: int, attention_mask: Tensor | None) -> None:
    """Queries fewer than keys: the cache's earlier keys belong to no packed sample of this call, and
    a cache a packed row filled holds several samples that a decoded token would all see."""
    packed = _packed_metadata(kwargs, attention_mask)
    if packed:  # the cache holds earlier tokens, or a static cache's slots: a packed batch says nothing of them
        raise PackingRefused(_packed_cache_message(packed, type(module).__name__))
    if getattr(module, PACKED_PREFILL, None) == cached:
        raise PackingRefused(_packed_filled_message(type(module).__name__))


def _packed_metadata(kwargs: dict, attention_mask: Tensor | None) -> list[str]:
    """What says a call's rows are packed: their boundaries, or positions restarting inside a row
    (read once a batch; one query a row is one sample)."""
    packed = [k for k in PACKED_METADATA if kwargs.get(k) is not None]
    pos = kwargs.get("position_ids")
    if not packed and isinstance(pos, Tensor) and pos.dim() == 2 and pos.shape[-1] > 1:
        mask = attention_mask if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 else None
        real = None if mask is None else mask.bool()[:, -pos.shape[-1]:]
        if _once_per_batch(pos, "packed", lambda: _is_packed(pos, real)):
            packed = ["position_ids that restart inside a row"]
    return packed


def _packed_filled_message(where: str) -> str:
    return (f"varlen attention: decoding from a KV cache that a packed batch filled ({where}): its rows hold several "
            "samples, and a new token would attend to all of them; prefill one prompt a row (padded rows), then decode")


def _packed_cache_message(packed: list[str], where: str) -> str:
    return (f"varlen attention: a packed batch ({', '.join(packed)}) with a KV cache ({where}: one that holds "
            "tokens, or a static one); packed rows take no cache: call with use_cache=False, or generate one "
            "sample a row")


def _context_attention(query: Tensor, key: Tensor, value: Tensor, kwargs: dict, **kw) -> Tensor:
    """``[1, H, T/N, D]`` of one rank's slice -> ``[1, T/N, H, D]`` through Ulysses over the whole row
    (``varlen_info``), its positions checked against the row's."""
    context, info = kwargs["varlen_context"], kwargs.get("varlen_info")
    b, _, length, d = query.shape
    if info is None or b != 1 or length * context.size != info.total_tokens:
        raise ValueError(f"varlen: a context slice needs one row [1, T/{context.size}] and the whole row's "
                         f"varlen_info, got [{b}, {length}] and {info.total_tokens if info is not None else 'none'}")
    info = _on_device(info, query.device)
    pos = kwargs.get("position_ids")
    if pos is not None and not torch.compiler.is_compiling() and pos.device.type == "cpu":
        if not torch.equal(pos.reshape(-1).long(), info.position_ids[context.slice(info.total_tokens)].to(pos.device)):
            raise ValueError("varlen: position_ids of a context slice must be the row's positions of that slice")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T/N, H, D]
    return ulysses_attention(q, k, v, info, context, **kw)[None]


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)


def padding_mask(batch_size: int, q_length: int, kv_length: int, *args, attention_mask: Tensor | None = None,
                 **kwargs) -> Tensor | None:
    """What the model hands attention for a mask: the 2-D padding mask (its last ``kv_length`` slots,
    a sliding window's), or None. As transformers' FlashAttention mask function, without its test
    for an all-ones mask: that reads the mask on the host, a sync on the GPU and a graph break in a
    compiled model; attention reads the batch once anyway (an all-ones mask: rows of one sample)."""
    return None if attention_mask is None else attention_mask[:, -kv_length:]


@dataclass(frozen=True)
class VarlenCollator:
    """Samples (dicts with ``input_ids`` and optional ``labels``) -> one packed row ``[1, T]``.

    Returns ``input_ids``, ``labels``, ``position_ids`` (restarting at 0) and ``varlen_info``. HF
    models shift labels inside their loss, so the labels are unshifted (``Labels.UNSHIFTED``;
    the inputs where a sample has none) and the first label of every sample is ignored: no token
    learns to predict the next sample's first. Shifted labels are refused.

    ``flash_kwargs=True`` adds the boundaries as transformers names them (``cu_seq_lens_q/k``,
    ``max_length_q/k``, ``seq_idx``: ``PackedBatch.flash_kwargs``), for layers of a model that read
    them rather than ``varlen_info``.

    ``mrope=True`` (the Qwen2-VL family's 3-D rotary positions): ``position_ids`` is ``[4, 1, T]``,
    the restarting text positions first (what attention checks the boundaries against) and then the
    temporal, height and width positions, as transformers takes a packed row for these models. A
    sample's own ``position_ids`` ``[3, n]`` (from the model's ``get_rope_index``, for images or
    video) are used as they are; a text sample's three are its text positions.
    """

    ignore_index: int = IGNORE_INDEX
    max_seqlen: int | None = None  # a fixed upper bound keeps torch.compile from specialising per batch
    mrope: bool = False
    flash_kwargs: bool = False

    def __call__(self, features: list[dict]) -> dict:
        if not features:
            raise ValueError("empty batch: no samples")
        ids, labels = [], []
        for i, f in enumerate(features):
            x = torch.as_tensor(f["input_ids"]).long().flatten()
            y = torch.as_tensor(f["labels"]).long().flatten() if f.get("labels") is not None else x
            if y.shape != x.shape:
                raise ValueError(f"sample {i}: labels ({y.numel()}) and input_ids ({x.numel()}) differ in length")
            if x.numel() == 0:
                raise ValueError(f"sample {i} is empty")
            Labels.UNSHIFTED.check(x, y, f"sample {i}")
            ids.append(x)
            labels.append(y)
        info = SeqInfo.from_lengths([len(x) for x in ids], max_seqlen=self.max_seqlen)
        rope = [self._rope_positions(f, len(x), i) for i, (f, x) in enumerate(zip(features, ids))]
        pos = info.position_ids[None]
        if self.mrope:  # [4, 1, T]: text positions, then temporal / height / width
            pos = torch.cat([pos, torch.cat(rope, dim=1)])[:, None]
        out = {
            "input_ids": torch.cat(ids)[None],
            "labels": Labels.UNSHIFTED.packed(torch.cat(labels), info.cu_seqlens[:-1], self.ignore_index)[None],
            "position_ids": pos,
            "varlen_info": info,
        }
        if self.flash_kwargs:
            out.update(PackedBatch(out["input_ids"][0], out["labels"][0], info).flash_kwargs())
        return out

    def _rope_positions(self, feature: dict, n: int, i: int) -> Tensor | None:
        """A sample's ``[3, n]`` mRoPE positions (``mrope=True``); a sample's own positions are never dropped:
        without ``mrope`` only positions 0..n-1, which the row's restarting positions equal, are taken."""
        own = feature.get("position_ids")
        own = None if own is None else torch.as_tensor(own).long()
        text = torch.arange(n)
        if not self.mrope:
            if own is not None and not torch.equal(own.flatten(), text):
                raise ValueError(f"sample {i} carries position_ids of shape {tuple(own.shape)} that are not 0..{n - 1}; "
                                 "VarlenCollator makes each sample's positions itself (3-D mRoPE positions, the "
                                 "Qwen2-VL family's: VarlenCollator(mrope=True))")
            return None
        if own is None:
            return text.expand(3, n)
        own = own.reshape(3, -1) if own.numel() == 3 * n else own
        if own.shape != (3, n):
            raise ValueError(f"sample {i}: mRoPE position_ids must be [3, {n}] (temporal, height, width), got {tuple(own.shape)}")
        return own

register()
