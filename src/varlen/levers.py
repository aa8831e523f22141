"""The decoder's levers that ``varlen bench`` and ``varlen train`` share, as one typed object.

Each lever is one field: its flag (name, default, choices, help) is generated into both commands'
parsers from the field, the combinations that cannot run are refused by one :meth:`Levers.problems`
that both commands call, and ``run.json`` records the fields that differ from their defaults (so
checkpoints written before a lever existed still resume). Adding a lever is a field here, its effect
in :meth:`Levers.decoder_fields` (or the model's build), and a test.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from . import options
from .argtypes import dtype_name
from .models.mlp import GELU_FLAGS
from .options import flag_of

_flag = options.option


@dataclass(frozen=True)
class Levers:
    residual_dtype: str = _flag(
        "fp32", "the decoder's residual stream between blocks: fp32 (autocast's) or bf16 (half the bytes of every "
        "add, norm input and saved residual; weights stay fp32; needs bf16 autocast)",
        type=dtype_name("fp32", "bf16"), metavar="{fp32,bf16}")
    gelu: str = _flag("exact", "the decoder's GELU: exact (erf) or tanh (its approximation, GPT2's)",
                      choices=list(GELU_FLAGS))
    mlp_kernel: str = _flag(
        "torch", "the decoder's MLP: torch (Linear, GELU, Linear) or quack (quack-kernels' GEMMs with GELU and its "
        "derivative in their epilogues; needs --gelu tanh, bf16 autocast, Hopper or newer)", choices=["torch", "quack"])
    fp8: str | None = _flag(None, "the decoder's linear layers in float8 with this scaling (torchao)",
                            choices=["tensorwise", "rowwise"])

    @classmethod
    def add_flags(cls, p: argparse.ArgumentParser) -> None:
        options.add_flags(cls, p)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Levers:
        return options.from_args(cls, args)

    def changed(self) -> dict[str, object]:
        """The fields set away from their defaults, as the flags spell them (what run.json records)."""
        return options.changed(self)

    def problems(self, model: str, dtype: str) -> list[str]:
        """Why these levers cannot run on ``model`` (``decoder`` is varlen's own) under autocast to
        ``dtype`` (``bf16``, or ``fp32`` for none): one line each, empty when they can."""
        out = []
        changed = [f"{flag_of(k)} {v}" for k, v in self.changed().items()]
        if changed and model != "decoder":
            verb = "is" if len(changed) == 1 else "are"
            out.append(f"{' and '.join(changed)} {verb} the decoder's; --model {model} keeps its own layers")
        if self.residual_dtype == "bf16" and dtype != "bf16":
            out.append(f"--residual-dtype bf16 needs bf16 autocast; this run's autocast dtype is {dtype}")
        if self.mlp_kernel == "quack" and self.gelu != "tanh":
            out.append("--mlp-kernel quack: it fuses GELU's tanh approximation only: add --gelu tanh (and compare "
                       "with --gelu tanh --mlp-kernel torch, the same model)")
        elif self.mlp_kernel == "quack" and dtype != "bf16":
            out.append(f"--mlp-kernel quack: it runs 16-bit GEMMs under bf16 autocast; this run's autocast dtype is {dtype}")
        return out

    def unavailable(self, device_type: str) -> str | None:
        """Why a lever cannot run on this machine (a package, a GPU), or None."""
        if self.mlp_kernel != "quack":
            return None
        from .models.mlp import quack_unavailable

        why = "it needs a CUDA device" if device_type != "cuda" else quack_unavailable()
        return f"--mlp-kernel quack: {why}" if why else None

    @property
    def token_multiple(self) -> int | None:
        """What a batch's token count must be a multiple of (float8 GEMMs take whole tiles), or None."""
        from .fp8 import TOKEN_MULTIPLE

        return TOKEN_MULTIPLE if self.fp8 else None

    def convert(self, model) -> None:
        """The conversions made to a built model (before ``torch.compile``): FP8 linears."""
        if self.fp8:
            from .fp8 import apply_fp8

            apply_fp8(model, self.fp8)

    def decoder_fields(self) -> dict[str, object]:
        """The :class:`~varlen.models.DecoderConfig` fields these levers set (fp8 converts the built model)."""
        return {"residual_dtype": "bfloat16" if self.residual_dtype == "bf16" else None,
                "activation": GELU_FLAGS[self.gelu], "mlp_kernel": self.mlp_kernel}
