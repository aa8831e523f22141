"""Checkpoints through ``torch.distributed.checkpoint``: model and optimizer (sharded or not), plus
each rank's sampler position and RNG state, so a resumed run continues the same loss sequence."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(path: Path, model, optimizer, *, step: int, sampler_state: dict, rank: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path / "state"))
    torch.save({"rng": _rng_state(), "sampler": sampler_state, "step": step}, path / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:  # written last: a checkpoint without it is incomplete and ignored
        (path / "done.json").write_text(json.dumps({"step": step}))


def exists(path: Path) -> bool:
    return (path / "done.json").is_file()


def load(path: Path, model, optimizer, *, rank: int) -> dict:
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(path / f"rank{rank}.pt", weights_only=False)
    torch.set_rng_state(extra["rng"]["cpu"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    return extra
