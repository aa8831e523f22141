"""The engine every loop builds and steps through: its objectives give the losses and gradients the
loops computed by hand before (HF's own loss for the bench's HF strategies, the logits' loss for the
decoder), its batches are sliced, moved and marked as the loops did."""

import copy

import pytest
import torch

from varlen.bench import hf_models
from varlen.bench.cases import STRATEGIES, padded_length
from varlen.data import PackCollator, PadCollator, SyntheticDataset
from varlen.engine import Engine, Objective, build_model
from varlen.loss import lm_loss
from varlen.models import DECODER, HF_GPT2, DecoderConfig
from varlen.parallel import ContextShard, Dist


def _samples(n: int, max_len: int, vocab: int, seed: int):
    ds = SyntheticDataset(n, max_len=max_len, vocab_size=vocab, length_dist="uniform", seed=seed)
    return [ds[i] for i in range(n)]


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("strategy", ["hf-padded", "hf-packed-sdpa", "hf-varlen-sdpa"])
def test_hf_strategies_train_on_hfs_own_loss(strategy):
    # the bench's HF strategies step on GPT2's own loss (its mean over the shifted labels): the
    # engine's sum over the same targets, divided by their count, is that loss and its gradients
    spec = STRATEGIES[strategy]
    cfg = DecoderConfig.from_name("tiny", vocab_size=97, max_len=padded_length(64))  # positions for every padded slot
    torch.manual_seed(0)
    backend, kwargs = hf_models.build_args(spec)
    model = build_model(HF_GPT2, cfg, backend, torch.device("cpu"), **kwargs).double()
    ref_model = copy.deepcopy(model)
    batch = hf_models.collator(spec, 64, compiled=False)(_samples(5, 64, 97, seed=1))

    ref = ref_model(**batch.hf_kwargs(labels=True, varlen_info=spec.packed), use_cache=False).loss
    ref.backward()
    engine = Engine.around(model, hf_models.objective(spec), Dist.alone("cpu"))
    stats = engine.step([engine.prepare(batch)])
    assert stats.loss.requires_grad is False
    assert float(stats.loss) == pytest.approx(ref.item(), rel=1e-12)
    got, want = _grads(model), _grads(ref_model)
    assert got.keys() == want.keys() and got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-14, msg=k)
    assert float(engine.eval_loss(engine.prepare(batch))) == pytest.approx(ref.item(), rel=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_decoder_objective_is_the_logits_mean_loss(causal):
    cfg = DecoderConfig.from_name("tiny", vocab_size=89)
    torch.manual_seed(0)
    model = build_model(DECODER, cfg, "reference", torch.device("cpu"), train=False).double()
    batch = PackCollator()(_samples(6, 40, 89, seed=2))
    engine = Engine.around(model, Objective.logits(DECODER, causal=causal), Dist.alone("cpu"))
    want = lm_loss(DECODER.logits(model, batch, causal=causal), batch.labels)
    assert float(engine.eval_loss(engine.prepare(batch))) == pytest.approx(float(want), rel=1e-12)
    assert not model.training


def test_prepare_slices_moves_and_marks_as_asked(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)  # wrapping is not what is tested
    cfg = DecoderConfig.from_name("tiny", vocab_size=89)
    model = build_model(DECODER, cfg, "reference", torch.device("cpu"))
    host = PackCollator(pad_to_multiple_of=2)(_samples(4, 30, 89, seed=3))
    d = Dist.alone("cpu")
    obj = Objective.logits(DECODER)

    def marked(b):
        return hasattr(b.input_ids, "_dynamo_dynamic_indices") or getattr(b, "dynamic", False)

    assert not marked(Engine.around(model, obj, d).prepare(host))
    assert not marked(Engine.around(model, obj, d, compile=True, static=True).prepare(host))
    assert marked(Engine.around(model, obj, d, compile=True).prepare(host))
    assert not marked(Engine.around(model, obj, d, compile=True).prepare(host, dynamic=False))
    half = Engine.around(model, obj, d, shard=ContextShard(1, 2)).prepare(host)
    assert half.input_ids.shape[0] * 2 == host.input_ids.shape[0]
    assert torch.equal(half.input_ids, host.input_ids[host.input_ids.shape[0] // 2:])


def test_step_norms_only_when_clipped_or_checked():
    cfg = DecoderConfig.from_name("tiny", vocab_size=89)
    model = build_model(DECODER, cfg, "reference", torch.device("cpu"))
    engine = Engine.around(model, Objective.logits(DECODER), Dist.alone("cpu"))
    batch = engine.prepare(PackCollator()(_samples(3, 20, 89, seed=4)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    assert engine.step([batch], opt).grad_norm is None
    seen = []
    stats = engine.step([batch], opt, before_update=seen.append)
    assert seen == [stats] and stats.grad_norm is not None and float(stats.grad_norm) > 0


def test_prepare_gives_each_batch_its_attention_backends_shapes(monkeypatch):
    # the backend owns its max_seqlen policy: SDPA (padding to max_seqlen when compiled) gets the
    # batch's bucket, the others the collator's bound; CUDA graphs keep the rows the collator shaped;
    # a padded batch has no packed metadata to change; the losses are the same either way
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)
    cfg = DecoderConfig.from_name("tiny", vocab_size=89, max_len=1024)
    torch.manual_seed(0)
    model = build_model(DECODER, cfg, "sdpa", torch.device("cpu"), train=False).double()
    host = PackCollator(max_seqlen=1000)(_samples(4, 60, 89, seed=5))
    d, obj = Dist.alone("cpu"), Objective.logits(DECODER)
    assert Engine.around(model, obj, d).prepare(host).info.max_seqlen == 1000
    assert Engine.around(model, obj, d, attention="flex").prepare(host).info.max_seqlen == 1000
    for backend in ("sdpa", "auto"):
        sdpa = Engine.around(model, obj, d, compile=True, attention=backend)
        assert sdpa.prepare(host).info.max_seqlen == 64
    graphs = Engine.around(model, obj, d, compile=True, compile_mode="reduce-overhead", attention="sdpa")
    assert graphs.prepare(host).info.max_seqlen == 1000
    padded = PadCollator(length=64)(_samples(4, 60, 89, seed=5))
    assert padded.for_kernels(lambda info: 1 / 0) is padded
    assert torch.equal(Engine.around(model, obj, d, attention="sdpa").prepare(padded).input_ids, padded.input_ids)
    plain, bucketed = Engine.around(model, obj, d), Engine.around(model, obj, d, attention="sdpa")
    assert float(bucketed.eval_loss(bucketed.prepare(host))) == pytest.approx(
        float(plain.eval_loss(plain.prepare(host))), rel=1e-12)
