"""``--export OUT``: the trained model as a ``save_pretrained`` folder (config, safetensors weights,
and the tokenizer it was trained with) that ``AutoModelForCausalLM.from_pretrained`` loads
without varlen. Written to ``OUT.tmp`` and renamed, so a crash never leaves half a folder as OUT."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn


def export_refusal(out: Path, model_name: str, hf: bool, overwrite: bool) -> str | None:
    """Why ``--export out`` cannot be written, said before any training, or None."""
    if not hf:
        return f"--export writes a transformers folder; --model {model_name} is varlen's own decoder (its checkpoints are in --out)"
    if out.exists() and not out.is_dir():
        return f"--export {out} is a file; it names a folder to create"
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        return f"--export {out} is a folder that is not empty; pass --overwrite to replace it"
    return None


def export(model: nn.Module, out: Path, tokenizer, main: bool) -> None:
    """Every rank takes part (FSDP2 gathers its shards); rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if c is not None}.values()
    chosen = [(c, c.__dict__.pop("varlen_backend")) for c in configs if "varlen_backend" in c.__dict__]
    try:  # varlen's kernel choice stays out of the folder: it loads where varlen is not installed
        model.save_pretrained(tmp, state_dict=state)
    finally:
        for c, backend in chosen:
            c.varlen_backend = backend
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
