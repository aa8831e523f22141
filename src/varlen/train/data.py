"""Training data: synthetic lengths (the study's), a JSONL file of token ids, or an HF dataset."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..data import IGNORE_INDEX, PackCollator, SyntheticDataset
from ..data.collate import filler_lengths
from ..seqinfo import SeqInfo


class TokenDataset(Dataset):
    """Samples of token ids -> ``(input_ids, targets)`` shifted by one; lengths known up front."""

    def __init__(self, rows: list[list[int]], max_len: int | None = None):
        rows = [r[: max_len + 1] if max_len else r for r in rows]
        self.rows = [r for r in rows if len(r) >= 2]  # a sample needs one input and one target
        if not self.rows:
            raise ValueError("no sample with at least 2 tokens")
        self.lengths = [len(r) - 1 for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        t = torch.tensor(self.rows[i], dtype=torch.long)
        return t[:-1], t[1:]


def load(spec: str, *, num_samples: int, max_len: int, vocab_size: int, seed: int):
    """``uniform`` / ``lognormal`` / ``fixed`` / a lengths file: synthetic; ``*.jsonl``: one sample a
    line (a list of ids, or an object with ``input_ids``); ``hf:NAME_OR_PATH[:split]``: an HF
    ``datasets`` dataset with an ``input_ids`` column (a saved dataset folder or a hub name)."""
    if spec.endswith(".jsonl"):
        rows = []
        for line in Path(spec).read_text().splitlines():
            if line.strip():
                obj = json.loads(line)
                rows.append(obj["input_ids"] if isinstance(obj, dict) else obj)
        return TokenDataset(rows, max_len)
    if spec.startswith("hf:"):
        try:
            import datasets
        except ImportError as e:
            raise SystemExit(f"varlen train: --data hf:... needs the datasets package ({e})") from e
        name, _, split = spec[3:].partition(":")
        ds = datasets.load_from_disk(name) if Path(name).exists() else datasets.load_dataset(name, split=split or "train")
        if isinstance(ds, datasets.DatasetDict):
            if (split or "train") not in ds:
                raise SystemExit(f"varlen train: {name} has splits {list(ds)}; name one: hf:{name}:SPLIT")
            ds = ds[split or "train"]
        if "input_ids" not in ds.column_names:
            raise SystemExit(f"varlen train: {name} has columns {ds.column_names}, no input_ids "
                             "(tokenize it first: dataset.map(lambda r: tokenizer(r['text'])))")
        return TokenDataset(list(ds["input_ids"]), max_len)
    return SyntheticDataset(num_samples, max_len=max_len, vocab_size=vocab_size, length_dist=spec, seed=seed)


class TrainCollator:
    """A rank's share of a step -> one packed row; an empty share -> one ignored filler token, so
    the rank still runs forward/backward and its collectives match the others'."""

    def __init__(self, pad_to: int | None = None, max_seqlen: int | None = None, hf: bool = False):
        self.pack = PackCollator(max_seqlen=max_seqlen, pad_to=pad_to)
        self.pad_to, self.hf = pad_to, hf

    def __call__(self, samples):
        if samples:
            batch = self.pack(samples)
            batch["num_tokens"] = sum(len(s[0]) for s in samples)
        else:
            n = self.pad_to or 1
            batch = {"input_ids": torch.zeros(n, dtype=torch.long), "labels": torch.full((n,), IGNORE_INDEX),
                     "info": SeqInfo.from_lengths(filler_lengths(n, self.pack.max_seqlen),
                                                  max_seqlen=self.pack.max_seqlen),
                     "num_tokens": 0}
        if self.hf:  # HF models take [1, T] rows, position_ids, and varlen's metadata by name
            info = batch.pop("info")
            batch = {"input_ids": batch["input_ids"][None], "labels": batch["labels"][None],
                     "position_ids": info.position_ids[None], "varlen_info": info, "num_tokens": batch["num_tokens"]}
        return batch

