"""The study's HuggingFace part (docs/study.md): a stock ``GPT2LMHeadModel`` of the study's size,
padded on HF's ``sdpa``, packed on HF's own ``sdpa`` path, and packed through ``varlen``.

HF models shift their labels (``Labels.UNSHIFTED``): a packed row ignores each sample's first
label, so it never learns across a sample boundary, and a padded row never uses it, so all
strategies train on the same predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data import PackCollator, PadCollator
from ..data.collate import as_pairs
from ..engine import Objective
from ..loss import Labels, num_shifted_targets
from .cases import Strategy, padded_length


def build_args(strategy: Strategy) -> tuple[str, dict]:
    """(backend, keywords) that build the strategy's GPT2: through varlen's kernel (``hf-varlen-<backend>``)
    or HF's own sdpa."""
    if strategy.layout == "hf-varlen":
        return strategy.backend, {"attn_implementation": "varlen"}
    return "auto", {"attn_implementation": "sdpa"}


@dataclass(frozen=True)
class HFCollator:
    """The synthetic ``(inputs, next tokens)`` samples as HF models take them: the labels are the
    inputs (``Labels.UNSHIFTED``), collated by ``inner``."""

    inner: PadCollator | PackCollator

    def __call__(self, samples):
        return self.inner([(x, x) for x, _ in as_pairs(samples)])


def collator(strategy: Strategy, max_len: int, compiled: bool) -> HFCollator:
    if strategy.layout == "hf-padded":
        return HFCollator(PadCollator(length=padded_length(max_len), labels=Labels.UNSHIFTED))
    return HFCollator(PackCollator(max_seqlen=max_len if compiled else None, labels=Labels.UNSHIFTED))


def objective(strategy: Strategy) -> Objective:
    """HF's own loss (its mean over the shifted targets) as the sum over them the step divides, in
    float64 so that the step's division gives back that mean and its gradient exactly; ``hf-packed``
    gives the row without ``varlen_info`` (HF finds the boundaries in ``position_ids``)."""
    def forward(model, batch):
        return model(**batch.hf_kwargs(labels=True, varlen_info=strategy.packed), use_cache=False).loss

    return Objective(forward, loss_sum=lambda mean, labels: mean.double() * num_shifted_targets(labels),
                     count=num_shifted_targets)
