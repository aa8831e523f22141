"""The label convention is stated, never guessed: every collator x convention x model family gives
each sample's own next-token loss, computed alone in float64, and loses no target."""

import pytest
import torch

from varlen import SeqInfo
from varlen.data import NestedCollator, PackCollator, PackRowsCollator, PadCollator, PadToLongestCollator
from varlen.hf import VarlenCollator
from varlen.loss import IGNORE_INDEX, Labels, cross_entropy_sum, lm_loss, num_targets
from varlen.models import DECODER, HF_LLAMA, PRESETS

LENGTHS = (1, 2, 7, 13, 5, 1, 3)  # length 1: a sample with no target


def _tokens(seed=0, lengths=LENGTHS, vocab=1024):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]


def _pairs(tokens, convention: Labels):
    if convention is Labels.UNSHIFTED:  # HF: the labels are the inputs
        return [(s, s.clone()) for s in tokens]
    return [(s, torch.cat([s[1:], torch.tensor([IGNORE_INDEX])])) for s in tokens]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    return {"decoder": DECODER.build(cfg, "reference").double().eval(),
            "hf-llama": HF_LLAMA.build(cfg, "reference").double().eval()}


def _alone(name, model, s):
    if name == "decoder":
        return model(s, info=SeqInfo.from_lengths([len(s)]), causal=True)
    return model(input_ids=s[None], use_cache=False).logits[0]


def _inputs(name, batch):
    """(keyword arguments, labels) of a typed batch, or of VarlenCollator's dict (the HF boundary)."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if name == "decoder":
        return batch.model_kwargs(), batch.labels
    kw = batch.hf_kwargs(labels=True)  # HF's rows: [B, L] labels, shifted within each row
    return kw, kw.pop("labels")


def _forward(name, model, kw):
    if name == "decoder":
        return model(**kw, causal=True)
    return model(**kw, use_cache=False).logits


def _collators(name, convention):
    out = {
        "PadCollator": PadCollator(length=16, labels=convention),
        "PadToLongestCollator": PadToLongestCollator(min_length=4, labels=convention),
        "PackCollator": PackCollator(labels=convention),
        "PackRowsCollator": PackRowsCollator(row_len=20, labels=convention),
    }
    if name == "decoder":
        out["NestedCollator"] = NestedCollator(labels=convention)
    elif convention is Labels.UNSHIFTED:
        out["VarlenCollator"] = lambda pairs: VarlenCollator()([{"input_ids": x, "labels": y} for x, y in pairs])
    return out


@pytest.mark.parametrize("convention", list(Labels))
@pytest.mark.parametrize("name", ["decoder", "hf-llama"])
def test_every_collator_gives_each_samples_own_loss(models, name, convention):
    model, tokens = models[name], _tokens(seed=LENGTHS.index(1) + len(name))
    with torch.no_grad():
        want = torch.cat([cross_entropy_sum(_alone(name, model, s)[:-1], s[1:])[None] for s in tokens])
    n_want = sum(len(s) - 1 for s in tokens)
    for cname, collate in _collators(name, convention).items():
        kw, labels = _inputs(name, collate(_pairs(tokens, convention)))
        labels = convention.aligned(labels)
        flat = labels.values() if labels.is_nested else labels
        assert num_targets(flat).item() == n_want, f"{cname}: targets lost or added"
        if labels.is_nested:  # causal nested SDPA runs on CUDA only: the targets must be the packed row's
            packed = PackCollator(labels=convention)(_pairs(tokens, convention)).labels
            assert torch.equal(flat, convention.aligned(packed)), cname
            continue
        with torch.no_grad():
            got = lm_loss(_forward(name, model, kw), labels)
        # float64 throughout: the sums differ only in rounding order (~1e-16 per term)
        torch.testing.assert_close(got, want.sum() / n_want, rtol=1e-10, atol=0, msg=lambda m: f"{cname}: {m}")


def test_shifted_pairs_for_hf_rows_keep_their_first_target():
    # the bug this module ends: (input_ids, targets) pairs in rows for HF's keys lost each
    # sample's first target, because the convention was guessed from the key the metadata went under
    pairs = _pairs(_tokens(1), Labels.SHIFTED)
    batch = PackRowsCollator(row_len=20)(pairs)
    assert num_targets(batch.labels).item() == sum(len(s) - 1 for s, _ in pairs)
    unshifted = PackRowsCollator(row_len=20, labels="unshifted")(
        _pairs(_tokens(1), Labels.UNSHIFTED))
    starts = unshifted.info.cu_seqlens[:-1].long()
    assert (unshifted.labels.flatten()[starts] == IGNORE_INDEX).all()


@pytest.mark.parametrize("collate", [PadCollator(length=16), PadToLongestCollator(), PackCollator(),
                                     PackRowsCollator(row_len=20), NestedCollator()])
def test_labels_of_the_other_convention_are_refused(collate):
    tokens = _tokens(2)
    with pytest.raises(ValueError, match=r"sample 2: its labels are its input_ids \(Labels.UNSHIFTED"):
        collate(_pairs(tokens, Labels.UNSHIFTED))
    other = type(collate)(**{**collate.__dict__, "labels": Labels.UNSHIFTED})
    with pytest.raises(ValueError, match=r"sample 2: its labels are its input_ids shifted by one"):
        other(_pairs(tokens, Labels.SHIFTED))
    with pytest.raises(ValueError, match="shifted by one"):
        VarlenCollator()([{"input_ids": x, "labels": y} for x, y in _pairs(tokens, Labels.SHIFTED)])


def test_labels_that_fit_both_or_neither_convention_pass():
    same = torch.full((6,), 7)  # a run of one token: shifted and unshifted labels look alike
    for convention in Labels:
        PackCollator(labels=convention)([(same, same.clone())])
    custom = torch.arange(10, 16)  # targets of the user's own making: neither, accepted
    PackCollator()([(torch.arange(6), custom)])
    PackCollator(labels=Labels.UNSHIFTED)([(torch.arange(6), custom)])
    # a prompt's labels ignored (chat): the answer's labels still decide
    ids = torch.arange(1, 9)
    chat = ids.clone()
    chat[:4] = IGNORE_INDEX
    with pytest.raises(ValueError, match="its labels are its input_ids"):
        PackCollator()([(ids, chat)])
    assert num_targets(PackCollator(labels=Labels.UNSHIFTED)([(ids, chat)]).labels).item() == 4


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="'next' is not a valid Labels"):
        PackCollator(labels="next")


def test_loss_is_float32_at_least_and_zero_without_targets():
    logits = torch.randn(5, 11, dtype=torch.bfloat16)
    labels = torch.full((5,), IGNORE_INDEX)
    assert lm_loss(logits, labels).item() == 0.0
    labels[2] = 3
    assert cross_entropy_sum(logits, labels).dtype == torch.float32
    assert cross_entropy_sum(logits.double(), labels).dtype == torch.float64


# ------------------------------------------------------------------ the head applied inside the loss
@pytest.mark.parametrize("chunk", [1, 7, 37, 1000])
def test_linear_cross_entropy_equals_the_full_logits(chunk):
    from varlen.loss import linear_cross_entropy_sum

    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[[0, 5, 36]] = IGNORE_INDEX
    want = cross_entropy_sum(hidden @ weight.T, labels)
    gh, gw = torch.autograd.grad(0.3 * want, (hidden, weight))
    got = linear_cross_entropy_sum(hidden, weight, labels, chunk=chunk)
    h, w = torch.autograd.grad(0.3 * got, (hidden, weight))
    # float64 sums in another order: a few ulps of the largest term
    for a, b in ((got, want), (h, gh), (w, gw)):
        torch.testing.assert_close(a, b, rtol=0, atol=64 * torch.finfo(torch.float64).eps * b.abs().max().item())
    none = linear_cross_entropy_sum(hidden[:1], weight, torch.tensor([IGNORE_INDEX]))
    assert none.item() == 0.0 and torch.autograd.grad(none, hidden)[0].abs().max() == 0


def test_linear_cross_entropy_under_autocast_matches_the_heads_own_precision():
    # bf16 GEMMs as the model's head under autocast, logits upcast to float32 as HF's loss does
    from varlen.loss import linear_cross_entropy_sum

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=g, requires_grad=True)
    weight = torch.randn(300, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = cross_entropy_sum(hidden @ weight.T, labels)
        got = linear_cross_entropy_sum(hidden, weight, labels, chunk=16)
    gw_want, = torch.autograd.grad(want, weight)
    gw_got, = torch.autograd.grad(got, weight)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)  # the same bf16 logits, float32 sums
    # the weight's gradient: bf16 products accumulated over 64 rows in another grouping
    torch.testing.assert_close(gw_got, gw_want, rtol=0, atol=4 * 2 ** -8 * gw_want.abs().max().item())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma", "qwen3", "phi3", "olmo2"])
def test_hidden_states_and_chunked_head_equal_the_models_logits(kind):
    # every model type allowed a chunked head: its own logits' loss and gradients, float64
    from varlen.loss import linear_cross_entropy_sum
    from varlen.matrix import tiny_config
    from varlen.models.families import HiddenStates, head_refusal
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager").double().eval()  # no dropout
    assert head_refusal(model) is None
    ids = torch.randint(1, model.config.vocab_size, (1, 23))
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE_INDEX)], 1)
    want = cross_entropy_sum(model(input_ids=ids, use_cache=False).logits, labels)
    grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    hidden = HiddenStates(model)
    got = linear_cross_entropy_sum(hidden(input_ids=ids, use_cache=False), hidden.head_weight, labels, chunk=5)
    mine = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for (name, _), a, b in zip(model.named_parameters(), mine, grads):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * max(1.0, b.abs().max().item()), msg=name)


def test_heads_with_more_than_a_linear_layer_are_refused():
    from varlen.matrix import tiny_config
    from varlen.models.families import head_refusal
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("gemma2"))  # final logit soft-capping
    assert "model type gemma2's logits are not known to be its head alone" in head_refusal(model)


def test_a_collators_own_ignore_index_marks_the_starts_it_ignores():
    pairs = [(torch.arange(1, 5), torch.arange(1, 5)), (torch.arange(5, 8), torch.arange(5, 8))]
    b = PackCollator(labels=Labels.UNSHIFTED, ignore_index=-1)(pairs)
    assert b.labels.tolist() == [-1, 2, 3, 4, -1, 6, 7]
    hf = VarlenCollator(ignore_index=-7)([{"input_ids": x} for x, _ in pairs])
    assert hf["labels"].tolist() == [[-7, 2, 3, 4, -7, 6, 7]]
