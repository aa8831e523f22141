"""Which HF causal LMs varlen can pack exactly, and the reason for each one it refuses.

Packing is exact when every layer that sees the sequence keeps the samples of a row apart.
varlen's attention does. Two other kinds of layer do not, and no attention kernel can fix them:

- layers that carry a state along the sequence: state-space and recurrent mixers (Mamba, RWKV,
  RG-LRU), linear attention (Gated DeltaNet, Lightning), short causal convolutions. Their state
  runs on from one sample into the next unless their own kernels are given the boundaries;
  transformers' layers are not;
- positions computed from the row rather than read from ``position_ids`` (learned or sinusoidal
  tables indexed by place in the row, or by an offset the collators do not reproduce).

:func:`refusal` inspects a built model (it names the module); :func:`config_refusal` decides from
a config alone, which is all varlen's attention sees when a packed batch reaches it. Both return
None for a model that packs exactly, else one line naming the layer and why. Mixers that
``varlen.hf.use`` made run one sample at a time (:mod:`varlen.samplewise`) pass both.
"""

from __future__ import annotations

import re

import torch


class PackingRefused(ValueError):
    """A model, or a feature of it, that varlen cannot pack exactly: the message names the layer."""

# modules that carry a state along the sequence, by the names transformers gives them (the layer
# itself, not the blocks and norms around it that share its prefix)
MIXER_NAMES = re.compile(r"(Mixer|DeltaNet|ShortConv|LightningAttention|LinearAttention|Rglru|RecurrentBlock|"
                         r"MambaLayer|xLSTMLayer|Retention|Hyena|Lstm|LSTM)$|^Rwkv\w*Attention$")
STATEFUL = "carries its state from one packed sample into the next (transformers' layer takes no sample boundaries)"

# config fields that only architectures with such layers have
MIXER_FIELDS = ("mamba_d_state", "mamba_d_conv", "mamba_n_heads", "ssm_state_size", "state_size", "conv_kernel",
                "linear_conv_kernel_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_attn_config",
                "conv_L_cache", "time_step_rank", "attention_hidden_size", "lru_width")
# per-layer kinds that keep samples apart: attention and position-wise layers (any other kind in
# layer_types & co. is a layer with a state along the sequence)
SEPARATE_KINDS = {"attention", "full_attention", "sliding_attention", "chunked_attention", "global", "local",
                  "full", "sliding", "attn", "mlp", "moe", "dense", "indexed_attention", "swa"}
LAYER_LISTS = ("layer_types", "layers_block_type", "block_types", "layers_type")

# architectures whose positions come from the row, not from position_ids
ROW_POSITIONS = {
    **dict.fromkeys(("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "xmod",
                     "roberta-prelayernorm"),
                    "learned absolute positions offset by the padding index (padding_idx + 1 onward, computed from "
                    "input_ids); packed position_ids restarting at 0 give every sample other positions than alone"),
    **dict.fromkeys(("bart", "mbart", "marian", "pegasus", "plbart", "blenderbot", "blenderbot-small",
                     "bigbird_pegasus", "prophetnet", "mvp", "trocr", "xglm", "pegasus_x", "m2m_100", "nllb-moe"),
                    "positions taken from the place in the row (the decoder's positional embedding reads the row's "
                    "length, not position_ids)"),
}


def _kinds(config) -> list[tuple[int, str]]:
    """(layer, kind) of every layer whose kind is not attention."""
    out = []
    for name in LAYER_LISTS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple, str)):
            out += [(i, str(k)) for i, k in enumerate(value) if str(k) not in SEPARATE_KINDS]
    return out


def _sub_configs(config):
    yield config
    for name in ("text_config", "decoder"):
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict") and sub is not config:
            yield from _sub_configs(sub)


def under(path: str, paths) -> bool:
    """Whether the module at ``path`` is one of ``paths`` or inside one."""
    return any(path == p or path.startswith(p + ".") for p in paths)


def config_refusal(config, sample_wise: tuple[str, ...] = ()) -> str | None:
    """Why a model of this config cannot be packed exactly, from the config alone, or None.
    ``sample_wise``: the paths of the model's mixers that run one sample at a time
    (:mod:`varlen.samplewise`); a stateful layer kind is then fine in a layer that holds one."""
    for c in _sub_configs(config):
        model_type = getattr(c, "model_type", "")
        if model_type in ROW_POSITIONS:
            return f"{model_type}: {ROW_POSITIONS[model_type]}"
        for i, kind in _kinds(c):
            if not any(f".{i}." in f".{p}." for p in sample_wise):
                return f"{model_type}: layer {i} is a {kind!r} layer, which {STATEFUL}"
        fields = [f for f in MIXER_FIELDS if getattr(c, f, None) is not None]
        if fields and not sample_wise:
            return (f"{model_type}: its state-space / recurrent / convolution layers ({', '.join(fields[:2])} in "
                    f"its config) carry their state from one packed sample into the next")
    return None


def mixing_module(model: torch.nn.Module, sample_wise: tuple[str, ...] = ()) -> str | None:
    """The first module that carries a state along the sequence, as ``"path (Class)"``, or None: a
    layer known by its class name, else a convolution over the tokens (kernel > 1); modules in the
    mixers of ``sample_wise`` run one sample at a time and pass."""
    modules = [(path, m) for path, m in model.named_modules() if path and not under(path, sample_wise)]
    for path, m in modules:
        if MIXER_NAMES.search(type(m).__name__):
            return f"{path} ({type(m).__name__})"
    for path, m in modules:
        if isinstance(m, torch.nn.Conv1d) and m.kernel_size[0] > 1:
            return f"{path} ({type(m).__name__}, kernel {m.kernel_size[0]})"
    return None


def refusal(model: torch.nn.Module, sample_wise: tuple[str, ...] = ()) -> str | None:
    """Why this built model cannot be packed exactly, naming the module, or None."""
    config = getattr(model, "config", None)
    for c in (_sub_configs(config) if config is not None else ()):
        if getattr(c, "model_type", "") in ROW_POSITIONS:
            return f"{type(model).__name__}: {ROW_POSITIONS[c.model_type]}"
    layer = mixing_module(model, sample_wise)
    if layer:
        return f"{type(model).__name__}: {layer} {STATEFUL}"
    return config_refusal(config, sample_wise) if config is not None else None
