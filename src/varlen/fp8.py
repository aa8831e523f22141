"""FP8 linears for training: torchao's float8 (``Float8Linear``), an opt-in precision lever.

The linear layers' GEMMs run in float8 (e4m3 forward, e5m2 for gradients) with a scale per tensor
(``tensorwise``) or per row (``rowwise``, finer, slower to cast); weights, optimizer state and
everything that is not a GEMM keep their precision. On Hopper the fp8 GEMM has twice the bf16
peak; whether the step gains depends on the GEMMs being large enough to pay for the casts
(measure with ``varlen bench --fp8``). Needs ``pip install torchao`` (``varlen[fp8]``).
"""

from __future__ import annotations

from torch import nn

RECIPES = ("tensorwise", "rowwise")
GEMM_MULTIPLE = 16  # float8 GEMMs take dims that are multiples of 16 only
# the token count is one of those dims (the inner dim of the weight gradient, grad_out^T @ x):
# collators pad packed rows to it (pad_to_multiple_of)
TOKEN_MULTIPLE = GEMM_MULTIPLE


def fp8_unavailable() -> str | None:
    """Why FP8 training cannot be set up here, or None."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        return f"torchao not installed (pip install torchao, or varlen[fp8]): {e}"
    return None


def fp8_eligible(module: nn.Module, fqn: str, skip: tuple[str, ...] = ("head",)) -> bool:
    """A linear layer fp8 GEMMs can take: both dims multiples of 16, and not one of ``skip`` (the LM
    head by default: its logits feed the loss directly and its output dim is the vocabulary)."""
    return (isinstance(module, nn.Linear) and fqn.split(".")[-1] not in skip
            and module.in_features % GEMM_MULTIPLE == 0 and module.out_features % GEMM_MULTIPLE == 0)


def apply_fp8(model: nn.Module, recipe: str, skip: tuple[str, ...] = ("head",)) -> list[str]:
    """Swap ``model``'s eligible ``nn.Linear`` layers (:func:`fp8_eligible`) for torchao's
    ``Float8Linear`` with the scaling ``recipe``, in place, before ``torch.compile`` and before
    wrapping in DDP/FSDP2. Returns the names of the converted layers; converting none is an error
    (a model of other layer types, e.g. GPT2's ``Conv1D``, would silently train in bf16)."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}: choose from {', '.join(RECIPES)}")
    why = fp8_unavailable()
    if why:
        raise RuntimeError(f"fp8: {why}")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    chosen = [fqn for fqn, m in model.named_modules() if fp8_eligible(m, fqn, skip)]
    if not chosen:
        raise ValueError(f"fp8: {type(model).__name__} has no nn.Linear layer with dims that are multiples of 16 "
                         f"(besides {', '.join(skip)}); nothing would run in fp8")
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=lambda m, fqn: fp8_eligible(m, fqn, skip))
    model.register_forward_pre_hook(_check_tokens, with_kwargs=True)
    return chosen


def _check_tokens(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse, in one line and before any GEMM, a batch whose token count float8 cannot take (the
    kernel's own error names a symbolic size inside the compiler)."""
    ids = args[0] if args else kwargs.get("input_ids")
    if ids is None:
        return
    if ids.is_nested:
        raise ValueError("fp8 linears: nested (jagged) input_ids have a token count of any size; float8 GEMMs need "
                         f"a multiple of {TOKEN_MULTIPLE}: use a packed or padded batch")
    if ids.numel() % TOKEN_MULTIPLE:
        raise ValueError(f"fp8 linears: a batch of {ids.numel()} tokens; float8 GEMMs need a multiple of "
                         f"{TOKEN_MULTIPLE} (pad the row: PackCollator(pad_to_multiple_of={TOKEN_MULTIPLE}))")
