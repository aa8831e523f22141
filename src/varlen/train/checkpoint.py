"""Crash-safe checkpoints: model and optimizer through ``torch.distributed.checkpoint`` (sharded
or not), each rank's sampler position and RNG state, and the run's configuration.

Layout of ``OUT/checkpoint``::

    step-00000012/        a complete checkpoint: state/ (DCP), rank<r>.pt, run.json, done.json
    step-00000015.tmp/    a save in progress, or one a crash cut short: never read
    latest                the newest complete checkpoint's name (a hint for people; folders decide)

A save writes everything into the ``.tmp`` folder with every file flushed to disk (``fsync``),
writes ``done.json`` last, then renames the folder into place (atomic within one file system)
and flushes the parent folder. Only after that are checkpoints older than the newest ``keep``
removed. So a kill at any instant leaves the previous complete checkpoint, or the new one, whole;
resuming takes the newest folder that has ``done.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

PREFIX, TMP = "step-", ".tmp"


def _fault(point: str) -> None:
    """Called at every step of a save; tests replace it to cut a save short at that point."""


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group that it assumes one process: so it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def folder(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and not p.name.endswith(TMP)
             and (p / "done.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete(root)
    return found[-1] if found else None


def save(root: Path, model, optimizer, *, step: int, sampler_state: dict, rank: int, config: dict,
         keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` (every rank calls this); returns its folder."""
    final = folder(root, step)
    tmp = final.with_name(final.name + TMP)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{PREFIX}*{TMP}"):  # saves a crash cut short
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    msd, osd = get_state_dict(model, optimizer)
    _fault("before state")
    with _single_process_quiet():
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "state"))  # DCP fsyncs its files
    _fault("after state")
    extra = {"rng": _rng_state(), "sampler": sampler_state, "step": step}
    buf = _serialize(extra)
    _write(tmp / f"rank{rank}.pt", buf)
    _fault(f"after rank{rank}")
    _barrier()
    if rank == 0:
        _write(tmp / "run.json", json.dumps(config, indent=1, sort_keys=True).encode())
        _fault("after run.json")
        _write(tmp / "done.json", json.dumps({"step": step}).encode())  # the marker, last inside
        _fsync(tmp)
        _fault("after marker")
        os.replace(tmp, final)  # publish
        _fsync(root)
        _fault("after publish")
        _write(root / "latest.tmp", final.name.encode())
        os.replace(root / "latest.tmp", root / "latest")
        _fault("after latest")
        for old in complete(root)[:-keep]:
            shutil.rmtree(old)
        _fault("after prune")
    _barrier()
    return final


def _serialize(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load(path: Path, model, optimizer, *, rank: int) -> dict:
    """Restore model, optimizer and this rank's RNG from checkpoint folder ``path``; returns the
    rank's extra state (``step``, ``sampler``)."""
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(path / f"rank{rank}.pt", weights_only=True)
    torch.set_rng_state(extra["rng"]["cpu"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    return extra


def config_of(path: Path) -> dict:
    return json.loads((path / "run.json").read_text())


def differences(saved: dict, now: dict) -> dict[str, tuple]:
    """Fields whose value differs between a checkpoint's configuration and this run's."""
    keys = sorted(set(saved) | set(now))
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
