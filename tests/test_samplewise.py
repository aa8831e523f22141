"""Hybrid and state-space models packed exactly: their stateful mixers run one packed sample at a
time (``varlen.hf.use``), checked by ``varlen.check`` against each sample alone in float64 (logits
with and without a cache, loss and every gradient, leakage, every collator form); batches that are
not packed reach the mixers unchanged; a mixer that hands back more than its hidden states is
refused naming it."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

import varlen.hf  # noqa: E402  registers "varlen"
from varlen import matrix  # noqa: E402
from varlen.check import check  # noqa: E402
from varlen.hf import PackingRefused  # noqa: E402
from varlen.data import PackCollator, PackRowsCollator  # noqa: E402
from varlen.samplewise import HOOKED, sample_wise_paths  # noqa: E402


def _tiny(model_type):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(matrix.tiny_config(model_type), attn_implementation="varlen")


# a Gated DeltaNet hybrid, a pure Mamba2, a short-convolution hybrid, a Mamba hybrid that hands its
# mixers no position_ids (boundaries from the model's own call)
@pytest.mark.parametrize("model_type,mixer", [("qwen3_next", "GatedDeltaNet"), ("mamba2", "Mamba2Mixer"),
                                              ("lfm2", "ShortConv"), ("jamba", "JambaMambaMixer")])
def test_hybrid_models_pack_exactly(model_type, mixer):
    model = _tiny(model_type)
    varlen.hf.use("auto", model)
    paths = sample_wise_paths(model)
    assert paths and all(mixer in type(model.get_submodule(p)).__name__ for p in paths)
    report = check(model, max_len=24, seed=2)
    assert report.passed, report.table()
    assert any("gradients" in f.check for f in report.findings)


def test_without_use_packed_rows_are_refused_naming_the_fix():
    model = _tiny("qwen3_next").eval()
    batch = varlen.hf.VarlenCollator()([{"input_ids": torch.arange(4, 4 + n)} for n in (3, 5, 2)])
    with pytest.raises(PackingRefused, match=r"'linear_attention' layer.*varlen\.hf\.use\(backend, model\)") as e:
        with torch.no_grad():
            model(**batch)
    assert "\n" not in str(e.value)


def test_mixers_see_each_sample_alone_and_unpacked_rows_whole():
    model = _tiny("mamba2").eval()
    varlen.hf.use("auto", model)
    seen = []
    mixer = model.get_submodule(sample_wise_paths(model)[0])
    inner = mixer.forward.forward
    mixer.forward.forward = lambda h, *a, **k: seen.append(tuple(h.shape[:2])) or inner(h, *a, **k)
    lengths = (3, 1, 5, 1, 3, 3)
    batch = varlen.hf.VarlenCollator()([{"input_ids": torch.arange(4, 4 + n)} for n in lengths])
    with torch.no_grad():
        model(**batch)
        assert seen == [(3, 3), (2, 1), (1, 5)]  # samples of one length as the rows of one batch
        seen.clear()
        model(input_ids=torch.randint(4, 50, (2, 6)))  # two rows, one sample each: not packed
        assert seen == [(2, 6)]


def test_use_is_idempotent_and_a_deep_copy_reads_its_own_batches():
    model = _tiny("mamba2").eval()
    varlen.hf.use("auto", model)
    hooks = dict(model._forward_pre_hooks)  # the boundaries' capture, the entry hook
    varlen.hf.use("auto", model)
    assert dict(model._forward_pre_hooks) == hooks and len(hooks) == 2
    twin = copy.deepcopy(model)
    assert getattr(twin, HOOKED) is not getattr(model, HOOKED)
    batch = varlen.hf.VarlenCollator()([{"input_ids": torch.arange(4, 4 + n)} for n in (3, 4)])
    with torch.no_grad():
        twin(**batch)
    assert getattr(twin, HOOKED).info is not None and getattr(model, HOOKED).info is None


def test_a_mixer_that_returns_its_state_is_refused_naming_it():
    model = _tiny("rwkv").eval()
    varlen.hf.use("auto", model)
    batch = varlen.hf.VarlenCollator()([{"input_ids": torch.arange(4, 4 + n)} for n in (3, 4)])
    with pytest.raises(PackingRefused, match=r"rwkv\.blocks\.0\.attention \(RwkvSelfAttention\) sample by sample"):
        with torch.no_grad():
            model(**batch)


def test_attention_only_models_get_no_hook_and_context_parallelism_is_refused():
    llama = _tiny("llama")
    varlen.hf.use("auto", llama)
    # only the entry hook every model gets, no boundaries' capture
    assert list(llama._forward_pre_hooks.values()) == [varlen.hf._at_model_entry]
    assert sample_wise_paths(llama) == ()
    model = _tiny("mamba2")
    varlen.hf.use("auto", model)
    with pytest.raises(PackingRefused, match="sample by sample with context parallelism"):
        model(input_ids=torch.arange(4, 8)[None], varlen_context=object())


def test_a_batch_off_the_cpu_is_read_alike():
    # the boundaries of a batch on another device (a meta-device batch stands in for CUDA here; the
    # GPU smoke's run_gpu.sh features part checks Qwen3-Next and Mamba2 on an H100)
    from varlen.samplewise import Boundaries

    bounds = Boundaries(varlen.hf.batch_info, ())
    model = _tiny("mamba2")
    ids = torch.arange(4, 12, device="meta")[None]
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    derive = lambda rows, length, device, mask, kw: varlen.hf.batch_info(rows, length, "cpu", mask, kw)  # noqa: E731
    bounds.derive = derive
    bounds.capture(model, (), {"input_ids": ids, "position_ids": positions})
    assert bounds.info.lengths == (3, 5)


def test_check_compiled_bounds_graphs_a_compiled_piece():
    # the sample-wise mixers run eager between compiled pieces (a graph break each side): 3 graphs a
    # piece, as 3 for a model compiled whole; the compiled logits still match each sample alone
    model = _tiny("mamba2")
    varlen.hf.use("auto", model)
    report = check(model, max_len=16, compile=True)
    graphs = next(f for f in report.findings if f.check.startswith("compiled: graphs"))
    assert graphs.tolerance == 3 * (1 + 2) and "3 pieces" in graphs.note  # two mixers
    assert report.passed, report.table()


def test_decoding_from_a_cache_a_packed_batch_ran_with_is_refused():
    # the mixers run sample by sample without the cache (a packed row is no prompt to continue): the
    # cache's state stays empty, so decoding from it is refused rather than continued from nothing
    model = _tiny("mamba2").eval()
    varlen.hf.use("auto", model)
    batch = varlen.hf.VarlenCollator()([{"input_ids": torch.arange(1, n + 1)} for n in (3, 4)])
    out = model(**batch, use_cache=True)
    cache = getattr(out, "cache_params", None) or getattr(out, "past_key_values", None)
    assert cache is not None
    with pytest.raises(PackingRefused, match="decoding from a cache that a packed batch was run with"):
        model(input_ids=torch.tensor([[7]]), cache_params=cache, use_cache=True,
              cache_position=torch.tensor([7]))
    # a prompt alone, then its next token: as the longer prompt alone
    out = model(input_ids=torch.arange(1, 6)[None], use_cache=True)
    cache = getattr(out, "cache_params", None) or getattr(out, "past_key_values", None)
    step = model(input_ids=torch.tensor([[7]]), cache_params=cache, use_cache=True, cache_position=torch.tensor([5]))
    whole = model(input_ids=torch.cat([torch.arange(1, 6), torch.tensor([7])])[None], use_cache=False).logits
    torch.testing.assert_close(step.logits[0, -1], whole[0, -1], rtol=1e-4, atol=1e-4)


def test_a_mixer_that_carries_the_rows_state_in_an_argument_is_refused_before_it_runs():
    # RWKV hands each block a list of [B, C, layers] state tensors it writes in place: cut to one
    # sample's [1, n, C], the first write failed on the shape (two rows) instead of refusing
    model = _tiny("rwkv").eval()
    varlen.hf.use("auto", model)
    samples = [{"input_ids": torch.arange(4, 4 + n)} for n in (3, 4, 2, 5)]
    packed = PackCollator(max_seqlen=8, labels="unshifted")([(s["input_ids"], s["input_ids"]) for s in samples])
    rows = PackRowsCollator(row_len=7, labels="unshifted")([(s["input_ids"], s["input_ids"]) for s in samples])
    for batch in (packed.hf_kwargs(), rows.hf_kwargs()):
        with pytest.raises(PackingRefused, match=r"blocks\.0\.attention \(RwkvSelfAttention\).*argument 'state'"):
            with torch.no_grad():
                model(**batch, use_cache=True)
