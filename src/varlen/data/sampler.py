"""Token-budget packing: batches of a fixed number of tokens, not of samples.

``TokenBudgetSampler`` is a ``batch_sampler`` for a ``DataLoader``: it shuffles the samples, and
inside each window of the shuffled order packs them best-fit decreasing into bins of
``max_tokens`` (one packed row) or of ``row_len`` (rows of HF's ``[B, L]`` packed format, grouped
``max_tokens // row_len`` rows to a batch), as TRL's BFD packing and axolotl's multipack do.

With ``world_size > 1`` a bin is one *global* batch; its samples are split across the ranks by a
cost model (linear work ~ tokens, attention ~ sum of squared lengths), longest-cost first onto the
least-loaded rank, so that the ranks finish their step together. Every rank walks the same global
plan, so all get the same number of steps and, over an epoch, every sample lands on exactly one
rank once. A rank's share can be empty when a global batch holds fewer samples than ranks; the
trainer then runs a zero-weight step so that collectives still match.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from ..measure.flops import attention_flops, linear_flops
from .binpack import best_fit_decreasing
from .collate import PackCollator, PackRowsCollator


@dataclass(frozen=True)
class CostModel:
    """Relative time of a sample of length ``n``: ``per_seq + per_token * n + per_token_sq * n**2``.

    ``per_seq`` is what a sequence costs whatever its length (attention kernels work in blocks of
    rows, so a 20-token sequence takes a whole block); it matters when shares hold many short ones.
    """

    per_token: float = 1.0
    per_token_sq: float = 0.0
    per_seq: float = 0.0

    @classmethod
    def from_flops(cls, dim: int, n_layers: int, vocab_size: int, causal: bool = True,
                   attention_slowdown: float = 2.0) -> "CostModel":
        """FLOPs of the decoder (linear layers ~ 24 dim^2 a token a layer, attention ~ 4 dim n^2 a
        layer, halved when causal), attention weighted ``attention_slowdown`` times slower per FLOP
        than the GEMMs (FlashAttention reaches about half the GEMM rate at the study's lengths)."""
        linear = linear_flops(1, dim, n_layers, vocab_size)  # a token
        attn = attention_flops([1], dim, n_layers, causal) * attention_slowdown  # per squared length
        return cls(1.0, attn / linear)

    @classmethod
    def fit(cls, shares: Sequence[Sequence[int]], times: Sequence[float]) -> "CostModel":
        """The model whose cost of each share (the lengths of its samples) is proportional to its
        measured time, least squares over ``[sequences, tokens, sum of squares]``, no weight
        negative; scaled to ``per_token = 1``. Needs shares that differ in more than their size."""
        if len(shares) != len(times) or len(shares) < 3:
            raise ValueError(f"fit needs >= 3 shares with a time each, got {len(shares)} and {len(times)}")
        x = torch.tensor([[len(s), sum(s), sum(n * n for n in s)] for s in shares], dtype=torch.float64)
        y = torch.tensor(list(times), dtype=torch.float64)
        scale = x.abs().amax(0).clamp_min(1)  # columns differ by 10^6: solve on a comparable scale
        free = [0, 1, 2]
        while True:  # active-set least squares: drop a weight that comes out negative, refit the rest
            w = torch.linalg.lstsq(x[:, free] / scale[free], y[:, None]).solution[:, 0] / scale[free]
            if (w >= 0).all() or len(free) == 1:
                break
            free.pop(int(torch.argmin(w)))
        coef = [0.0, 0.0, 0.0]
        for k, v in zip(free, w.tolist()):
            coef[k] = max(v, 0.0)
        if coef[1] <= 0:
            raise ValueError("fit: the times do not grow with tokens; time shares of different sizes")
        err = float((x @ torch.tensor(coef, dtype=torch.float64) - y).norm() / y.norm())
        if err > 0.5:  # e.g. times that fall as shares grow: no weights of this model make them
            raise ValueError(f"fit: the model explains the times poorly (relative error {err:.2f})")
        return cls(1.0, coef[2] / coef[1], coef[0] / coef[1])

    def __call__(self, n: int) -> float:
        return self.per_seq + self.per_token * n + self.per_token_sq * n * n

    def share(self, lengths: Sequence[int]) -> float:
        """Cost of a share: the sum over its samples."""
        return sum(self(n) for n in lengths)


def split_across_ranks(samples: Sequence[int], lengths: Sequence[int], world_size: int, how: str,
                       cost: CostModel) -> list[list[int]]:
    """One global batch -> ``world_size`` shares.

    ``balanced``: longest-processing-time first, each sample onto the rank with the least cost so
    far; ``naive``: what a sample-count split does (equal counts, in the batch's shuffled order).
    """
    if how == "naive":  # equal sample counts, in the batch's (shuffled) order
        per, extra = divmod(len(samples), world_size)
        bounds = [r * per + min(r, extra) for r in range(world_size + 1)]
        return [list(samples[bounds[r]:bounds[r + 1]]) for r in range(world_size)]
    if how != "balanced":
        raise ValueError(f"split must be 'balanced' or 'naive', got {how!r}")
    c = {i: cost(lengths[i]) for i in samples}
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0.0] * world_size
    for i in sorted(samples, key=lambda i: (-c[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += c[i]
    # LPT leaves up to one sample's cost of imbalance, a lot when a batch holds only long samples:
    # move or swap samples between the busiest rank and another while that lowers the busiest.
    # The best partner of each sample is found by bisection, so this stays cheap at 8 ranks.
    for _ in range(8 * world_size):
        hi = max(range(world_size), key=lambda r: (load[r], -r))
        move, new_hi = None, load[hi]
        for lo in range(world_size):
            gap = load[hi] - load[lo]
            if gap <= 0:
                continue
            partners = sorted((c[b], b) for b in shares[lo])
            keys = [x for x, _ in partners]
            for a in shares[hi]:
                # a alone (d = c[a]), or swapped with b: d = c[a] - c[b], best near gap / 2
                j = bisect.bisect_left(keys, c[a] - gap / 2)
                for b in [None] + [partners[k][1] for k in (j - 1, j) if 0 <= k < len(partners)]:
                    d = c[a] - (c[b] if b is not None else 0.0)
                    if 0 < d < gap and max(load[hi] - d, load[lo] + d) < new_hi - 1e-9:
                        new_hi, move = max(load[hi] - d, load[lo] + d), (a, b, d, lo)
        if move is None:
            break
        a, b, d, lo = move
        shares[hi].remove(a)
        shares[lo].append(a)
        if b is not None:
            shares[lo].remove(b)
            shares[hi].append(b)
        load[hi] -= d
        load[lo] += d
    return shares


class TokenBudgetSampler(Sampler[list[int]]):
    """Batches of sample indices holding at most ``max_tokens`` tokens (across all ranks).

    Args:
        lengths: token count of every sample (``len(input_ids)``).
        max_tokens: the budget of one batch; with ``world_size > 1`` the budget of the global batch.
        row_len: pack into rows of ``row_len`` tokens, ``max_tokens // row_len`` rows a batch
            (the ``[B, L]`` packed format); default: one row of ``max_tokens``.
        window: samples packed together; larger packs tighter, smaller mixes more (default:
            about 32 batches' worth).
        static: every batch collates to exactly ``max_tokens`` tokens (filler at the tail, see
            :meth:`collator`), so shapes never change: what CUDA graphs need.
        truncate: cut samples longer than a bin to fit (default: a clear error).
        world_size, rank, split, cost: the distributed split (see :func:`split_across_ranks`).
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, *, row_len: int | None = None,
                 window: int | None = None, shuffle: bool = True, seed: int = 0,
                 static: bool = False, truncate: bool = False, world_size: int = 1, rank: int = 0,
                 split: str = "balanced", cost: CostModel | None = None):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if row_len is not None and not 1 <= row_len <= max_tokens:
            raise ValueError(f"row_len must be in 1..max_tokens={max_tokens}, got {row_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if split not in ("balanced", "naive"):
            raise ValueError(f"split must be 'balanced' or 'naive', got {split!r}")
        self.capacity = row_len or max_tokens
        lengths = [int(n) for n in lengths]
        if not lengths:
            raise ValueError("no samples")
        too_long = [(i, n) for i, n in enumerate(lengths) if n > self.capacity]
        if too_long and not truncate:
            i, n = too_long[0]
            raise ValueError(
                f"sample {i} has {n} tokens, more than a batch row holds ({self.capacity}); "
                f"raise max_tokens/row_len or pass truncate=True ({len(too_long)} such samples)"
            )
        self.lengths = [min(n, self.capacity) for n in lengths]
        self.truncated = len(too_long)
        self.max_tokens, self.row_len = max_tokens, row_len
        self.rows_per_batch = max_tokens // row_len if row_len else 1
        # default window: about 32 batches' worth of samples, so only 1 bin in 32 is a leftover
        mean = sum(self.lengths) / len(self.lengths)
        self.window = window or max(1024, int(32 * max_tokens / mean))
        self.shuffle, self.seed = shuffle, seed
        self.static, self.world_size, self.rank, self.split = static, world_size, rank, split
        self.cost = cost or CostModel()
        self.epoch = 0
        self._start = 0  # batches of this epoch already handed out (resume)
        self._plan_cache: tuple[int, list[list[int]]] | None = None
        self._shares: dict[tuple[int, ...], list[list[int]]] = {}

    # ---------------------------------------------------------------- the plan
    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """The epoch's global batches (the same on every rank), deterministic in (seed, epoch)."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.lengths)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        batches: list[list[int]] = []
        for w in range(0, n, self.window):
            rows = best_fit_decreasing(self.lengths, order[w:w + self.window], self.capacity)
            if self.shuffle:  # BFD emits the big samples' bins first, each bin longest first
                rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
                rows = [[r[i] for i in torch.randperm(len(r), generator=g).tolist()] for r in rows]
            k = self.rows_per_batch
            batches += [sum(rows[i:i + k], []) for i in range(0, len(rows), k)]
        self._plan_cache = (epoch, batches)
        self._shares = {}
        return batches

    def _tokens(self, batch: Sequence[int]) -> int:
        return sum(self.lengths[i] for i in batch)

    def rows(self, batch: Sequence[int]) -> list[list[int]]:
        """A batch's samples grouped into rows of ``row_len`` (one row without ``row_len``)."""
        if not self.row_len:
            return [list(batch)]
        return best_fit_decreasing(self.lengths, batch, self.row_len)

    def efficiency(self, epoch: int | None = None) -> float:
        """Real tokens / budget over the epoch's global batches (1.0 = no filler at all)."""
        batches = self.global_batches(epoch)
        return sum(self._tokens(b) for b in batches) / (len(batches) * self.max_tokens)

    def shares(self, batch: Sequence[int]) -> list[list[int]]:
        key = tuple(batch)
        if key not in self._shares:  # computed once per global batch, not once per rank and pass
            self._shares[key] = split_across_ranks(batch, self.lengths, self.world_size, self.split, self.cost)
        return self._shares[key]

    # ---------------------------------------------------------------- Sampler
    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        start, self._start = self._start, 0  # a resumed position applies to one pass only
        for b in batches[start:]:
            yield self.shares(b)[self.rank] if self.world_size > 1 else list(b)

    def __len__(self) -> int:
        return len(self.global_batches()) - self._start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._start = 0

    def state_dict(self, batches_done: int) -> dict:
        """Where to resume: ``batches_done`` batches of the current epoch were consumed."""
        return {"seed": self.seed, "epoch": self.epoch, "batches_done": int(batches_done),
                "num_samples": len(self.lengths), "max_tokens": self.max_tokens, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        mine = {"seed": self.seed, "num_samples": len(self.lengths), "max_tokens": self.max_tokens}
        for k, v in mine.items():
            if state[k] != v:
                raise ValueError(f"sampler state is for {k}={state[k]}, this sampler has {k}={v}")
        self.epoch = state["epoch"]
        self._start = state["batches_done"]

    # ---------------------------------------------------------------- collating
    def collator(self, **kw):
        """The packing collator that matches: one row, or ``[B, row_len]`` rows; with ``static=True``
        every batch has the same shape (filler tokens / rows at the tail, ignored by the loss)."""
        if self.row_len:
            return PackRowsCollator(self.row_len, rows=self.rows_per_batch if self.static else None, **kw)
        return PackCollator(pad_to=self.max_tokens if self.static else None, **kw)
