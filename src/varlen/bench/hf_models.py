"""The study's HuggingFace part (docs/study.md): a stock ``GPT2LMHeadModel`` of the study's size,
padded on HF's ``sdpa``, packed on HF's own ``sdpa`` path, and packed through ``varlen``.

HF models shift their labels (``Labels.UNSHIFTED``): a packed row ignores each sample's first
label, so it never learns across a sample boundary, and a padded row never uses it, so all
strategies train on the same predictions.
"""

from __future__ import annotations

from ..data.collate import as_pairs, pad_pairs
from ..loss import IGNORE_INDEX
from ..models import HF_GPT2, DecoderConfig
from .cases import Strategy, padded_length



def gpt2(cfg: DecoderConfig, strategy: Strategy):
    """The strategy's GPT2: through varlen's kernel (``hf-varlen-<backend>``) or HF's own sdpa."""
    if strategy.layout == "hf-varlen":
        return HF_GPT2.build(cfg, strategy.backend, attn_implementation="varlen")
    return HF_GPT2.build(cfg, "auto", attn_implementation="sdpa")


class HFPadCollator:
    def __init__(self, length: int):
        self.length = length

    def __call__(self, samples):
        # HF shifts labels inside its loss: labels are the inputs themselves
        return pad_pairs([(x, x) for x, _ in as_pairs(samples)], self.length, 0, IGNORE_INDEX)


class HFPackCollator:
    def __init__(self, with_info: bool, max_seqlen: int | None):
        self.with_info, self.max_seqlen = with_info, max_seqlen

    def __call__(self, samples):
        from ..hf import VarlenCollator

        batch = VarlenCollator(max_seqlen=self.max_seqlen)([{"input_ids": x} for x, _ in as_pairs(samples)])
        if not self.with_info:
            batch.pop("varlen_info")
        return batch


def collator(strategy: Strategy, max_len: int, compiled: bool):
    if strategy.layout == "hf-padded":
        return HFPadCollator(padded_length(max_len))
    return HFPackCollator(with_info=strategy.layout == "hf-varlen", max_seqlen=max_len if compiled else None)


def loss(model, batch):
    return model(**batch, use_cache=False).loss
