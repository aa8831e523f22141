"""Every attention feature an HF model passes is honoured or refused, never dropped
(docs/hf-attention-kwargs.md): soft-capping and windows against eager in float64, including
decoding with a cache; sinks, position biases, dropout, attention weights, cross-attention and
unknown arguments refused before any kernel runs."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
import varlen.hf  # noqa: E402
from varlen.hf import varlen_attention_forward  # noqa: E402


class Module(torch.nn.Module):
    is_causal = True


def _qkv(b=1, heads=4, kv=2, length=6, d=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, heads, length, d, generator=g, dtype=torch.float64),
            torch.randn(b, kv, length, d, generator=g, dtype=torch.float64),
            torch.randn(b, kv, length, d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("kwargs, message", [
    ({"position_bias": torch.zeros(1, 4, 6, 6)}, "position-dependent attention bias"),
    ({"output_attentions": True}, "attention weights"),
    ({"dropout": 0.1}, "no dropout"),
    ({"colour": "red"}, "colour='red', unknown to varlen"),
])
def test_features_varlen_cannot_honour_are_refused(kwargs, message):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=message):
        varlen_attention_forward(Module(), q, k, v, None, **kwargs)


def test_cross_attention_is_refused():
    m = Module()
    m.is_cross_attention = True
    with pytest.raises(ValueError, match="cross-attention"):
        varlen_attention_forward(m, *_qkv(), None)


def _refused_families():
    small = dict(num_attention_heads=4, vocab_size=97)
    return {
        # relative position bias added to the scores (an encoder-decoder)
        "t5": (lambda: transformers.T5ForConditionalGeneration._from_config(transformers.T5Config(
            num_heads=4, vocab_size=97, d_model=64, d_ff=128, num_layers=2, d_kv=16, dropout_rate=0.0),
            attn_implementation="varlen"), "position-dependent attention bias"),
    }


@pytest.mark.parametrize("family", ["t5"])
def test_families_with_a_refused_feature_fail_before_any_kernel(family, monkeypatch):
    # a stock tiny model of each family whose feature varlen cannot honour: one clear ValueError
    # naming the feature and the module, raised before a kernel runs
    build, message = _refused_families()[family]
    torch.manual_seed(0)
    model = build().eval()
    ran = []
    monkeypatch.setattr(varlen.hf, "attention", lambda *a, **kw: ran.append("a kernel"))
    ids = torch.randint(0, 97, (1, 8))
    kw = {"decoder_input_ids": ids} if family == "t5" else {}
    with pytest.raises(ValueError, match=f"cannot honour (a )?{message}.*refusing rather than ignoring"):
        model(input_ids=ids, **kw)
    assert ran == []


def test_harmless_and_absent_arguments_pass():
    q, k, v = _qkv()
    out, _ = varlen_attention_forward(Module(), q, k, v, None, use_cache=True, num_items_in_batch=5, s_aux=None,
                                      output_attentions=False, position_bias=None)
    assert out.shape == (1, 6, 4, 8)


def _eager(module, q, k, v, **kw):
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    module.num_key_value_groups = q.shape[1] // k.shape[1]
    module.training = False
    lq, lk = q.shape[2], k.shape[2]
    i = torch.arange(lq)[:, None] + lk - lq
    j = torch.arange(lk)[None]
    allowed = j <= i
    if kw.get("sliding_window"):
        allowed &= j > i - kw["sliding_window"]
    mask = torch.zeros(lq, lk, dtype=q.dtype).masked_fill(~allowed, float("-inf"))[None, None]
    return eager_attention_forward(module, q, k, v, mask, dropout=0.0, **kw)[0]


@pytest.mark.parametrize("sliding_window", [None, 3])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_softcap_and_window_match_eager(sliding_window, decode):
    # Gemma 2's features on one sequence: prefill through varlen's kernels, decode (queries shorter
    # than keys, a KV cache) through varlen's math path; both against transformers' eager
    q, k, v = _qkv(length=9)
    if decode:
        q = q[:, :, -2:]
    kw = dict(scaling=0.3, softcap=0.7, sliding_window=sliding_window)
    varlen.hf.use("reference")  # float64 math: the bridge is under test here, the kernels elsewhere
    try:
        got, _ = varlen_attention_forward(Module(), q, k, v, None, **kw)
    finally:
        varlen.hf.use("auto")
    want = _eager(Module(), q, k, v, **kw)
    # eager takes its softmax in float32 whatever the inputs: float32 tolerance
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    plain = _eager(Module(), q, k, v, scaling=0.3, sliding_window=sliding_window)
    assert (plain - want).abs().max() > 1e-3, "the cap must bite at this scale"


def test_packed_rows_collator_ignores_sample_starts_for_hf():
    # PackRowsCollator told the labels are HF's (labels = input_ids; the model shifts): no token
    # learns to predict the next sample's first; shifted targets keep every first target
    from varlen.data import PackRowsCollator
    from varlen.loss import Labels

    samples = [(torch.arange(1, n + 1), torch.arange(1, n + 1)) for n in (3, 4, 2)]
    hf = PackRowsCollator(row_len=10, labels=Labels.UNSHIFTED)(samples)
    starts = hf.info.cu_seqlens[:-1].long()
    assert (hf.labels.flatten()[starts] == -100).all()
    shifted = [(x, x + 1) for x, _ in samples]
    plain = PackRowsCollator(row_len=10)(shifted)
    live = plain.labels.flatten()[plain.info.cu_seqlens[:-1].long()]
    assert (live != -100).sum() == 3  # the three samples' own first targets; filler is ignored


def _gpt_oss():
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(num_attention_heads=4, vocab_size=97, num_hidden_layers=2, hidden_size=64,
                                    num_key_value_heads=2, intermediate_size=128, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=8)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="varlen")
    for layer in model.model.layers:  # sinks far from zero, so a dropped sink shows
        torch.nn.init.normal_(layer.self_attn.sinks, std=2.0)
    return model


def test_gpt_oss_sinks_pack_exactly_through_the_reference_backend():
    # GPT-OSS (attention sinks on every layer, sliding-window layers, MoE): packed rows, the cache,
    # the loss and every gradient (the sinks' too) against each sample alone through eager, float64
    from varlen.check import check

    model = _gpt_oss()
    varlen.hf.use("auto", model)  # on the CPU auto passes over sdpa, nested and flex (no sinks): reference
    report = check(model, max_len=24, seed=1)
    assert report.passed, report.table()
    assert any("gradients" in f.check for f in report.findings)


def test_sinks_on_a_backend_without_them_are_refused_naming_it():
    model = _gpt_oss()
    varlen.hf.use("sdpa", model)
    with pytest.raises(varlen.BackendUnavailable, match="backend 'sdpa' cannot run these inputs: no attention sinks"):
        model(input_ids=torch.randint(0, 97, (1, 8)))


def test_sinks_change_the_output_and_reach_their_gradient():
    from varlen.attention.common import sink_softmax

    scores = torch.randn(4, 3, 5, dtype=torch.float64)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    probs = sink_softmax(scores, sinks)
    full = torch.cat([scores, sinks[:, None, None].expand(4, 3, 1)], -1).softmax(-1)[..., :-1]  # by hand
    torch.testing.assert_close(probs, full, rtol=1e-15, atol=0)
    assert (probs.sum(-1) < 1).all()  # the sink took a share
    probs.sum().backward()
    assert (sinks.grad != 0).all()


def test_rotary_models_under_autocast_run_as_sdpa_does():
    # under autocast, Llama's rotary embedding leaves q and k float32 beside a bf16 v; SDPA runs them
    # all in autocast's dtype, and so must varlen (found by the GPU smoke's fine-tuning part)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=97)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="varlen")
    varlen.hf.use("reference", model)
    ids = torch.randint(1, 97, (1, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(input_ids=ids, use_cache=False).logits.float()
        model.set_attn_implementation("sdpa")
        want = model(input_ids=ids, use_cache=False).logits.float()
    # the same bf16 inputs, float32 softmax in both: bf16 rounding of the attention output and what follows
    torch.testing.assert_close(got, want, rtol=0, atol=8 * 2 ** -8 * want.abs().max().item())


def test_a_packed_batch_on_a_filled_cache_is_refused():
    # the cache's earlier tokens belong to no sample of the packed batch: attending to them (the
    # decode path, queries shorter than keys) would mix them into every sample
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="varlen").eval()
    cache = model(input_ids=torch.arange(1, 6)[None], use_cache=True).past_key_values
    batch = varlen.hf.VarlenCollator()([{"input_ids": torch.arange(1, n + 1)} for n in (3, 4)])
    with pytest.raises(varlen.hf.PackingRefused, match=r"a packed batch \(varlen_info\) with a KV cache"):
        model(**batch, past_key_values=cache, use_cache=True)
    # decoding one sample with its own cache stays as it was (a fresh cache: the refused call's layer
    # had appended its keys before its attention refused)
    cache = model(input_ids=torch.arange(1, 6)[None], use_cache=True).past_key_values
    step = model(input_ids=torch.tensor([[7]]), past_key_values=cache, use_cache=True).logits
    whole = model(input_ids=torch.cat([torch.arange(1, 6), torch.tensor([7])])[None], use_cache=False).logits
    torch.testing.assert_close(step[0, -1], whole[0, -1], rtol=1e-5, atol=1e-5)


def test_decoding_from_a_cache_a_packed_batch_filled_is_refused():
    # a packed prefill with a cache (use_cache defaults to True) leaves several samples in each cache
    # row: a decoded token would attend to all of them. Refused at the first decode step; a prefill of
    # one prompt a row clears it, and decoding from that is the sample's own continuation
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="varlen").eval()
    batch = varlen.hf.VarlenCollator()([{"input_ids": torch.arange(1, n + 1)} for n in (3, 4)])
    cache = model(**batch).past_key_values  # the packed forward itself runs as it did
    assert cache is not None
    with pytest.raises(varlen.hf.PackingRefused, match="decoding from a KV cache that a packed batch filled"):
        model(input_ids=torch.tensor([[7]]), past_key_values=cache, position_ids=torch.tensor([[7]]))
    cache = model(input_ids=torch.arange(1, 6)[None]).past_key_values
    step = model(input_ids=torch.tensor([[7]]), past_key_values=cache).logits
    whole = model(input_ids=torch.cat([torch.arange(1, 6), torch.tensor([7])])[None], use_cache=False).logits
    torch.testing.assert_close(step[0, -1], whole[0, -1], rtol=1e-5, atol=1e-5)
    model(**batch, use_cache=False)  # no cache filled: nothing to refuse later
    cache = model(input_ids=torch.arange(1, 6)[None]).past_key_values
    model(input_ids=torch.tensor([[7]]), past_key_values=cache)


def _cache_model(name: str, dtype=torch.float64, **extra):
    # tiny models: Llama (full attention), Mistral (one sliding window), Gemma 2 (windows on
    # every other layer, soft-capping)
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(name, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
                                            pad_token_id=0, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(dtype).eval()
    return cfg, model


CACHE_MODELS = [("llama", {}), ("mistral", {"sliding_window": 4}),
                ("gemma2", {"sliding_window": 4, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0})]


@pytest.mark.parametrize("name, extra", CACHE_MODELS, ids=[n for n, _ in CACHE_MODELS])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_decoding_with_a_cache_matches_eager(name, extra, cache):
    # a static cache's keys are all its slots, those past what it holds empty: a query must see only
    # the filled ones up to its own (it once saw them all: silently wrong logits);
    # a sliding window's static cache rolls once full. Prefill, single tokens past the window, then a
    # chunk of three, each against transformers' eager attention on a cache of the same kind
    cfg, model = _cache_model(name, **extra)
    chunks = [torch.arange(1, 7)[None], torch.tensor([[9]]), torch.tensor([[11]]), torch.tensor([[13]]),
              torch.tensor([[5, 6, 7]])]

    def run(impl):
        model.set_attn_implementation(impl)
        if impl == "varlen":
            varlen.hf.use("reference", model)
        past = (transformers.StaticCache(config=cfg, max_cache_len=24) if cache == "static"
                else transformers.DynamicCache(config=cfg))
        return [model(input_ids=ids, past_key_values=past, use_cache=True).logits for ids in chunks]

    want, got = run("eager"), run("varlen")
    for g, w in zip(got, want):  # eager's softmax is float32 whatever the inputs: float32 tolerance
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


@pytest.mark.parametrize("name, extra", CACHE_MODELS, ids=[n for n, _ in CACHE_MODELS])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_generating_left_padded_prompts_matches_eager(name, extra, cache):
    # generate() hands attention a 2-D padding mask over the filled slots; a static cache's keys
    # outnumber it (those slots are cut off, as transformers' FlashAttention path does). float32:
    # eager's masked softmax turns a left-padded row to NaN in float64
    cfg, model = _cache_model(name, torch.float32, **extra)
    ids = torch.tensor([[0, 0, 3, 4, 5], [7, 8, 9, 10, 11]])
    mask = (ids != 0).long()

    def run(impl):
        model.set_attn_implementation(impl)
        if impl == "varlen":
            varlen.hf.use("reference", model)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             cache_implementation=cache, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
        return out.sequences, torch.stack(out.logits)

    (want_ids, want), (got_ids, got) = run("eager"), run("varlen")
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_a_packed_row_into_a_static_cache_is_refused():
    # a static cache's keys outnumber the queries even when it is empty, so a packed row there takes
    # the decode path, where boundaries would be ignored: refused, also when only position_ids
    # (restarting inside the row) say it is packed, as TRL's padding-free collator sends it
    cfg, model = _cache_model("llama")
    model.set_attn_implementation("varlen")
    batch = varlen.hf.VarlenCollator()([{"input_ids": torch.arange(1, n + 1)} for n in (3, 4)])
    for kwargs in ({"varlen_info": batch["varlen_info"]}, {}):
        past = transformers.StaticCache(config=cfg, max_cache_len=16)
        with pytest.raises(varlen.hf.PackingRefused, match="a packed batch .* with a KV cache"):
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], past_key_values=past, **kwargs)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_a_refused_packed_call_leaves_the_cache_as_it_was(cache):
    # refused inside attention, the first layer would already have written the packed row's keys
    # into the cache, and decoding on would carry them silently: a model varlen.hf.use saw refuses
    # before any layer runs, and its cache decodes on exactly
    cfg, model = _cache_model("llama", torch.float32)
    model.set_attn_implementation("varlen")
    varlen.hf.use("reference", model)
    past = (transformers.StaticCache(config=cfg, max_cache_len=16) if cache == "static"
            else transformers.DynamicCache(config=cfg))
    prompt = torch.arange(1, 6)[None]
    model(input_ids=prompt, past_key_values=past)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in past.layers]
    batch = varlen.hf.VarlenCollator()([{"input_ids": torch.arange(1, n + 1)} for n in (3, 4)])
    for kwargs in ({"varlen_info": batch["varlen_info"]}, {}):
        with pytest.raises(varlen.hf.PackingRefused, match="LlamaForCausalLM: one that holds tokens"):
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], past_key_values=past, **kwargs)
    for layer, (k, v) in zip(past.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    step = model(input_ids=torch.tensor([[7]]), past_key_values=past).logits
    whole = model(input_ids=torch.cat([prompt[0], torch.tensor([7])])[None], use_cache=False).logits
    torch.testing.assert_close(step[0, -1], whole[0, -1], rtol=1e-5, atol=1e-5)


def test_decoding_from_a_cache_a_packed_batch_filled_is_refused_compiled_too():
    # attention marks its modules only eagerly; a model varlen.hf.use saw marks the cache itself at its
    # entry, so a compiled model refuses too, before any layer writes the decoded token's keys
    cfg, model = _cache_model("llama", torch.float32)
    model.set_attn_implementation("varlen")
    varlen.hf.use("reference", model)
    compiled = torch.compile(model, backend="eager")
    batch = varlen.hf.VarlenCollator()([{"input_ids": torch.arange(1, n + 1)} for n in (3, 4)])
    for kwargs in ({"varlen_info": batch["varlen_info"]}, {}):
        past = transformers.DynamicCache(config=cfg)
        compiled(input_ids=batch["input_ids"], position_ids=batch["position_ids"], past_key_values=past, **kwargs)
        before = [layer.keys.clone() for layer in past.layers]
        with pytest.raises(varlen.hf.PackingRefused, match="decoding from a KV cache that a packed batch filled"):
            compiled(input_ids=torch.tensor([[7]]), past_key_values=past, position_ids=torch.tensor([[7]]))
        assert all(torch.equal(layer.keys, k) for layer, k in zip(past.layers, before))
    past = transformers.DynamicCache(config=cfg)  # one prompt a row: decoding on is the sample's own continuation
    compiled(input_ids=torch.arange(1, 6)[None], past_key_values=past)
    step = compiled(input_ids=torch.tensor([[7]]), past_key_values=past).logits
    whole = model(input_ids=torch.cat([torch.arange(1, 6), torch.tensor([7])])[None], use_cache=False).logits
    torch.testing.assert_close(step[0, -1], whole[0, -1], rtol=1e-5, atol=1e-5)
