"""Training data: synthetic lengths (the study's), a JSONL file or an HF dataset of token ids, text or
chat conversations (the last two tokenised with the model's tokenizer, ``varlen.train.text``)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..data import SyntheticDataset
from ..loss import IGNORE_INDEX
from .text import TextError, chat_ids, text_ids


class DataError(ValueError):
    """A bad data row: the message names the file (or dataset) and the line (or row)."""


@dataclass
class DataReport:
    """What loading did to the rows, for the run's summary."""

    rows: int = 0  # rows read
    dropped_short: int = 0  # rows of fewer than 2 tokens (no input/target pair); blank lines too
    truncated: int = 0  # rows cut to the longest sample (--truncate)
    dropped_long: int = 0  # rows longer than that, dropped (--drop-long)


def check_row(row, where: str, vocab_size: int, tokenizer=None) -> tuple[list[int], list[bool] | None]:
    """One row as ``(ids, trained)``: token ids (a list, ``{"input_ids"}``, ``{"text"}`` tokenised with
    EOS, ``{"messages"}`` through the chat template) and which tokens are trained targets (None:
    all); a :class:`DataError` naming ``where`` and what to do otherwise."""
    trained = None
    if isinstance(row, dict):
        if "input_ids" in row:
            row = row["input_ids"]
        elif "text" in row or "messages" in row:
            return _text_row(row, where, vocab_size, tokenizer)
        else:
            raise DataError(f"{where}: an object without 'input_ids', 'text' or 'messages' (keys: "
                            f"{', '.join(map(str, row)) or 'none'}); each line is a list of token ids or an object "
                            "with one of those")
    if not isinstance(row, (list, tuple)):
        raise DataError(f"{where}: expected a list of token ids, got {type(row).__name__}")
    return _check_ids(row, where, vocab_size), trained


def _check_ids(row, where: str, vocab_size: int) -> list[int]:
    for j, t in enumerate(row):
        if isinstance(t, bool) or not isinstance(t, int):
            raise DataError(f"{where}: token {j} is {t!r}, not an integer id; tokenize the text first")
        if not 0 <= t < vocab_size:
            raise DataError(f"{where}: token {j} is {t}, outside the model's vocabulary 0..{vocab_size - 1}")
    return list(row)


def _text_row(row: dict, where: str, vocab_size: int, tokenizer) -> tuple[list[int], list[bool] | None]:
    key = "text" if "text" in row else "messages"
    if tokenizer is None:
        raise DataError(f"{where}: a '{key}' row needs the model's tokenizer: train a model folder (--model DIR "
                        "with tokenizer files), or give token ids")
    try:
        ids, trained = (text_ids(tokenizer, row["text"], where), None) if key == "text" else \
            chat_ids(tokenizer, row["messages"], where)
    except TextError as e:
        raise DataError(str(e)) from None
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise DataError(f"{where}: the tokenizer gave id {bad}, outside the model's vocabulary 0..{vocab_size - 1}")
    return ids, trained


def fit_rows(rows, longest: int, too_long: str, report: DataReport, source: str):
    """Rows with at least 2 tokens and at most ``longest + 1`` (a row of n tokens makes a sample
    of n - 1 inputs), the long ones handled as ``too_long`` says: "error", "truncate" or "drop";
    yielded one at a time. ``rows`` yields ``(where, (ids, trained))``; ``source`` names the file
    or dataset in messages."""
    kept = 0
    for where, (ids, trained) in rows:
        report.rows += 1
        if len(ids) < 2 or (trained is not None and not any(trained[1:])):
            report.dropped_short += 1
            continue
        if len(ids) - 1 > longest:
            if too_long == "error":
                raise DataError(f"{where}: a sample of {len(ids) - 1} tokens, longer than the longest a step takes "
                                f"({longest}); pass --truncate or --drop-long, or raise --max-len / --max-tokens")
            if too_long == "drop":
                report.dropped_long += 1
                continue
            report.truncated += 1
            ids, trained = ids[: longest + 1], trained if trained is None else trained[: longest + 1]
        kept += 1
        yield ids, trained
    if not kept:
        raise DataError(f"{source}: no sample left: {report.rows} rows, {report.dropped_short} with fewer than 2 "
                        f"tokens (or no trained target), {report.dropped_long} too long")


def jsonl_rows(path: Path, vocab_size: int, tokenizer=None):
    """``(where, ids)`` for every non-blank line of a JSONL file, streamed, checked."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                yield where, ([], None)  # counted with the short rows
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            yield where, check_row(obj, where, vocab_size, tokenizer)


class TokenDataset(Dataset):
    """Samples of token ids -> ``(input_ids, targets)`` shifted by one (``Labels.SHIFTED``), a
    target ignored where its token is not trained (a chat's prompt).

    The rows are written as they come into one flat file of int32 ids (and one of a byte per id
    saying whether it is trained) and mapped back into memory: 4-5 bytes a token and 8 a row in
    this process, however large the corpus, the pages read as samples are. The files are unlinked
    once mapped, so nothing is left behind, even by a killed run."""

    def __init__(self, rows):
        with tempfile.TemporaryDirectory(prefix="varlen-tokens-") as tmp:
            ids_path, mask_path = Path(tmp) / "ids.i32", Path(tmp) / "trained.u8"
            offsets, masked = [0], False
            with open(ids_path, "wb") as ids_file, open(mask_path, "wb") as mask_file:
                for ids, trained in rows:
                    ids_file.write(array("i", ids).tobytes())
                    mask_file.write(bytes(trained) if trained is not None else b"\x01" * len(ids))
                    masked |= trained is not None
                    offsets.append(offsets[-1] + len(ids))
            n = offsets[-1]
            self.ids = torch.from_file(str(ids_path), shared=True, size=n, dtype=torch.int32)
            self.trained = torch.from_file(str(mask_path), shared=True, size=n, dtype=torch.bool) if masked else None
        self.offsets = torch.tensor(offsets, dtype=torch.int64)
        self.lengths = (self.offsets[1:] - self.offsets[:-1] - 1).tolist()

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> tuple[list[int], list[bool] | None]:
        """Row ``i`` as it was read: its ids and which are trained (None: all)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b].tolist(), None if self.trained is None else self.trained[a:b].tolist()

    @property
    def rows(self) -> list[tuple[list[int], list[bool] | None]]:
        """Every row (for small data: tests, inspection)."""
        return [self.row(i) for i in range(len(self))]

    def __getitem__(self, i):
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        t = self.ids[a:b].long()
        targets = t[1:]
        if self.trained is not None:
            targets = targets.masked_fill(~self.trained[a + 1:b], IGNORE_INDEX)
        return t[:-1], targets


def load(spec: str, *, num_samples: int, max_len: int, vocab_size: int, seed: int, too_long: str = "error",
         report: DataReport | None = None, longest: int | None = None, tokenizer=None):
    """``uniform`` / ``lognormal`` / ``fixed`` / a lengths file: synthetic; ``*.jsonl``: one sample a
    line (a list of ids, or an object with ``input_ids``, ``text`` or ``messages``);
    ``hf:NAME_OR_PATH[:split]``: an HF ``datasets`` dataset with one of those columns (a saved
    dataset folder or a hub name). Text and chat need ``tokenizer``.

    Token files are checked row by row before training (one streamed pass): every problem is a
    :class:`DataError` naming the file and line (or dataset row). ``max_len`` is the longest
    sample (synthetic lengths reach it); token rows longer than ``longest`` (default ``max_len``:
    what a step takes) follow ``too_long``. ``report`` collects the counts."""
    report = report if report is not None else DataReport()
    longest = min(max_len, longest or max_len)
    if spec.endswith(".jsonl"):
        return TokenDataset(fit_rows(jsonl_rows(Path(spec), vocab_size, tokenizer), longest, too_long, report, spec))
    if spec.startswith("hf:"):
        ds, name = hf_dataset(spec)
        column = next(c for c in ("input_ids", "text", "messages") if c in ds.column_names)
        rows = ((f"{name} row {i}", check_row(r if column == "input_ids" else {column: r}, f"{name} row {i}",
                                              vocab_size, tokenizer)) for i, r in enumerate(ds[column]))
        return TokenDataset(fit_rows(rows, longest, too_long, report, name))
    return SyntheticDataset(num_samples, max_len=max_len, vocab_size=vocab_size, length_dist=spec, seed=seed)


def hf_dataset(spec: str):
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"--data hf:... needs the datasets package ({e}); pip install -e '.[train]'") from e
    name, _, split = spec[3:].partition(":")
    if not name:
        raise DataError("--data hf: names no dataset (hf:DIR[:SPLIT] or hf:HUB_NAME[:SPLIT])")
    try:
        ds = datasets.load_from_disk(name) if Path(name).exists() else datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # datasets raises many kinds here (not found, not a dataset, no connection)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = "a folder that is no saved dataset" if Path(name).is_dir() else "no saved dataset folder here"
        raise DataError(f"{name}: {what}, and not a dataset the hub gave ({first})") from None
    if isinstance(ds, datasets.DatasetDict):
        if (split or "train") not in ds:
            raise DataError(f"{name} has splits {list(ds)}; name one: hf:{name}:SPLIT")
        ds = ds[split or "train"]
    elif split and Path(name).exists():
        raise DataError(f"{name} is one split saved alone (a Dataset, not a DatasetDict), so ':{split}' names nothing "
                        f"in it; pass hf:{name}")
    if not {"input_ids", "text", "messages"} & set(ds.column_names):
        raise DataError(f"{name} has columns {ds.column_names}: none of input_ids, text, messages")
    return ds, name


def fingerprint(spec: str) -> str:
    """What identifies the data of a run: a file's SHA-256 (streamed), a saved HF dataset's own
    fingerprint, or the synthetic spec itself."""
    path = Path(spec)
    if path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "sha256:" + h.hexdigest()
    if spec.startswith("hf:"):
        ds, _ = hf_dataset(spec)
        return "hf:" + str(getattr(ds, "_fingerprint", "unknown"))
    return spec
