"""varlen: fast PyTorch transformers on variable-length sequences."""

from .attention import BACKENDS, BackendUnavailable, attention, attention_qkvpacked, backend_status, choose_backend
from .data import NestedCollator, PackCollator, PadCollator, PadToLongestCollator, SyntheticDataset, move_batch
from .models import Decoder, DecoderConfig, lm_loss
from .seqinfo import SeqInfo

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "Decoder",
    "DecoderConfig",
    "NestedCollator",
    "PackCollator",
    "PadCollator",
    "PadToLongestCollator",
    "SeqInfo",
    "SyntheticDataset",
    "attention",
    "attention_qkvpacked",
    "backend_status",
    "choose_backend",
    "lm_loss",
    "move_batch",
]
