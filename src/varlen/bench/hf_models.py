"""The study's HuggingFace part (docs/study.md): a stock ``GPT2LMHeadModel`` of the study's size,
padded on HF's ``sdpa``, packed on HF's own ``sdpa`` path, and packed through ``varlen``.

Each sample's first label is ignored in every strategy, so that a packed row never learns
across a sample boundary and all strategies train on the same predictions.
"""

from __future__ import annotations


from ..data.collate import IGNORE_INDEX, _pad, _pairs
from ..models import DecoderConfig

HF_STRATEGIES = {
    "hf-padded": "GPT2, padded to max_len + 1, HF sdpa with the padding mask (the HF baseline)",
    "hf-packed-sdpa": "GPT2, one packed row + position_ids on HF's own sdpa path",
    "hf-varlen-flash": "GPT2, one packed row through attn_implementation='varlen', FlashAttention varlen",
    "hf-varlen-flex": "GPT2, one packed row through attn_implementation='varlen', FlexAttention",
    "hf-varlen-sdpa": "GPT2, one packed row through attn_implementation='varlen', SDPA inside",
}


def gpt2(cfg: DecoderConfig, strategy: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    if strategy.startswith("hf-varlen-"):
        import varlen.hf

        varlen.hf.use(strategy.removeprefix("hf-varlen-"))
    config = GPT2Config(n_layer=cfg.n_layers, n_embd=cfg.dim, n_head=cfg.n_heads, vocab_size=cfg.vocab_size,
                        n_positions=cfg.max_len, n_inner=cfg.mlp_ratio * cfg.dim, attn_pdrop=0.0, resid_pdrop=0.0,
                        embd_pdrop=0.0, bos_token_id=1, eos_token_id=1, use_cache=False)
    impl = "varlen" if strategy.startswith("hf-varlen-") else "sdpa"
    return GPT2LMHeadModel._from_config(config, attn_implementation=impl)


class HFPadCollator:
    def __init__(self, length: int):
        self.length = length

    def __call__(self, samples):
        # HF shifts labels inside its loss: labels are the inputs themselves
        batch = _pad([(x, x) for x, _ in _pairs(samples)], self.length, 0, IGNORE_INDEX)
        batch["labels"][:, 0] = IGNORE_INDEX
        return batch


class HFPackCollator:
    def __init__(self, with_info: bool, max_seqlen: int | None):
        self.with_info, self.max_seqlen = with_info, max_seqlen

    def __call__(self, samples):
        from ..hf import VarlenCollator

        batch = VarlenCollator(max_seqlen=self.max_seqlen)([{"input_ids": x} for x, _ in _pairs(samples)])
        if not self.with_info:
            batch.pop("varlen_info")
        return batch


def collator(strategy: str, max_len: int, compiled: bool):
    if strategy == "hf-padded":
        return HFPadCollator(-(-(max_len + 1) // 8) * 8)
    return HFPackCollator(with_info=strategy.startswith("hf-varlen-"), max_seqlen=max_len if compiled else None)


def loss(model, batch):
    return model(**batch, use_cache=False).loss
