import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader

from varlen import NestedCollator, PackCollator, PadCollator, PadToLongestCollator, SeqInfo, SyntheticDataset
from varlen.data import IGNORE_INDEX, move_batch, sample_lengths
from varlen.models import Decoder, forward_batch, lm_loss


def _samples(n=5, max_len=20, seed=0):
    ds = SyntheticDataset(n, max_len=max_len, vocab_size=50, seed=seed)
    return [ds[i] for i in range(n)]


def test_synthetic_is_deterministic_and_shifted():
    ds = SyntheticDataset(10, max_len=30, vocab_size=50, seed=3)
    inp, tgt = ds[4]
    inp2, tgt2 = SyntheticDataset(10, max_len=30, vocab_size=50, seed=3)[4]
    assert torch.equal(inp, inp2) and torch.equal(tgt, tgt2)
    assert torch.equal(inp[1:], tgt[:-1])
    assert 1 <= len(inp) <= 30 and inp.min() >= 1 and inp.max() < 50


@pytest.mark.parametrize("dist", ["uniform", "fixed", "lognormal"])
def test_length_dists_in_range(dist):
    lens = sample_lengths(500, dist, 100, seed=1)
    assert min(lens) >= 1 and max(lens) <= 100
    if dist == "fixed":
        assert set(lens) == {100}


def test_length_file(tmp_path):
    p = tmp_path / "lens.txt"
    p.write_text("5\n7 30\n")
    assert sample_lengths(4, str(p), 100) == [5, 7, 30, 5]
    with pytest.raises(ValueError, match="neither"):
        sample_lengths(4, str(tmp_path / "missing.txt"), 100)
    # a length above the longest sample is an error naming its line, never clipped silently
    for text, msg in (("5\n7 300\n", r"lens.txt:2: length 300 is outside 1..100"),
                      ("5\n0\n", r"lens.txt:2: length 0"), ("5 x\n", r"lens.txt:1: 'x' is not an integer"),
                      ("\n", "no lengths")):
        p.write_text(text)
        with pytest.raises(ValueError, match=msg):
            sample_lengths(4, str(p), 100)


def test_pad_collators():
    samples = _samples()
    lens = [len(i) for i, _ in samples]
    fixed = PadCollator(length=32)(samples)
    assert fixed.input_ids.shape == (5, 32)
    longest = PadToLongestCollator(bucket="multiple", min_length=8)(samples)
    assert longest.input_ids.shape[1] == -(-max(lens) // 8) * 8
    for b in (fixed, longest):
        assert b.attention_mask.sum(1).tolist() == lens
        assert (b.labels[~b.attention_mask] == IGNORE_INDEX).all()
        assert (b.input_ids[~b.attention_mask] == 0).all()
    with pytest.raises(ValueError, match="does not fit"):
        PadCollator(length=4)(samples)


def test_pack_collator_keeps_samples_apart():
    samples = _samples()
    b = PackCollator()(samples)
    info = b.info
    assert isinstance(info, SeqInfo) and info.lengths == tuple(len(i) for i, _ in samples)
    for (inp, tgt), pi, pt in zip(samples, info.split(b.input_ids), info.split(b.labels)):
        assert torch.equal(inp, pi) and torch.equal(tgt, pt)


def test_nested_collator():
    samples = _samples()
    b = NestedCollator()(samples)
    assert b.input_ids.is_nested
    for (inp, _), row, pos in zip(samples, b.input_ids.unbind(), b.position_ids.unbind()):
        assert torch.equal(row, inp) and pos.tolist() == list(range(len(inp)))


def test_dict_samples_and_bad_samples():
    b = PackCollator()([{"input_ids": [1, 2, 3], "labels": [2, 3, 4]}])
    assert b.input_ids.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="same length"):
        PackCollator()([{"input_ids": [1, 2, 3], "labels": [2, 3]}])
    with pytest.raises(ValueError, match="empty batch"):
        PackCollator()([])


@pytest.mark.parametrize("collate", [PadCollator(length=32), PadToLongestCollator(), PackCollator(), NestedCollator()],
                         ids=["padded", "longest", "packed", "nested"])
def test_dataloader_with_workers(collate):
    ds = SyntheticDataset(12, max_len=20, vocab_size=50)
    direct = collate([ds[i] for i in range(4)])
    loader = DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=2)
    first = move_batch(next(iter(loader)), "cpu")
    assert type(first) is type(direct) and first.tokens == direct.tokens
    for f in dataclasses.fields(direct):
        value, got = getattr(direct, f.name), getattr(first, f.name)
        if isinstance(value, SeqInfo):
            assert got.lengths == value.lengths and got.filler == value.filler
            assert torch.equal(got.cu_seqlens, value.cu_seqlens)
        elif isinstance(value, torch.Tensor) and value.is_nested:
            assert torch.equal(got.values(), value.values())
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got, value)
        else:
            assert got == value, f.name


@pytest.mark.parametrize("kw, want", [({"pad_to_multiple_of": 128}, 256), ({"pad_to": 300}, 300),
                                      ({"pad_to": 300, "pad_to_multiple_of": 128}, 384)])
def test_pack_collator_filler_is_its_own_ignored_sequences(kw, want):
    ds = SyntheticDataset(5, max_len=60, seed=2)
    samples = [ds[i] for i in range(5)]
    real = sum(ds.lengths)
    assert 128 < real <= 256
    batch = PackCollator(max_seqlen=64, **kw)(samples)
    info = batch.info
    assert batch.input_ids.shape == (want,) and info.total_tokens == want
    assert info.lengths[:5] == tuple(ds.lengths) and max(info.lengths) <= 64  # filler chunks <= max_seqlen
    assert int((batch.labels != IGNORE_INDEX).sum()) == real
    assert (batch.labels[real:] == IGNORE_INDEX).all() and (batch.input_ids[real:] == 0).all()
    # the model's loss over real tokens is the same with and without filler
    torch.manual_seed(0)
    model = Decoder("tiny").eval()
    plain = PackCollator(max_seqlen=64)(samples)
    with torch.no_grad():
        a = lm_loss(forward_batch(model, batch, backend="sdpa"), batch.labels)
        b = lm_loss(forward_batch(model, plain, backend="sdpa"), plain.labels)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pack_collator_refuses_more_than_pad_to():
    ds = SyntheticDataset(5, max_len=60, seed=2)
    with pytest.raises(ValueError, match="more than pad_to"):
        PackCollator(pad_to=10)([ds[i] for i in range(5)])


def test_pack_collator_fixed_shapes_for_cuda_graphs():
    # pad_to + num_seqs + max_seqlen: every batch the same input_ids and cu_seqlens shapes, real
    # samples first and intact, filler sequences of 1..max_seqlen tokens with ignored labels
    ds = SyntheticDataset(40, max_len=60, seed=3)
    collate = PackCollator(max_seqlen=64, pad_to=400, num_seqs=12)
    shapes = set()
    for start, n in ((0, 3), (3, 7), (10, 1), (11, 11), (22, 5)):
        samples = [ds[i] for i in range(start, start + n)]
        lens = ds.lengths[start:start + n]
        batch = collate(samples)
        info = batch.info
        shapes.add((tuple(batch.input_ids.shape), tuple(info.cu_seqlens.shape), info.max_seqlen))
        assert info.lengths[:n] == tuple(lens) and info.num_seqs == 12
        assert all(1 <= x <= 64 for x in info.lengths[n:])
        assert int((batch.labels != IGNORE_INDEX).sum()) == sum(lens)
    assert shapes == {((400,), (13,), 64)}


@pytest.mark.parametrize("kw, match", [
    ({"pad_to": 400, "num_seqs": 4}, "more than num_seqs=4"),  # 5 samples
    ({"pad_to": 400, "num_seqs": 5}, "filler tokens remain"),  # no sequence left for the filler
    ({"pad_to": None, "num_seqs": 6}, "need at least 1 filler"),  # no filler token for the sixth
    ({"pad_to": 1000, "num_seqs": 6, "max_seqlen": 64}, "exceed 64 tokens each"),
])
def test_pack_collator_num_seqs_refuses_what_cannot_fit(kw, match):
    ds = SyntheticDataset(5, max_len=60, seed=2)
    with pytest.raises(ValueError, match=match):
        PackCollator(**kw)([ds[i] for i in range(5)])


@pytest.mark.parametrize("kw, longest, want", [
    ({}, 1, 64), ({}, 64, 64), ({}, 65, 128), ({}, 300, 512), ({}, 990, 1024),
    ({"max_length": 1024}, 1023, 1024), ({"max_length": 1000}, 990, 1000),
    ({"bucket": "multiple", "min_length": 128}, 300, 384), ({"bucket": "multiple", "min_length": 8}, 13, 16),
])
def test_pad_to_longest_bucket_rule(kw, longest, want):
    collate = PadToLongestCollator(**kw)
    assert collate.length(longest) == want
    batch = collate([(torch.ones(longest, dtype=torch.long), torch.ones(longest, dtype=torch.long)),
                     (torch.ones(1, dtype=torch.long), torch.ones(1, dtype=torch.long))])
    assert batch.input_ids.shape == (2, want)
    assert batch.attention_mask.sum(1).tolist() == [longest, 1]


def test_pad_to_longest_study_batches_take_few_shapes():
    # the study's batches (32 samples of 1..1023) pad to one bucket: the baseline's length
    ds = SyntheticDataset(32 * 50, max_len=1023)
    collate = PadToLongestCollator(max_length=1024)
    shapes = {collate.length(max(ds.lengths[i * 32:(i + 1) * 32])) for i in range(50)}
    assert shapes == {1024}
    with pytest.raises(ValueError, match="does not fit max_length"):
        collate.length(1025)
    with pytest.raises(ValueError, match="bucket"):
        PadToLongestCollator(bucket="linear")


def test_pack_rows_filler_stays_inside_the_samples_positions():
    # a row's tail of filler is split into sequences no longer than the longest sample, so its
    # position ids never pass a model's range (the decoder's learned positions)
    from varlen.data import PackRowsCollator

    samples = [(torch.arange(n), torch.arange(n) + 1) for n in (50, 7, 30)]
    batch = PackRowsCollator(row_len=400)(samples)
    assert batch.info.position_ids.max().item() == 49 and batch.info.real_lengths == (50, 30, 7)
    info = batch.info
    assert info.total_tokens == batch.input_ids.numel() and max(info.lengths) == 50


@pytest.mark.parametrize("lengths", [[1], [7], [1] * 40, [3, 1, 4, 1, 5], [60, 60]],
                         ids=["length-1", "one-sequence", "many-tiny", "mixed", "the-maximum"])
def test_every_collator_returns_a_typed_batch_that_counts_its_real_tokens(lengths):
    from varlen.data import NestedBatch, PackedBatch, PackRowsCollator, PaddedBatch

    g = torch.Generator().manual_seed(len(lengths))
    samples = [(x, torch.cat([x[1:], torch.tensor([IGNORE_INDEX])]))
               for x in (torch.randint(1, 50, (n,), generator=g) for n in lengths)]
    real = sum(lengths)
    collators = {PadCollator(length=64): (PaddedBatch, 64 * len(lengths)),
                 PadToLongestCollator(max_length=64): (PaddedBatch, None),
                 PackCollator(): (PackedBatch, real),
                 PackCollator(pad_to=real + 9, max_seqlen=60): (PackedBatch, real + 9),
                 PackRowsCollator(row_len=64, rows=len(lengths) + 1): (PackedBatch, 64 * (len(lengths) + 1)),
                 NestedCollator(): (NestedBatch, real)}
    for collate, (kind, computed) in collators.items():
        batch = collate(samples)
        assert type(batch) is kind, collate
        assert batch.tokens == real, collate
        assert batch.computed_tokens == (computed or batch.input_ids.numel()), collate
        info = batch.varlen_info
        if info is not None:  # filler is marked, never counted, and the samples keep their lengths
            assert sorted(info.real_lengths) == sorted(lengths) and info.real_tokens == real, collate
            filler = [info.lengths[i] for i in info.filler]
            assert sum(filler) == info.total_tokens - real and all(n <= 64 for n in filler), collate
            labels = batch.labels.split(list(info.lengths))
            assert all((labels[i] == IGNORE_INDEX).all() for i in info.filler), collate
        kw = batch.model_kwargs()
        assert kw["input_ids"] is batch.input_ids and set(kw) <= {"input_ids", "info", "attention_mask", "position_ids"}


def test_hf_rows_are_views_of_the_packed_row():
    from varlen.data import PackRowsCollator

    samples = [(torch.arange(1, n + 1), torch.arange(1, n + 1)) for n in (5, 3, 6)]
    batch = PackRowsCollator(row_len=8, labels="unshifted")(samples)
    kw = batch.hf_kwargs(labels=True)
    assert kw["input_ids"].shape == kw["labels"].shape == kw["position_ids"].shape == (2, 8)
    assert torch.equal(kw["input_ids"].flatten(), batch.input_ids) and kw["varlen_info"] is batch.info
    assert (kw["position_ids"][:, 0] == 0).all()  # each row begins a sample or filler
    flash = batch.hf_kwargs(flash_kwargs=True)  # the boundaries over the rows' tokens, seq_idx shaped as the rows
    assert flash["seq_idx"].shape == (2, 8) and torch.equal(flash["seq_idx"].flatten(), batch.info.document_ids.int())
    assert torch.equal(flash["cu_seq_lens_q"], batch.info.cu_seqlens.int()) and flash["max_length_k"] == batch.info.max_seqlen
    one = PackCollator(labels="unshifted")(samples).hf_kwargs(varlen_info=False)
    assert one["input_ids"].shape == (1, 14) and "varlen_info" not in one and "labels" not in one
    with pytest.raises(ValueError, match="take no nested tensors"):
        NestedCollator(labels="unshifted")(samples).hf_kwargs()
