"""varlen: fast PyTorch transformers on variable-length sequences."""

from .attention import BACKENDS, BackendUnavailable, attention, attention_qkvpacked, backend_status, choose_backend
from .data import (NestedBatch, NestedCollator, PackCollator, PackedBatch, PackRowsCollator, PadCollator, PaddedBatch,
                   PadToLongestCollator, SyntheticDataset, move_batch)
from .loss import IGNORE_INDEX, Labels, lm_loss
from .models import Decoder, DecoderConfig
from .seqinfo import SeqInfo

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "Decoder",
    "DecoderConfig",
    "NestedBatch",
    "NestedCollator",
    "PackCollator",
    "PackedBatch",
    "PackRowsCollator",
    "PadCollator",
    "PaddedBatch",
    "PadToLongestCollator",
    "SeqInfo",
    "SyntheticDataset",
    "attention",
    "attention_qkvpacked",
    "backend_status",
    "choose_backend",
    "lm_loss",
    "IGNORE_INDEX",
    "Labels",
    "move_batch",
]
