"""Stock transformers models padding-free through attn_implementation="varlen" (tiny random configs)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
import varlen.hf  # noqa: E402  registers "varlen"
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, GPT2Config, LlamaConfig, Qwen2Config  # noqa: E402

CONFIGS = {
    "gpt2": GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=128, bos_token_id=1, eos_token_id=2,
                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    "llama_gqa": LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=97, max_position_embeddings=128, bos_token_id=1, eos_token_id=2),
    "qwen2_gqa": Qwen2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                             intermediate_size=128, vocab_size=97, max_position_embeddings=128, bos_token_id=1, eos_token_id=2),
}
LENGTHS = [5, 1, 17, 3, 9]


@pytest.fixture(autouse=True)
def _auto_backend():
    varlen.hf.use("auto")
    yield
    varlen.hf.use("auto")


def _models(name, train=False):
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[name]), attn_implementation="sdpa").double()
    vm = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[name]), attn_implementation="varlen").double()
    vm.load_state_dict(ref.state_dict())
    return ref.train(train), vm.train(train)


def _samples(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g) for n in lengths]


def _padded(samples, left=False):
    width = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("with_info", [True, False], ids=["varlen_info", "position_ids_only"])
def test_packed_matches_padded_logits_loss_grads(name, with_info):
    ref, vm = _models(name, train=True)
    samples = _samples()
    ids, mask, labels = _padded(samples)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out_ref.loss.backward()
    batch = varlen.hf.VarlenCollator()([{"input_ids": s} for s in samples])
    if not with_info:
        batch.pop("varlen_info")
    out = vm(**batch, use_cache=False)
    out.loss.backward()
    torch.testing.assert_close(out.logits[0], out_ref.logits[mask.bool()], rtol=1e-9, atol=1e-9)
    # HF's loss upcasts logits to float32 whatever the model's dtype: float32 tolerance there
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-6, atol=1e-6)
    g_ref, g = _grads(ref), _grads(vm)
    assert g.keys() == g_ref.keys() and g
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_flattening_collator_gives_same_loss(name):
    _, vm = _models(name)
    feats = [{"input_ids": s.tolist()} for s in _samples()]
    ours = vm(**varlen.hf.VarlenCollator()(feats)).loss
    for flash_kwargs in (False, True):
        hf = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(feats)
        torch.testing.assert_close(vm(**hf).loss, ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_eval_with_default_cache_is_right(name):
    # transformers' sdpa stops looking for packed rows when a cache is active (use_cache=True
    # is the default in eval) and attends across samples; varlen reads position_ids regardless
    ref, vm = _models(name)
    samples = _samples()
    ids, mask, _ = _padded(samples)
    batch = varlen.hf.VarlenCollator()([{"input_ids": s} for s in samples])
    batch.pop("varlen_info")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
        got = vm(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", CONFIGS)
def test_several_packed_rows(name):
    # TRL-style best-fit packing: [B, L] rows, each holding several samples
    ref, vm = _models(name)
    rows = [_samples([5, 1, 6], seed=1), _samples([4, 8], seed=2)]
    ids = torch.stack([torch.cat(r) for r in rows])
    pos = torch.stack([torch.cat([torch.arange(len(s)) for s in r]) for r in rows])
    with torch.no_grad():
        got = vm(input_ids=ids, position_ids=pos).logits
        for b, row in enumerate(rows):
            start = 0
            for s in row:
                alone = ref(input_ids=s[None], use_cache=False).logits[0]
                torch.testing.assert_close(got[b, start:start + len(s)], alone, rtol=1e-9, atol=1e-9)
                start += len(s)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_padded_batches_keep_working(name, left):
    ref, vm = _models(name)
    ids, mask, _ = _padded(_samples(), left=left)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        got = vm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_backend_choice(backend):
    ref, vm = _models("llama_gqa")
    samples = _samples()
    ids, mask, _ = _padded(samples)
    varlen.hf.use(backend)
    with torch.no_grad():
        got = vm(**{k: v for k, v in varlen.hf.VarlenCollator()([{"input_ids": s} for s in samples]).items()}).logits[0]
        want = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="unknown backend"):
        varlen.hf.use("nope")
    with pytest.raises(ValueError, match="only 'flash:<impl>'"):
        varlen.hf.use("sdpa:fa4")
    with pytest.raises(ValueError, match="unknown flash implementation 'fa9'"):
        varlen.hf.use("flash:fa9")
    varlen.hf.use("flash:torch")  # a named implementation is accepted (and refused with reasons where absent)
    varlen.hf.use(backend)


def test_backend_choice_per_model(monkeypatch):
    # two models in one process, each with its own kernel (kept in its config); others keep the default
    a, b = _models("llama_gqa")[1], _models("qwen2_gqa")[1]
    varlen.hf.use("reference", a)
    varlen.hf.use("sdpa", b)
    assert a.config.varlen_backend == "reference" and b.config.varlen_backend == "sdpa"
    seen = []
    real = varlen.hf.attention
    monkeypatch.setattr(varlen.hf, "attention", lambda *x, backend, **kw: seen.append(backend) or real(*x, backend=backend, **kw))
    batch = varlen.hf.VarlenCollator()([{"input_ids": s} for s in _samples()])
    with torch.no_grad():
        a(**batch)
        b(**batch)
        _models("llama_gqa")[1](**batch)
    assert seen == ["reference"] * 2 + ["sdpa"] * 2 + ["auto"] * 2


def test_generation_after_packed_prefill_shapes():
    _, vm = _models("llama_gqa")
    ids = _samples([6])[0][None]
    with torch.no_grad():
        out = vm.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def _packed_batch():
    return varlen.hf.VarlenCollator()([{"input_ids": s} for s in _samples([3, 5, 2])])


def _without(batch, key):
    return {k: v for k, v in batch.items() if k != key}


def _as_flash_kwargs(batch):
    info = batch.pop("varlen_info")
    m = max(info.lengths)
    return dict(batch, cu_seq_lens_q=info.cu_seqlens, cu_seq_lens_k=info.cu_seqlens, max_length_q=m, max_length_k=m)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_packed_row_without_positions_is_refused_compiled_too(name):
    _, vm = _models(name)
    batch = _without(_packed_batch(), "position_ids")
    # compiled, the check runs on the device (no host read): torch raises it as a RuntimeError
    with pytest.raises((ValueError, RuntimeError), match="needs its collator's position_ids"):
        with torch.no_grad():
            torch.compile(vm)(**batch)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda vm: vm(input_ids=torch.ones(1, 6, dtype=torch.long), position_ids=torch.tensor([[0, 1, 2, 0, 2, 3]])),
         "step by 1"),
        (lambda vm: vm(input_ids=torch.ones(1, 6, dtype=torch.long), position_ids=torch.tensor([[1, 2, 0, 1, 2, 3]])),
         "start at"),
        (lambda vm: varlen.hf.VarlenCollator()([{"input_ids": [5, 6, 7], "labels": [5, 6]}]), "differ in length"),
        (lambda vm: varlen.hf.VarlenCollator()([]), "empty batch"),
        (lambda vm: vm(**_without(_packed_batch(), "position_ids")), "needs its collator's position_ids"),
        (lambda vm: vm(**_as_flash_kwargs(_without(_packed_batch(), "position_ids"))), "needs its collator's position_ids"),
    ],
    ids=["positions_skip", "positions_not_from_0", "labels_length", "empty", "packed_without_positions",
         "flash_kwargs_without_positions"],
)
def test_bad_input_is_a_clear_error(make, message):
    _, vm = _models("llama_gqa")
    with pytest.raises(ValueError, match=message):
        make(vm)


def test_dropout_is_refused_not_ignored():
    cfg = copy.deepcopy(CONFIGS["gpt2"])
    cfg.attn_pdrop = 0.1
    vm = AutoModelForCausalLM.from_config(cfg, attn_implementation="varlen").train()
    with pytest.raises(ValueError, match="no dropout"):
        vm(input_ids=torch.ones(1, 4, dtype=torch.long))


def test_compiled_model_matches_eager():
    _, vm = _models("llama_gqa")
    batch = varlen.hf.VarlenCollator()([{"input_ids": s} for s in _samples()])
    with torch.no_grad():
        want = vm(**batch).logits
        got = torch.compile(vm)(**batch).logits
    # HF computes RoPE in float32 even in a float64 model; Inductor fuses it differently
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compiled_model_on_changing_packed_batches_keeps_few_graphs():
    # a PackedBatch marked dynamic hands HF models [1, T] views made per call: compiled, the model
    # gives eager's logits on batches of changing token and sequence counts, in a bounded number of graphs
    from torch._dynamo.utils import counters

    from varlen.data import PackCollator

    _, vm = _models("llama_gqa")
    torch._dynamo.reset()
    counters.clear()
    compiled, collate, g = torch.compile(vm), PackCollator(max_seqlen=40, labels="unshifted"), torch.Generator().manual_seed(3)
    for n in range(2, 8):
        samples = [s for s in _samples(torch.randint(2, 40, (n,), generator=g).tolist(), seed=n)]
        batch = collate([(s, s) for s in samples]).mark_dynamic()
        with torch.no_grad():
            got = compiled(**batch.hf_kwargs(), use_cache=False).logits[0]
            want = vm(**batch.hf_kwargs(), use_cache=False).logits[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_trainer_example_trains(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--steps", "12", "--out", str(tmp_path)])
    assert out["steps"] == 12 and len(out["losses"]) == 12
    assert all(torch.isfinite(torch.tensor(out["losses"])))
    assert sum(out["losses"][-3:]) < sum(out["losses"][:3])  # it learns something


def test_metadata_is_not_reused_across_batches():
    # batches of the same shape one after another must each get their own boundaries
    ref, vm = _models("llama_gqa")
    for seed, lengths in enumerate(([3, 9, 4], [10, 2, 4], [1, 1, 14])):
        samples = _samples(lengths, seed=seed)
        ids, mask, _ = _padded(samples)
        batch = varlen.hf.VarlenCollator()([{"input_ids": s} for s in samples])
        with torch.no_grad():
            got = vm(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
            want = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_metadata_from_positions_is_derived_once_a_batch_compiled_too_and_not_kept(monkeypatch):
    # a model fed position_ids alone: its layers share one derivation per batch, eager and compiled,
    # held only while the batch's tensor lives
    import gc

    ref, vm = _models("llama_gqa")
    derived = []
    real = varlen.hf._from_positions
    monkeypatch.setattr(varlen.hf, "_from_positions", lambda pos, rows: derived.append(1) or real(pos, rows))
    torch._dynamo.reset()
    compiled = torch.compile(vm)
    for seed, lengths in enumerate(([3, 9, 4], [10, 2, 4, 5], [1, 1, 14])):
        for model in (vm, compiled):
            samples = _samples(lengths, seed=seed)
            ids, mask, _ = _padded(samples)
            batch = varlen.hf.VarlenCollator()([{"input_ids": s} for s in samples])
            before = len(derived)
            with torch.no_grad():
                got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
                want = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert len(derived) - before == 1, (lengths, model is compiled)
            del batch, got
            gc.collect()
            assert len(varlen.hf._PER_BATCH) == 0  # nothing of the batch is kept after it


@pytest.mark.parametrize("kind", ["position_ids", "flash_kwargs", "rows", "padded"])
def test_a_model_use_saw_reads_its_batch_once_at_its_entry_compiled_in_one_graph(kind):
    # without varlen_info every layer looked the batch's sequences up in a function torch.compile
    # leaves its graph for (it reads the batch on the host): a graph per layer. A model varlen.hf.use
    # saw reads them once, at its entry, and hands them down: one graph (padded rows too: varlen's
    # mask function does not test the mask on the host as transformers' FlashAttention one does),
    # eager's logits, the reference's
    from torch._dynamo.testing import CompileCounter

    ref, vm = _models("llama_gqa")
    unseen = copy.deepcopy(vm)  # attn_implementation="varlen" alone: its layers read the batch
    varlen.hf.use("sdpa", vm)
    samples = _samples([3, 9, 4])
    ids, mask, _ = _padded(samples)
    batch = varlen.hf.VarlenCollator(flash_kwargs=True)([{"input_ids": s} for s in samples])
    kw = {"position_ids": {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]},
          "flash_kwargs": {k: v for k, v in batch.items() if k not in ("varlen_info", "labels")},
          "rows": {"input_ids": ids},
          "padded": {"input_ids": ids, "attention_mask": mask}}[kind]
    torch._dynamo.reset()
    counter, per_layer = CompileCounter(), CompileCounter()
    with torch.no_grad():
        eager = vm(**kw, use_cache=False).logits
        got = torch.compile(vm, backend=counter)(**kw, use_cache=False).logits
        torch.compile(unseen, backend=per_layer)(**kw, use_cache=False)
        want = ref(**kw, use_cache=False).logits if kind in ("rows", "padded") else \
            ref(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()][None]
    real = mask.bool() if kind == "padded" else torch.ones(got.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(got[real], eager[real], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[real], want[real], rtol=1e-9, atol=1e-9)
    assert per_layer.frame_count > vm.config.num_hidden_layers  # the test's premise: a break in every layer
    assert counter.frame_count == 1, (counter.frame_count, per_layer.frame_count)


@pytest.mark.parametrize("lengths", [[5, 1, 17, 3, 9], [1], [40], [1] * 7])
def test_flash_kwargs_are_what_transformers_flattening_collator_gives(lengths):
    # the boundaries as transformers names them, for layers that read them (its FlashAttention path,
    # linear-attention and state-space layers): equal to DataCollatorWithFlattening's own, from both
    # varlen collators, and a model through attn_implementation="varlen" fed them alone packs exactly
    from varlen.data import PackCollator

    samples = _samples(lengths, seed=len(lengths))
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(
        [{"input_ids": s.tolist()} for s in samples])
    ours = varlen.hf.VarlenCollator(flash_kwargs=True)([{"input_ids": s} for s in samples])
    packed = PackCollator(labels="unshifted")([(s, s) for s in samples]).hf_kwargs(labels=True, varlen_info=False,
                                                                                   flash_kwargs=True)
    for got in (ours, packed):
        assert set(theirs) <= set(got)
        for key, want in theirs.items():
            if isinstance(want, torch.Tensor):
                assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
            else:
                assert got[key] == want, key
    ref, vm = _models("llama_gqa")
    with torch.no_grad():
        logits = vm(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits[0]
        alone = torch.cat([ref(input_ids=s[None], use_cache=False).logits[0] for s in samples])
    torch.testing.assert_close(logits, alone, rtol=1e-9, atol=1e-9)


def test_flash_kwargs_of_a_context_slice_or_padded_rows_are_refused():
    from varlen.data import PadCollator
    from varlen.data.batch import PackedBatch
    from varlen.parallel import ContextShard

    batch = varlen.hf.VarlenCollator()([{"input_ids": s} for s in _samples([4, 4])])
    sliced = PackedBatch(batch["input_ids"][0], batch["labels"][0], batch["varlen_info"], context=ContextShard(0, 2))
    with pytest.raises(ValueError, match="one rank's slice"):
        sliced.hf_kwargs(flash_kwargs=True)
    with pytest.raises(ValueError, match="padded rows"):
        PadCollator(labels="unshifted")([(s, s) for s in _samples([3, 2])]).hf_kwargs(flash_kwargs=True)
