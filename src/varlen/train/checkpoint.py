"""Crash-safe, verified checkpoints: model and optimizer through ``torch.distributed.checkpoint``
(sharded or not), each rank's sampler position and RNG state, and the run's configuration.

Layout of ``OUT/checkpoint``::

    step-00000012/        a complete checkpoint: state/ (DCP), rank<r>.pt, run.json, done.json
    step-00000015.tmp/    a save in progress, or one a crash cut short: never read
    step-00000014.failed-check/   a checkpoint that failed its check on --resume, set aside
    latest                the newest complete checkpoint's name (a hint for people; folders decide)

A save writes everything into the ``.tmp`` folder with every file flushed to disk (``fsync``),
writes ``done.json`` last (the step and every other file's size and SHA-256: the manifest), then
renames the folder into place (atomic within one file system) and flushes the parent folder. Only
after that are checkpoints older than the newest ``keep`` removed. So a kill at any instant leaves
the previous complete checkpoint, or the new one, whole. A save that fails (a full disk) removes
its ``.tmp`` folder and raises.

Loading checks the manifest first (a missing, truncated, flipped or extra file fails it, named),
and runs no code from the folder: DCP's pickled metadata goes through an unpickler that admits
only DCP's own metadata classes, non-tensor values and ``rank<r>.pt`` load with ``weights_only``.
What a manifest cannot catch is a checkpoint written to deceive: it is no signature.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

PREFIX, TMP, MANIFEST, FAILED = "step-", ".tmp", "done.json", ".failed-check"


class CheckpointError(Exception):
    """A checkpoint that fails its check or cannot be loaded: the message names the folder and file."""


# What a failed save raises: an OSError of this rank, or DCP's report of every rank's (a BaseException)
SAVE_ERRORS = (Exception, dcp.api.CheckpointException)


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


def _all_ok(ok: bool) -> bool:
    """Whether every rank's part went well (a barrier that also carries the answer)."""
    if not dist.is_initialized():
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def folder(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def complete(root: Path) -> list[Path]:
    """Checkpoints under ``root`` whose save finished (not yet verified), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and not p.name.endswith(TMP)
             and p.name[len(PREFIX):].isdigit() and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint, or None (:func:`newest_good` also verifies it)."""
    found = complete(root)
    return found[-1] if found else None


# ------------------------------------------------------------------ the manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def manifest(path: Path) -> dict[str, dict]:
    """Every file under ``path`` but the manifest itself: ``{relative path: {size, sha256}}``."""
    names = _files(path)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        digests = list(pool.map(lambda n: _sha256(path / n), names))
    return {n: {"size": (path / n).stat().st_size, "sha256": h} for n, h in zip(names, digests)}


def verify(path: Path) -> None:
    """Raise :class:`CheckpointError` naming the first file of ``path`` that its manifest does not vouch for."""
    try:
        listed = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path.name}/{MANIFEST}: no readable manifest ({type(e).__name__}: {e})") from None
    for name in _files(path):
        if name not in listed:
            raise CheckpointError(f"{path.name}/{name}: not in the checkpoint's manifest")
    for name, want in listed.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path.name}/{name}: missing")
        if f.stat().st_size != want["size"]:
            raise CheckpointError(f"{path.name}/{name}: {f.stat().st_size} bytes, the manifest says {want['size']}")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{path.name}/{name}: its SHA-256 differs from the manifest's (damaged)")


def newest_good(root: Path, say: Callable[[str], None] = print) -> Path | None:
    """The newest complete checkpoint that passes :func:`verify`; each one that fails is named
    through ``say``, renamed to ``<name>.failed-check`` and the next older one tried. None if
    there are none; CheckpointError if there are some and every one fails."""
    found = complete(root)
    failures = []
    for path in reversed(found):
        try:
            verify(path)
        except CheckpointError as e:
            failures.append(str(e))
            aside = path.with_name(path.name + FAILED)  # kept for a look, out of the way of a new save of its step
            os.replace(path, aside)
            say(f"checkpoint {path} fails its check ({e}); moved to {aside.name}, trying the one before")
            continue
        return path
    if failures:
        raise CheckpointError(f"no checkpoint in {root} passes its check: {'; '.join(failures)}")
    return None


# ------------------------------------------------------------------ saving
def save(root: Path, model, optimizer, *, step: int, sampler_state: dict, rank: int, config: dict,
         keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` (every rank calls this); returns its folder. On any
    failure the ``.tmp`` folder is removed and the error raised on every rank (the previous
    checkpoints stay as they were)."""
    final = folder(root, step)
    tmp = final.with_name(final.name + TMP)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{PREFIX}*{TMP}"):  # saves a crash cut short
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _all_ok(True)
    try:
        _save_parts(tmp, model, optimizer, step, sampler_state, rank)
        if rank == 0:
            _publish(root, tmp, final, step, config, keep)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _all_ok(True)
    return final


def _save_parts(tmp: Path, model, optimizer, step: int, sampler_state: dict, rank: int) -> None:
    """Every rank's share: DCP's state (collective: a failure on any rank raises on all) and its own
    ``rank<r>.pt``; then every rank learns whether all of them wrote theirs."""
    msd, osd = get_state_dict(model, optimizer)
    _fault("before state")
    with _single_process_quiet():
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "state"))  # DCP fsyncs its files
    _fault("after state")
    error = None
    try:
        _write(tmp / f"rank{rank}.pt", _serialize({"rng": _rng_state(), "sampler": sampler_state, "step": step}))
        _fault(f"after rank{rank}")
    except OSError as e:
        error = e
    if not _all_ok(error is None):
        raise error or OSError(f"another rank could not write its rank file into {tmp}")


def _publish(root: Path, tmp: Path, final: Path, step: int, config: dict, keep: int) -> None:
    """Rank 0, once every rank's files are on disk: run.json, the manifest last, then the rename."""
    _write(tmp / "run.json", json.dumps({"schema": RUN_SCHEMA, **config}, indent=1, sort_keys=True).encode())
    _fault("after run.json")
    _write(tmp / MANIFEST, json.dumps({"step": step, "files": manifest(tmp)}, indent=1).encode())
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


def _serialize(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def describe(e: BaseException) -> str:
    """One line for a failed save or load (DCP wraps each rank's error in a multi-line report)."""
    failures = getattr(e, "failures", None)
    if failures:
        r, (exc, _) = next(iter(failures.items()))
        return f"rank {r}: {describe(exc)}"
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if isinstance(e, pickle.UnpicklingError):  # torch's refusal is a page; the line naming the global says it
        lines = [x for x in lines if "GLOBAL" in x or "not part of" in x] or lines
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


# ------------------------------------------------------------------ loading, without running code
# What DCP's .metadata pickle may name: its own metadata records, shapes, dtypes, layouts, paths.
_METADATA_GLOBALS = {
    **{("torch.distributed.checkpoint.metadata", n): getattr(dcp_metadata, n)
       for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp.filesystem._StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    **{("pathlib", n): getattr(pathlib, n) for n in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return _METADATA_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata (refused, not run)")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with its metadata read through an allow-list instead of plain ``pickle``."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner with non-tensor values (the optimizer's hyper-parameters) read with
    ``weights_only=True``: numbers, strings and containers, nothing that runs."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load(path: Path, model, optimizer, *, rank: int) -> dict:
    """Restore model, optimizer and this rank's RNG from checkpoint folder ``path`` (verify it
    first: :func:`newest_good`); returns the rank's extra state (``step``, ``sampler``). A folder
    that cannot be read as a checkpoint raises :class:`CheckpointError`."""
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=SafeReader(path / "state"), planner=SafeLoadPlanner())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = torch.load(path / f"rank{rank}.pt", weights_only=True)
    except (pickle.UnpicklingError, dcp.api.CheckpointException, OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot be loaded ({describe(e)})") from None
    torch.set_rng_state(extra["rng"]["cpu"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    return extra


# run.json's layout: the settings a checkpoint is tied to (varlen train's CONFIG_FIELDS) beside
# "schema". 0 (no "schema" key) is what checkpoints written before the key held: the same fields,
# read as they are; 2 adds "settings", the run's whole configuration group by group as its flags
# spell it (for the reader: a resume compares the tied fields alone). A change to what a field
# means gets a new number and, here, the step that reads the older one.
RUN_SCHEMA = 2


def _run_json(path: Path) -> dict:
    config = json.loads((path / "run.json").read_text())
    schema = config.pop("schema", 0)
    if not isinstance(schema, int) or not 0 <= schema <= RUN_SCHEMA:
        raise CheckpointError(f"{path / 'run.json'}: schema {schema!r}, written by another version of varlen "
                              f"(this one reads schemas 0 to {RUN_SCHEMA}); resume it with that version")
    return config


def config_of(path: Path) -> dict:
    """The settings a checkpoint is tied to, without the schema number; a run.json of a later schema
    than this varlen reads raises :class:`CheckpointError`."""
    config = _run_json(path)
    config.pop("settings", None)
    return config


def settings_of(path: Path) -> dict | None:
    """The whole configuration of the run that wrote a checkpoint (schema 2 on), group by group."""
    return _run_json(path).get("settings")


def differences(saved: dict, now: dict) -> dict[str, tuple]:
    """Fields whose value differs between a checkpoint's configuration and this run's."""
    keys = sorted(set(saved) | set(now))
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
