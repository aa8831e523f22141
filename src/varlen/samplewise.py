"""An HF model's stateful layers run one packed sample at a time, so that their state restarts with
each sample exactly as it does for the sample alone.

State-space, recurrent, linear-attention and short-convolution mixers (Mamba, Mamba2, Gated
DeltaNet, LFM2's short convolution, ...) carry a state along the row: in a packed row it would run
from one sample into the next. Their fused varlen kernels take the boundaries (flash-linear-attention
with ``cu_seqlens``, causal-conv1d with ``seq_idx``), but transformers' torch paths take none, and on a
CPU nothing else runs. Here each such module (known by its class, :data:`varlen.packable.MIXER_NAMES`)
is called once per sample of a packed batch, on that sample's tokens alone, and the outputs are put
back in place: exact on every device, for one mixer call per sample. Batches that are not packed
(one sample a row, padded or not) reach the module as they are.

The boundaries come from the model's own call (``position_ids``, ``cu_seq_lens_q``, ``varlen_info`` or
``attention_mask``, as varlen's attention reads them), taken by a forward pre-hook on the model: some
models (Jamba) hand their mixers none of it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .packable import MIXER_NAMES, PackingRefused, under

HOOKED = "_varlen_sample_wise"  # the attribute a model whose mixers run sample by sample carries


class Boundaries:
    """The current batch's samples as seen by the model's forward (None: not packed). ``derive`` is
    varlen's attention's reading of a batch (``varlen.hf.batch_info``), so both see the same samples."""

    def __init__(self, derive, paths: tuple[str, ...]) -> None:
        self.info, self.derive, self.paths = None, derive, paths  # paths: the mixers it serves

    @torch.compiler.disable  # reads the batch on the host, as varlen's attention does
    def capture(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("varlen_context") is not None:  # one rank's slice of a row: samples cross its edges
            raise PackingRefused(f"varlen cannot run the state-space / linear-attention mixers of "
                                 f"{type(model).__name__} sample by sample with context parallelism")
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        if x is None or x.dim() < 2:
            self.info = None
            return
        rows, length = x.shape[:2]
        info, indices = self.derive(rows, length, x.device, kwargs.get("attention_mask"), kwargs)
        # padded rows keep one sample a row: the mixers take those (and their mask) as they are
        self.info = info if indices is None and info.num_seqs > rows else None


def mixers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that carry a state along the sequence, by class name, outermost only."""
    found: list[tuple[str, nn.Module]] = []
    for path, m in model.named_modules():
        if path and MIXER_NAMES.search(type(m).__name__) and not under(path, [p for p, _ in found]):
            found.append((path, m))
    return found


def sample_wise_paths(model: nn.Module) -> tuple[str, ...]:
    """The paths of ``model``'s mixers that run one sample at a time (none before :func:`run_sample_wise`)."""
    bounds = getattr(model, HOOKED, None)
    return bounds.paths if bounds is not None else ()


def run_sample_wise(model: nn.Module, derive) -> tuple[str, ...]:
    """Make ``model``'s stateful mixers run one packed sample at a time, reading each batch with
    ``derive``; the paths it changed. Idempotent: a model already prepared is left as it is."""
    if getattr(model, HOOKED, None) is not None:
        return sample_wise_paths(model)
    found = mixers(model)
    bounds = Boundaries(derive, tuple(p for p, _ in found))
    for path, m in found:
        m.forward = _SampleWise(m.forward, bounds, f"{path} ({type(m).__name__})")
    if found:  # a model of attention layers alone needs no hook
        model.register_forward_pre_hook(bounds.capture, with_kwargs=True)  # a method: a deep copy hooks its copy
    setattr(model, HOOKED, bounds)
    return bounds.paths


CACHES = ("cache", "cache_params", "past_key_values", "past_key_value")
FROM_PACKED = "varlen_from_packed"  # set on a cache a packed batch ran with (its mixers' states left empty)
SAMPLE_POSITIONS = ("cache_position",)  # [L]: a sample alone counts from 0


class _SampleWise:
    """A mixer's forward, called once per sample of a packed batch: ``[B, L, C]`` rows in, each
    sample's ``[1, n, C]`` through the mixer alone; samples of one length go through together as the
    rows of one ``[k, n, C]`` batch (a mixer keeps its batch's rows apart). Its other arguments
    follow: per-token tensors (``[B, L, ...]``: positions, rotary tables, a 2-D mask) are cut to the
    sample, a cache is left out and marked (a packed batch is no prefill to decode from: decoding from
    that cache is refused), row-wide metadata
    (``cu_seq_lens_q``, a 4-D mask) is dropped, the rest passes as it is."""

    def __init__(self, forward, bounds: Boundaries, name: str) -> None:
        self.forward, self.bounds, self.name = forward, bounds, name

    def __call__(self, hidden_states: Tensor, *args, **kwargs):
        if self.bounds.info is None:
            if any(getattr(kwargs.get(k), FROM_PACKED, False) for k in CACHES):
                raise PackingRefused(f"varlen: decoding from a cache that a packed batch was run with ({self.name}): "
                                     "its mixers ran one sample at a time and left the cache's state empty; prefill "
                                     "one prompt a row (padded rows), then decode")
            return self.forward(hidden_states, *args, **kwargs)
        return self.packed(hidden_states, *args, **kwargs)

    # eager inside a compiled model: the loop over a batch's lengths would otherwise be traced per batch
    @torch.compiler.disable
    def packed(self, hidden_states: Tensor, *args, **kwargs):
        info = self.bounds.info
        rows, length = hidden_states.shape[:2]
        if info.total_tokens != rows * length:
            raise ValueError(f"varlen: {self.name} got {rows * length} tokens, the batch's metadata "
                             f"{info.total_tokens}")
        for k in CACHES:  # left out: marked, so that decoding from it is refused rather than wrong
            if kwargs.get(k) is not None:
                setattr(kwargs[k], FROM_PACKED, True)
        kwargs = {k: (None if k in CACHES else v) for k, v in kwargs.items()}
        held = [k for k, v in (*enumerate(args), *kwargs.items()) if _holds_state(v)]
        if held:  # a list of per-row tensors the mixer reads and writes: no sample's alone, none to cut
            raise PackingRefused(f"varlen cannot run {self.name} sample by sample: it carries a state of the "
                                 f"whole rows in its argument {held[0]!r}, which varlen cannot cut per sample")
        spans = _spans(info.lengths, length)  # (row, offset, length) of each sample
        outs: list = [None] * len(spans)
        for n, members in _by_length(spans).items():
            group = [spans[i] for i in members]

            def batched(v, n=n, group=group):  # the group's samples of a per-token value, stacked as rows
                return _stack([_cut(v, r, o, n, rows, length) for r, o, _ in group])

            kw = {k: (_count(v, n) if k in SAMPLE_POSITIONS else batched(v)) for k, v in kwargs.items()}
            out = self.forward(batched(hidden_states), *map(batched, args), **kw)
            for j, h in zip(members, self._hidden(out)):
                outs[j] = h
        hidden = torch.cat(outs).view(rows, length, *outs[0].shape[1:])
        return hidden if isinstance(out, Tensor) else (hidden, *[None] * (len(out) - 1))

    def _hidden(self, out) -> Tensor:  # [k, n, C] of a group's output: the hidden states, or them and Nones
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor) and all(x is None for x in out[1:]):
            return out[0]
        if not isinstance(out, Tensor):
            raise PackingRefused(f"varlen cannot run {self.name} sample by sample: it returns "
                                 f"{type(out).__name__} with more than the hidden states")
        return out


def _spans(lengths, length: int) -> list[tuple[int, int, int]]:
    out, start = [], 0
    for n in lengths:  # a packed row holds whole samples: none crosses into the next row
        out.append((*divmod(start, length), n))
        start += n
    return out


def _by_length(spans) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, (_, _, n) in enumerate(spans):
        groups.setdefault(n, []).append(i)
    return groups


def _stack(values: list):
    """The cut arguments of a group's samples as one batch: tensors ``[1, n, ...]`` stacked as rows."""
    first = values[0]
    if isinstance(first, tuple):
        return tuple(_stack(list(v)) for v in zip(*values))
    return torch.cat(values) if isinstance(first, Tensor) else first


def _cut(value, row: int, off: int, n: int, rows: int, length: int):
    """``value`` as the sample at ``row``, tokens ``off .. off + n`` alone would get it."""
    if isinstance(value, tuple):
        return tuple(_cut(v, row, off, n, rows, length) for v in value)
    if not isinstance(value, Tensor):
        return value
    if value.dim() >= 2 and value.shape[1] == length and value.shape[0] in (rows, 1) and value.dim() <= 3:
        r = row if value.shape[0] == rows else 0
        return value[r:r + 1, off:off + n]
    return None  # row-wide metadata: cu_seq_lens, seq_idx over the row, a 4-D mask


def _holds_state(value) -> bool:
    """A list (RWKV's ``state``) or dict of tensors: a recurrent state kept outside a cache object."""
    values = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else ()
    return any(isinstance(v, Tensor) for v in values)


def _count(value, n: int):
    return value if not isinstance(value, Tensor) else torch.arange(n, device=value.device, dtype=value.dtype)
