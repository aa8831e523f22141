"""Model families as objects, chosen once from a name and used alike by ``varlen bench``,
``varlen train`` and ``varlen check``: how to build one of a decoder config's size, run a packed
batch through it, and count its FLOPs. Nothing else branches on a model's name."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import Tensor, nn

from ..data.batch import Batch
from ..measure.flops import step_flops
from .decoder import Decoder, DecoderConfig


@dataclass(frozen=True)
class ModelFamily:
    """varlen's reference decoder: packed batches carry ``info`` (a SeqInfo); eval is bidirectional
    and training causal, as in the study."""

    name: str = "decoder"
    hf: bool = False  # HF models take a batch's hf_kwargs(): [1, T] rows, position_ids and ``varlen_info``
    own_attention: bool = False  # True: the model runs its own attention, none of varlen's backends
    compiles: bool = True  # False: refused under torch.compile

    def unavailable(self, backend: str) -> str | None:
        """Why this family cannot run with ``backend`` on this machine at all, or None."""
        from ..attention import backend_unavailable

        return backend_unavailable(backend)

    def build(self, cfg: DecoderConfig, backend: str = "auto") -> nn.Module:
        return Decoder(cfg, backend=backend)

    def logits(self, model: nn.Module, batch: Batch, causal: bool = True) -> Tensor:
        return model(**batch.model_kwargs(), causal=causal)

    def flops(self, lengths: Sequence[int], cfg: DecoderConfig, train: bool) -> float:
        return step_flops(lengths, dim=cfg.dim, n_layers=cfg.n_layers, vocab_size=cfg.vocab_size, train=train,
                          causal=train, mlp_ratio=cfg.mlp_ratio)


@dataclass(frozen=True)
class HFFamily(ModelFamily):
    """A stock transformers causal LM of the decoder config's size, its attention through
    ``attn_implementation="varlen"`` with this model's own kernel choice (``varlen.hf.use``)."""

    config: Callable[[DecoderConfig], object] | None = None  # DecoderConfig -> transformers config
    hf: bool = True

    def build(self, cfg: DecoderConfig, backend: str = "auto", attn_implementation: str = "varlen") -> nn.Module:
        import transformers

        from .. import hf

        hf.register()
        model = transformers.AutoModelForCausalLM.from_config(self.config(cfg), attn_implementation=attn_implementation)
        hf.use(backend, model)
        return model

    def logits(self, model: nn.Module, batch: Batch, causal: bool = True) -> Tensor:
        # HF causal LMs are causal whatever asked; labels stay out (the caller's loss reads them)
        return model(**batch.hf_kwargs(), use_cache=False).logits

    def flops(self, lengths: Sequence[int], cfg: DecoderConfig, train: bool) -> float:
        return step_flops(lengths, dim=cfg.dim, n_layers=cfg.n_layers, vocab_size=cfg.vocab_size, train=train,
                          causal=True, mlp_ratio=cfg.mlp_ratio)


@dataclass(frozen=True)
class PretrainedFamily(HFFamily):
    """A causal LM saved in a local folder (``config.json`` and safetensors weights, as
    ``save_pretrained`` writes them), loaded by transformers with its attention through varlen.
    Nothing in the folder runs as code: no remote code, no pickled weights."""

    path: str = ""

    def hf_config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path, local_files_only=True)
        except Exception as e:  # transformers raises many kinds for a folder that is no model
            raise ValueError(f"{self.path}: no model config could be read ({_first_line(e)})") from None

    def sizes(self) -> DecoderConfig:
        return decoder_sizes(self.hf_config())

    def build(self, cfg: DecoderConfig, backend: str = "auto", attn_implementation: str = "varlen") -> nn.Module:
        import torch
        import transformers

        from .. import hf

        hf.register()
        self.hf_config()  # a folder that is no model: one line
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                self.path, attn_implementation=attn_implementation, dtype=torch.float32, use_safetensors=True,
                local_files_only=True)
        except Exception as e:
            raise ValueError(f"{self.path}: transformers could not load it as a causal LM from safetensors weights "
                             f"({_first_line(e)})") from None
        hf.use(backend, model)
        return model


# causal LMs whose logits are their last hidden states times the head's weight, nothing after it
# (no soft-capping, scaling or auxiliary loss): the head can be applied chunk by chunk inside the loss
PLAIN_HEADS = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "olmo2", "gemma")


class HiddenStates(nn.Module):
    """An HF causal LM without its head: ``forward`` returns the last hidden states ``[B, L, D]``, so
    the loss can apply the head chunk by chunk (``varlen.loss.linear_cross_entropy_sum``). The LM
    stays a submodule: its head's weight is among these parameters (DDP reduces its gradient)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self._no_split_modules = getattr(lm, "_no_split_modules", None)

    def forward(self, **kwargs) -> Tensor:
        return self.lm.base_model(**kwargs).last_hidden_state

    @property
    def head_weight(self) -> Tensor:
        return self.lm.get_output_embeddings().weight


def head_refusal(model: nn.Module) -> str | None:
    """Why the loss cannot apply this model's head chunk by chunk, or None."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in PLAIN_HEADS:
        return (f"model type {kind}'s logits are not known to be its head alone (soft-capping, scaling and "
                f"auxiliary losses would be dropped); chunked for {', '.join(PLAIN_HEADS)}")
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        return "its head has a bias"
    return None


def aux_loss_refusal(config) -> str | None:
    """Why training this model on its logits' cross-entropy alone would drop part of the loss its config
    asks for (a mixture of experts' load-balancing loss), or None."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    coef = getattr(c, "router_aux_loss_coef", 0.0) or 0.0
    if getattr(c, "output_router_logits", False) and coef:
        return (f"its config asks for the router's load-balancing loss (output_router_logits=true, "
                f"router_aux_loss_coef={coef}), which varlen train's loss (the logits' cross-entropy) leaves out; set "
                "output_router_logits to false in its config.json to train on the cross-entropy alone")
    return None


def decoder_sizes(config) -> DecoderConfig:
    """A transformers config's sizes as the decoder's (what the token budget, the cost model and the
    FLOPs count read); ``max_len - 1`` is the longest sample it takes."""
    c = config.get_text_config()
    dim, heads = c.hidden_size, c.num_attention_heads
    return DecoderConfig(vocab_size=c.vocab_size, max_len=getattr(c, "max_position_embeddings", 1 << 20) + 1,
                         dim=dim - dim % heads, n_layers=c.num_hidden_layers, n_heads=heads,
                         mlp_ratio=max(1, round(getattr(c, "intermediate_size", 4 * dim) / dim)))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass(frozen=True)
class TEFamily(ModelFamily):
    """The decoder's shape in TransformerEngine's layers (:mod:`varlen.models.te_decoder`): a peer
    with its own fused attention, eager only."""

    name: str = "te-decoder"
    own_attention: bool = True
    compiles: bool = False

    def unavailable(self, backend: str) -> str | None:
        from .te_decoder import te_unavailable

        return te_unavailable()

    def build(self, cfg: DecoderConfig, backend: str = "te") -> nn.Module:
        from .te_decoder import TEDecoder

        return TEDecoder(cfg)

    def logits(self, model: nn.Module, batch: Batch, causal: bool = True) -> Tensor:
        return model(**batch.model_kwargs(), causal=causal)  # packed batches only: TEDecoder takes info


_HF_COMMON = dict(bos_token_id=1, eos_token_id=1, use_cache=False)


def gpt2_config(cfg: DecoderConfig):
    """GPT2 of the decoder's shape (learned positions, GELU MLP, LayerNorm), without dropout."""
    from transformers import GPT2Config

    return GPT2Config(n_layer=cfg.n_layers, n_embd=cfg.dim, n_head=cfg.n_heads, vocab_size=cfg.vocab_size,
                      n_positions=cfg.max_len, n_inner=cfg.mlp_ratio * cfg.dim, attn_pdrop=0.0, resid_pdrop=0.0,
                      embd_pdrop=0.0, **_HF_COMMON)


def llama_config(cfg: DecoderConfig):
    """Llama of the decoder's width and depth, with grouped-query attention (half the heads for k/v)."""
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=cfg.n_layers, hidden_size=cfg.dim, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=max(1, cfg.n_heads // 2), intermediate_size=cfg.mlp_ratio * cfg.dim,
                       vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_len, **_HF_COMMON)


DECODER = ModelFamily()
HF_GPT2 = HFFamily("hf-gpt2", config=gpt2_config)
HF_LLAMA = HFFamily("hf-llama", config=llama_config)
TE_DECODER = TEFamily()
FAMILIES = {f.name: f for f in (DECODER, HF_GPT2, HF_LLAMA, TE_DECODER)}


def family(name: str) -> ModelFamily:
    """The family of a name: ``decoder``, ``hf-gpt2``, ``hf-llama``, ``te-decoder``, or a local
    folder holding a saved causal LM."""
    if name in FAMILIES:
        return FAMILIES[name]
    if os.path.isdir(name):
        return PretrainedFamily(f"folder {name}", path=name)
    raise ValueError(f"unknown model {name!r}: neither one of {sorted(FAMILIES)} nor a model folder")
