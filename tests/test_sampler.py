"""Token-budget packing: budgets, coverage, determinism, resume, the distributed split."""

from __future__ import annotations

import random
import statistics

import pytest
import torch
from torch.utils.data import DataLoader

from varlen.data import (
    IGNORE_INDEX,
    CostModel,
    PackRowsCollator,
    SyntheticDataset,
    TokenBudgetSampler,
    sample_lengths,
    split_across_ranks,
)


def _lengths(dist="uniform", n=3000, max_len=1023, seed=0):
    return sample_lengths(n, dist, max_len, seed)


@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("split", ["balanced", "naive"])
def test_epoch_covers_every_sample_once_on_every_world_size(world_size, split):
    lengths = _lengths("lognormal", n=1500)
    samplers = [TokenBudgetSampler(lengths, 16384, world_size=world_size, rank=r, split=split, seed=3)
                for r in range(world_size)]
    per_rank = [list(s) for s in samplers]
    assert len({len(p) for p in per_rank}) == 1, "every rank must get the same number of steps"
    seen = sorted(i for p in per_rank for batch in p for i in batch)
    assert seen == list(range(len(lengths)))
    for step in zip(*per_rank):  # the ranks' shares of one global batch stay within its budget
        assert sum(lengths[i] for share in step for i in share) <= 16384


@pytest.mark.parametrize("row_len", [None, 2048])
def test_budget_is_never_exceeded(row_len):
    lengths = _lengths(n=2000)
    s = TokenBudgetSampler(lengths, 8192, row_len=row_len, window=512, seed=1)
    for batch in s:
        assert sum(lengths[i] for i in batch) <= 8192
        for row in s.rows(batch):
            assert sum(lengths[i] for i in row) <= (row_len or 8192)


def test_packs_tightly_and_reports_it():
    lengths = _lengths(n=4000)
    s = TokenBudgetSampler(lengths, 16384)
    tokens = [sum(lengths[i] for i in b) for b in s]
    assert s.efficiency() == pytest.approx(sum(tokens) / (len(tokens) * 16384))
    assert s.efficiency() > 0.97  # best-fit decreasing over 4096-sample windows


def test_deterministic_for_a_seed_and_epoch():
    lengths = _lengths(n=800)
    a, b = TokenBudgetSampler(lengths, 4096, seed=5), TokenBudgetSampler(lengths, 4096, seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(TokenBudgetSampler(lengths, 4096, seed=6)) != first


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_mid_epoch_equals_uninterrupted(world_size):
    lengths = _lengths(n=1200)
    make = lambda: TokenBudgetSampler(lengths, 8192, seed=2, world_size=world_size, rank=world_size - 1)
    full = make()
    full.set_epoch(4)
    want = list(full)
    part = make()
    part.set_epoch(4)
    it = iter(part)
    head = [next(it) for _ in range(7)]
    state = part.state_dict(batches_done=7)
    resumed = make()
    resumed.load_state_dict(state)
    assert len(resumed) == len(want) - 7
    assert head + list(resumed) == want
    assert list(resumed) == want  # the resume point applies to one pass only


def test_state_of_another_sampler_is_refused():
    state = TokenBudgetSampler(_lengths(n=100), 4096, seed=1).state_dict(3)
    with pytest.raises(ValueError, match="seed"):
        TokenBudgetSampler(_lengths(n=100), 4096, seed=2).load_state_dict(state)


def test_too_long_sample_is_an_error_or_truncated_on_request():
    lengths = [10, 5000, 20]
    with pytest.raises(ValueError, match="sample 1 has 5000 tokens"):
        TokenBudgetSampler(lengths, 4096)
    s = TokenBudgetSampler(lengths, 4096, truncate=True)
    assert s.lengths == [10, 4096, 20] and s.truncated == 1


def test_balanced_split_evens_out_the_ranks():
    lengths = _lengths("lognormal", n=4000)
    cost = CostModel.from_flops(1024, 24, 1024)

    def spread(split):
        s = TokenBudgetSampler(lengths, 4 * 16384, world_size=4, split=split, cost=cost)
        ratios = []
        for b in s.global_batches():
            loads = [sum(cost(lengths[i]) for i in share) for share in s.shares(b)]
            ratios.append(max(loads) / statistics.mean(loads))
        return statistics.mean(ratios)

    naive, balanced = spread("naive"), spread("balanced")
    assert balanced < 1.02 < naive, (naive, balanced)


def test_works_as_batch_sampler_with_workers():
    ds = SyntheticDataset(300, max_len=200)
    s = TokenBudgetSampler(ds.lengths, 2048, static=True)
    loader = DataLoader(ds, batch_sampler=s, collate_fn=s.collator(), num_workers=2)
    seen, shapes = 0, set()
    for batch in loader:
        real = batch.labels != IGNORE_INDEX
        seen += int(real.sum())
        shapes.add(tuple(batch.input_ids.shape))
        assert batch.info.total_tokens == 2048
    assert seen == sum(ds.lengths)
    assert shapes == {(2048,)}, "static=True: one shape for every batch"


def test_packed_rows_collator_matches_hf_format():
    ds = SyntheticDataset(40, max_len=60, seed=4)
    s = TokenBudgetSampler(ds.lengths, 4 * 128, row_len=128, static=True)
    coll = s.collator()
    assert isinstance(coll, PackRowsCollator)
    for idx in s:
        batch = coll([ds[i] for i in idx])
        hf = batch.hf_kwargs()
        assert hf["input_ids"].shape == (4, 128) and batch.row_len == 128 and hf["varlen_info"] is batch.info
        info, pos = batch.info, hf["position_ids"]
        assert torch.equal(pos.flatten(), info.position_ids)
        assert (pos[:, 0] == 0).all()  # every row begins a sample (or filler)
        assert int((batch.labels != IGNORE_INDEX).sum()) == sum(ds.lengths[i] for i in idx) == batch.tokens
        # no sequence crosses a row boundary
        cu = info.cu_seqlens.tolist()
        assert set(range(0, 4 * 128 + 1, 128)) <= set(cu)


def test_cost_model_fit_recovers_the_weights_that_made_the_times():
    rng = random.Random(0)
    shares = [[rng.randint(1, 1023) if k % 2 else rng.randint(1, 64) for _ in range(rng.randint(5, 80))]
              for k in range(30)]
    true = CostModel(1.0, 2e-4, 30.0)
    fitted = CostModel.fit(shares, [3e-6 * true.share(s) for s in shares])  # any time unit
    assert fitted.per_token == 1.0
    assert fitted.per_token_sq == pytest.approx(2e-4, rel=1e-6) and fitted.per_seq == pytest.approx(30.0, rel=1e-6)
    # times that only count tokens: no per-sequence or attention weight, not a negative one
    flat = CostModel.fit(shares, [float(sum(s)) for s in shares])
    assert (flat.per_token_sq, flat.per_seq) == (pytest.approx(0.0, abs=1e-12), pytest.approx(0.0, abs=1e-9))
    # a time that falls with sequences would need a negative per_seq: it is held at 0 and the rest refit
    neg = CostModel.fit(shares, [sum(s) + 1e-4 * sum(n * n for n in s) - 0.5 * len(s) for s in shares])
    assert neg.per_seq == 0.0 and neg.per_token_sq > 0
    with pytest.raises(ValueError, match=">= 3 shares"):
        CostModel.fit(shares[:2], [1.0, 2.0])
    with pytest.raises(ValueError, match="fit: "):  # times that fall as the shares grow
        CostModel.fit([[1] * k for k in (1, 2, 3)], [3.0, 2.0, 1.0])


def test_per_sequence_cost_moves_short_samples_apart():
    # with a per-sequence weight, a rank holding many short samples is charged for them
    lengths = [10] * 20 + [200]
    plain = split_across_ranks(list(range(21)), lengths, 2, "balanced", CostModel())
    per_seq = split_across_ranks(list(range(21)), lengths, 2, "balanced", CostModel(per_seq=20.0))
    cost = CostModel(per_seq=20.0)
    spread = [max(cost.share([lengths[i] for i in s]) for s in shares) for shares in (plain, per_seq)]
    assert spread[1] < spread[0]
