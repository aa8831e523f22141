"""The decoder computes the same function on every batch layout and every backend."""

import pytest
import torch

from varlen import Decoder, DecoderConfig, NestedCollator, PackCollator, PadCollator, PadToLongestCollator, SeqInfo
from varlen.attention import backend_reasons
from varlen.models import forward_batch, lm_loss
from varlen.data import SyntheticDataset

CFG = DecoderConfig.from_name("tiny", max_len=64)


def _samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        t = torch.randint(1, CFG.vocab_size, (n + 1,), generator=g)
        out.append((t[:-1], t[1:]))
    return out


def _model(train):
    torch.manual_seed(0)
    return Decoder(CFG).double().train(train)


def _real_logits(batch, logits):
    """Logits of real tokens, packed in sample order, whatever the layout."""
    if logits.is_nested:
        return logits.values()
    if batch.varlen_info is not None:
        return logits
    return logits[batch.attention_mask]


LENGTHS = [[1], [63], [5, 1, 17, 2, 9], [1] * 10, [63, 1, 40]]


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda l: f"{len(l)}seq")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_layouts_agree(lengths, train):
    model = _model(train)
    samples = _samples(lengths)
    collators = {"padded": PadCollator(length=64), "longest": PadToLongestCollator(), "packed": PackCollator()}
    if not train:  # causal nested SDPA has no CPU kernel; tested on the GPU
        collators["nested"] = NestedCollator()
    results = {}
    for name, collate in collators.items():
        batch = collate(samples)
        logits = forward_batch(model, batch)
        results[name] = (_real_logits(batch, logits), lm_loss(logits, batch.labels))
    ref_logits, ref_loss = results["padded"]
    for name, (logits, loss) in results.items():
        torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9, msg=name)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex", "nested", "flash"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_packed_backends_match_padded_with_grads(backend, train):
    samples = _samples([7, 1, 30, 12])
    packed, padded = PackCollator()(samples), PadCollator(length=64)(samples)
    model = _model(train)
    probe = torch.zeros(packed.info.total_tokens, CFG.n_heads, CFG.head_dim, dtype=torch.float64, requires_grad=train)
    why = backend_reasons(backend, probe, probe, probe, packed.info, train, (-1, -1))
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")

    def loss_and_grads(batch, **kw):
        model.zero_grad()
        loss = lm_loss(forward_batch(model, batch, **kw), batch.labels)
        if train:
            loss.backward()
        return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ctx = torch.enable_grad() if train else torch.no_grad()
    with ctx:
        loss_p, grads_p = loss_and_grads(packed, backend=backend)
        loss_d, grads_d = loss_and_grads(padded)
    torch.testing.assert_close(loss_p, loss_d, rtol=1e-9, atol=1e-9)
    assert len(grads_p) == len(grads_d)
    for gp, gd in zip(grads_p, grads_d):
        torch.testing.assert_close(gp, gd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_packed_equals_each_sequence_alone(train):
    model = _model(train)
    samples = _samples([9, 1, 25, 4])
    batch = PackCollator()(samples)
    logits = forward_batch(model, batch)
    for (inp, _), got in zip(samples, batch.info.split(logits)):
        alone = model(inp, info=SeqInfo.from_lengths([len(inp)]))
        torch.testing.assert_close(got, alone, rtol=1e-10, atol=1e-10)


def test_loss_ignores_padding_and_is_finite_in_float32():
    torch.manual_seed(0)
    model = Decoder("tiny")
    ds = SyntheticDataset(8, max_len=100)
    batch = PadToLongestCollator()([ds[i] for i in range(8)])
    loss = lm_loss(forward_batch(model, batch), batch.labels)
    assert torch.isfinite(loss) and 5.0 < loss.item() < 9.0  # ~ln(1024) for random init


def test_bad_batches_raise():
    model = Decoder(CFG)
    with pytest.raises(ValueError, match="pass info="):
        model(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="T=5"):
        model(torch.ones(4, dtype=torch.long), info=SeqInfo.from_lengths([2, 3]))
    with pytest.raises(ValueError, match="unknown preset"):
        DecoderConfig.from_name("huge")
    with pytest.raises(ValueError, match="multiple of n_heads"):
        DecoderConfig(dim=10, n_heads=3)


@pytest.mark.parametrize("per_block, most", [(False, 2), (True, 3)], ids=["whole_model", "per_block"])
def test_compiled_decoder_does_not_recompile_for_each_batch(per_block, most):
    # packed batches change their token and sequence counts every step; marked dynamic, the
    # compiled decoder must settle on a bounded number of graphs (the first batch's, one for a
    # batch of a single sequence, where dynamo specialises a size of 1, and per block (as DDP and
    # FSDP2 compile it) one static first graph)
    from torch._dynamo.utils import counters

    from varlen.data import PackCollator, SyntheticDataset

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    # "auto": the choice is made outside the traced graph, so it costs no graph of its own
    model = Decoder("tiny", backend="auto").eval()
    if per_block:
        for block in model.blocks:
            block.compile()
    else:
        model = torch.compile(model)
    ds = SyntheticDataset(400, max_len=200, seed=1)
    collate = PackCollator(max_seqlen=200)
    g = torch.Generator().manual_seed(0)
    start, seen = 0, set()
    for _ in range(20):
        n = int(torch.randint(1, 12, (1,), generator=g))
        batch = collate([ds[j] for j in range(start, start + n)])
        start += n
        seen.add((n, batch.info.total_tokens))
        batch = batch.mark_dynamic()
        with torch.no_grad():
            forward_batch(model, batch)
    assert len(seen) == 20
    assert counters["stats"]["unique_graphs"] <= most, dict(counters["stats"])


def test_packed_ids_take_one_row_and_refuse_a_count_info_does_not_have():
    # varlen.models.decoder.packed_ids, shared by the decoder and the TE peer: [1, T] flattens, [T'] != T refused
    from varlen.models.decoder import packed_ids

    info = SeqInfo.from_lengths([2, 3])
    ids = torch.arange(5)
    assert torch.equal(packed_ids(ids[None], info), ids) and packed_ids(ids, info) is ids
    model = Decoder("tiny")
    with pytest.raises(ValueError, match=r"packed input_ids must be \[T\] with T=5 \(from info\), got \(4,\)"):
        model(ids[:4], info=info)
