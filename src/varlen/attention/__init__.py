"""One entry point over every packed-sequence attention kernel."""

from .api import (
    AUTO_ORDER,
    BACKENDS,
    BackendUnavailable,
    attention,
    attention_qkvpacked,
    backend_reasons,
    backend_status,
    check_inputs,
    choose_backend,
    kernel_name,
    pads_to_max_seqlen,
)

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BackendUnavailable",
    "attention",
    "attention_qkvpacked",
    "backend_reasons",
    "backend_status",
    "check_inputs",
    "choose_backend",
    "kernel_name",
    "pads_to_max_seqlen",
]
