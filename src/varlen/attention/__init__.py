"""One entry point over every packed-sequence attention kernel, and the padded and nested layouts'
attention (what the decoder's other batch layouts run): the only names models import."""

from .api import (
    AUTO_ORDER,
    BACKENDS,
    BackendUnavailable,
    attention,
    attention_qkvpacked,
    backend_reasons,
    backend_status,
    backend_unavailable,
    check_inputs,
    choose_backend,
    kernel_name,
    prepare,
)
from .nested import nested_sdpa
from .sdpa import padded_attention, padded_mask

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BackendUnavailable",
    "attention",
    "attention_qkvpacked",
    "backend_reasons",
    "backend_status",
    "backend_unavailable",
    "check_inputs",
    "choose_backend",
    "kernel_name",
    "nested_sdpa",
    "padded_attention",
    "padded_mask",
    "prepare",
]
