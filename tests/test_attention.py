"""Every backend against a float64 computation done sequence by sequence, forward and gradients.

Error budgets come from the data: a backend may be off by at most 2x the error of a plain
PyTorch computation in the input's precision (plus a few ulps), measured on the same inputs.
"""

import zlib

import pytest
import torch

import varlen
from varlen import BACKENDS, SeqInfo, attention
from varlen.attention import api, backend_reasons

from helpers import assert_matches_truth, bound, max_err, random_qkv, truth_attention

LENGTHS = {
    "len1": [1],
    "one_seq": [37],
    "all_equal": [8, 8, 8, 8],
    "many_tiny": [1, 2, 1, 1, 3, 1, 2, 1, 1, 1, 2, 1],
    "max_len": [64, 3, 64, 1],
    "random": None,  # drawn per test
}
SHAPES = {"mha": (4, 4, 16), "gqa": (4, 2, 16), "mqa_d8": (2, 1, 8)}
MASKS = {"full": (False, (-1, -1)), "causal": (True, (-1, -1)), "window": (False, (3, 1)), "causal_window": (True, (2, 0))}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def _lengths(name, seed):
    if LENGTHS[name] is not None:
        return LENGTHS[name]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 65, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()


def _check(backend, lengths, shape, mask, dtype, seed, grad):
    causal, window = MASKS[mask]
    heads, kv_heads, d = SHAPES[shape]
    q, k, v = random_qkv(lengths, heads, kv_heads, d, dtype, seed=seed)
    info = SeqInfo.from_lengths(lengths)
    for x in (q, k, v):
        x.requires_grad_(grad)
    why = backend_reasons(backend, q, k, v, info, causal, window)
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")

    out = attention(q, k, v, info, causal=causal, window_size=window, backend=backend)
    assert_matches_truth(out, q, k, v, lengths, causal, window, grad=grad, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("mask", MASKS)
def test_forward_and_grad_f32(backend, lengths, mask):
    _check(backend, _lengths(lengths, 1), "gqa", mask, torch.float32, seed=zlib.crc32(f"{backend}{lengths}{mask}".encode()) % 1000, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes_and_dtypes(backend, shape, dtype):
    _check(backend, _lengths("random", 7), shape, "causal", DTYPES[dtype], seed=11, grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", MASKS)
def test_forward_only(backend, mask):
    # Flex on the CPU is forward-only: inference paths are tested here
    with torch.no_grad():
        _check(backend, _lengths("random", 3), "mha", mask, torch.float32, seed=5, grad=False)


def test_auto_chooses_and_says_why():
    q, k, v = random_qkv([3, 4], 2, 2, 8, torch.float32)
    info = SeqInfo.from_lengths([3, 4])
    name, why = varlen.choose_backend(q, k, v, info, causal=True)
    assert name == api.AUTO_ORDER["cpu"][0] == "sdpa"
    assert why.startswith("auto chose sdpa")
    out = attention(q, k, v, info, causal=True)
    assert torch.equal(out, attention(q, k, v, info, causal=True, backend="sdpa"))


def test_auto_skips_backends_that_cannot_take_inputs():
    # nested cannot do a window: auto must not pick it even when it comes first
    q, k, v = random_qkv([3, 4], 2, 2, 8, torch.float32)
    info = SeqInfo.from_lengths([3, 4])
    name, why = varlen.choose_backend(q, k, v, info, window_size=(1, 1), order=("nested", "reference"))
    assert name == "reference" and "nested (no sliding window)" in why


@pytest.mark.parametrize(
    "backend, kwargs, message",
    [
        ("flash", {}, "no CUDA device"),
        ("xformers", {}, "xformers"),
        ("nested", {"causal": True}, "causal nested SDPA needs CUDA"),
        ("nested", {"window_size": (2, 0)}, "no sliding window"),
        ("nope", {}, "unknown attention backend"),
    ],
)
def test_named_backend_never_falls_back(backend, kwargs, message):
    q, k, v = random_qkv([3, 4], 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, SeqInfo.from_lengths([3, 4]), backend=backend, **kwargs)


def test_flex_backward_on_cpu_is_refused_with_reason():
    q, k, v = random_qkv([3, 4], 2, 2, 16, torch.float32)
    q.requires_grad_()
    with pytest.raises(ValueError, match="no backward on CPU"):
        attention(q, k, v, SeqInfo.from_lengths([3, 4]), backend="flex")


def test_capability_reasons_name_dtype_and_head_size():
    from varlen.attention import flash

    q = torch.zeros(5, 2, 12)
    why = flash.CAPS.reasons(q, q, False, (-1, -1))
    assert any("head size 12" in w for w in why)
    assert any("takes bfloat16, float16, not float32" in w for w in why)
    assert any("not cpu" in w for w in why)


def _bad_inputs():
    info = SeqInfo.from_lengths([3, 4])
    ok = torch.zeros(7, 2, 8)
    yield "tokens", (torch.zeros(6, 2, 8), ok, ok, info), "6 tokens but cu_seqlens ends at 7"
    yield "rank", (torch.zeros(7, 16), ok, ok, info), "packed \\[T, H, D\\]"
    yield "kv", (ok, ok, torch.zeros(7, 1, 8), info), "k and v differ in tokens or heads"
    yield "head", (ok, torch.zeros(7, 2, 4), torch.zeros(7, 2, 4), info), "head sizes differ"
    yield "gqa", (torch.zeros(7, 3, 8), ok, ok, info), "multiple of k/v heads"
    yield "device", (ok, ok.to("meta"), ok.to("meta"), info), "different devices"
    yield "info_device", (ok.to("meta"),) * 3 + (info,), "call info.to"
    yield "dtype", (ok, ok.double(), ok.double(), info), "dtypes differ"
    yield "int", (ok.long(),) * 3 + (info,), "floating point"
    yield "info", (ok, ok, ok, [0, 3, 7]), "varlen.SeqInfo"


@pytest.mark.parametrize("case", list(_bad_inputs()), ids=lambda c: c[0])
def test_bad_input_raises_before_kernel(case):
    _, args, message = case
    with pytest.raises(ValueError, match=message):
        attention(*args, backend="reference")


def test_bad_window_raises():
    q = torch.zeros(7, 2, 8)
    with pytest.raises(ValueError, match="window_size"):
        attention(q, q, q, SeqInfo.from_lengths([3, 4]), window_size=(-2, 0))


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("lengths", ["len1", "many_tiny", "max_len"])
def test_flex_filler_tokens_change_nothing(monkeypatch, mask, lengths):
    # on CUDA Flex runs at T rounded up to a whole 128-token block; force that path here with
    # 16-token blocks so the filler document is exercised on the CPU too
    from varlen.attention import flex

    monkeypatch.setattr(flex, "padded_tokens", lambda info: -(-info.total_tokens // 16) * 16)
    lens = LENGTHS[lengths]
    assert sum(lens) % 16, "the case must need filler tokens"
    _check("flex", lens, "gqa", mask, torch.float32, seed=zlib.crc32(f"{mask}{lengths}".encode()), grad=False)


@pytest.mark.parametrize("dims", [(24, 24), (80, 80), (48, 32)], ids=["24", "80", "mla-48-32"])
@pytest.mark.parametrize("mask", ["causal", "window"])
def test_flex_pads_head_sizes_its_kernel_cannot_take(monkeypatch, dims, mask):
    # on CUDA Flex's Triton kernel takes powers of two >= 16: other head sizes are zero-padded up to
    # one; forced here on the CPU (where Flex takes any size), the output must equal the truth's
    from varlen.attention import flex

    assert flex.kernel_head_dim(192, "cuda") == 256 and flex.kernel_head_dim(8, "cuda") == 16
    assert flex.kernel_head_dim(64, "cuda") == 64 and flex.kernel_head_dim(192, "cpu") == 192
    monkeypatch.setattr(flex, "kernel_head_dim", lambda d, device_type: max(16, 1 << (d - 1).bit_length()))
    padded = []
    real_pad = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, "pad", lambda x, p, *a, **k: padded.append(p) or real_pad(x, p, *a, **k))
    dq, dv = dims
    lengths = [1, 37, 5, 90]
    g = torch.Generator().manual_seed(dq + dv)
    q, k = (torch.randn(sum(lengths), 4, dq, generator=g) for _ in range(2))
    v = torch.randn(sum(lengths), 4, dv, generator=g)
    causal, window = (True, (-1, -1)) if mask == "causal" else (True, (16, 0))
    out = attention(q, k, v, SeqInfo.from_lengths(lengths), causal=causal, window_size=window, backend="flex")
    assert out.shape == (sum(lengths), 4, dv)
    assert padded, "the kernel's head size was not padded"
    assert_matches_truth(out, q, k, v, lengths, causal=causal, window_size=window, grad=False)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("seed", [0, 1])
def test_flex_block_mask_from_cu_seqlens_matches_dense_evaluation(mask, seed):
    # several 128-token blocks, sequences crossing block edges, lengths 1 up to 300
    from torch.nn.attention.flex_attention import create_block_mask

    from varlen.attention import flex
    from varlen.attention.common import window_bounds

    g = torch.Generator().manual_seed(seed)
    lengths = [1, 300] + torch.randint(1, 200, (12,), generator=g).tolist() + [1, 1, 129]
    info = SeqInfo.from_lengths(lengths)
    causal, window = MASKS[mask]
    left, right = window_bounds(causal, window)
    t = info.total_tokens
    mod = flex.generate_doc_mask_mod(info.document_ids, left, right)
    ours = flex.doc_block_mask(info, t, left, right, mod)
    ref = create_block_mask(mod, None, None, t, t, device="cpu")

    def blocks(bm):  # [nb, nb] partial and full as dense booleans
        n = bm.kv_num_blocks.shape[-1]
        out = []
        for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
            m = torch.zeros(n, n, dtype=torch.bool)
            for i in range(n):
                m[i, idx[0, 0, i, : int(num[0, 0, i])].long()] = True
            out.append(m)
        return out

    (p_ours, f_ours), (p_ref, f_ref) = blocks(ours), blocks(ref)
    assert not (f_ours & ~f_ref).any(), "a block called full must be wholly allowed"
    assert not ((p_ref | f_ref) & ~(p_ours | f_ours)).any(), "every block with an allowed pair must be visited"
    assert not (p_ours & f_ours).any()
    # and the attention it drives equals the float64 truth
    q, k, v = random_qkv(lengths, 2, 1, 16, torch.float32, seed=seed)
    out = attention(q, k, v, info, causal=causal, window_size=window, backend="flex")
    truth = truth_attention(q.double(), k.double(), v.double(), lengths, causal, window)
    base = truth_attention(q, k, v, lengths, causal, window, dtype=torch.float32)
    assert max_err(out, truth) <= bound(max_err(base, truth), torch.float32)


def test_flex_block_mask_builds_inside_a_compiled_graph():
    # the decoder builds the mask inside its compiled graph: one graph for all token counts
    from torch._dynamo.utils import counters

    from varlen.attention import flex

    def build(cu, pos, doc, t):
        info = SeqInfo(cu, (1,), 1024, pos, doc)
        bm = flex.doc_block_mask(info, t, -1, 0, flex.generate_doc_mask_mod(doc, -1, 0))
        return bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(build, backend="aot_eager", fullgraph=True, dynamic=True)
    for lens in ([300, 5, 200], [1, 1, 500, 64, 3], [129, 1000]):
        i = SeqInfo.from_lengths(lens)
        t = -(-i.total_tokens // 128) * 128
        got = compiled(i.cu_seqlens, i.position_ids, i.document_ids, t)
        want = build(i.cu_seqlens, i.position_ids, i.document_ids, t)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert counters["stats"]["unique_graphs"] == 1


def test_flash_implementation_choice_and_reasons(monkeypatch):
    # as on an H100 without flash-attn: FA4 and FA2 absent say so, torch's varlen_attn is chosen;
    # a forced FA4 refuses with its reason instead of falling back
    from varlen.attention import flash

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(flash, "_has_fa4", lambda: False)
    monkeypatch.setattr(flash.importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(flash, "impl_unavailable", flash.impl_unavailable.__wrapped__)  # no memo
    q = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    if flash._varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    assert flash.choose_impl(q, q, True, (-1, -1)) == ("torch", [])
    monkeypatch.setenv("VARLEN_FLASH_IMPL", "fa4")
    impl, why = flash.choose_impl(q, q, True, (-1, -1))
    assert impl is None and why == ["fa4: flash-attn-4 (flash_attn.cute) not installed"]
    monkeypatch.setattr(flash, "_has_fa4", lambda: True)
    impl, why = flash.choose_impl(torch.zeros(4, 2, 84, dtype=torch.bfloat16), q, True, (-1, -1))
    assert impl is None and why == ["fa4: head size 84 unsupported (Hopper: a multiple of 8 up to 256; Blackwell: "
                                    "up to 128, or 256)"]
    assert flash.choose_impl(torch.zeros(4, 2, 192, dtype=torch.bfloat16), q, True, (-1, -1)) == ("fa4", [])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (10, 0))  # Blackwell: up to 128, or 256
    assert flash.choose_impl(torch.zeros(4, 2, 192, dtype=torch.bfloat16), q, True, (-1, -1))[0] is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert flash.choose_impl(q, q, True, (-1, -1)) == ("fa4", [])
    # backend="flash:<impl>" names one for a call, over the environment
    assert flash.choose_impl(q, q, True, (-1, -1), "torch") == ("torch", [])
    monkeypatch.delenv("VARLEN_FLASH_IMPL")
    monkeypatch.setattr(flash, "_has_fa4", lambda: False)
    info = SeqInfo.from_lengths([4])
    assert backend_reasons("flash:fa4", q, q, q, info, True, (-1, -1)) == [
        "flash-attn-4 (flash_attn.cute) not installed"]
    with pytest.raises(varlen.BackendUnavailable, match="flash:fa4.*flash_attn.cute"):
        attention(q, q, q, info, causal=True, backend="flash:fa4")
    with pytest.raises(ValueError, match="only 'flash:<impl>'"):
        attention(q, q, q, info, backend="sdpa:fa4")
    monkeypatch.setenv("VARLEN_FLASH_IMPL", "fa5")
    with pytest.raises(ValueError, match="unknown flash implementation 'fa5'"):
        flash.choose_impl(q, q, True, (-1, -1))


def test_flash_auto_prefers_fa2_on_small_batches(monkeypatch):
    # the measured rule: FA4 first from FA4_MIN_TOKENS tokens a batch, FA2 first below
    from varlen.attention import flash

    assert flash.preferred(flash.FA4_MIN_TOKENS) == ("fa4", "fa2", "torch")
    assert flash.preferred(flash.FA4_MIN_TOKENS - 1) == ("fa2", "torch", "fa4")
    missing = set()
    monkeypatch.setattr(flash, "impl_reasons", lambda i, *a: ["absent"] if i in missing else [])
    k = torch.empty(1, 2, 8)
    for tokens, absent, want in [(20000, (), "fa4"), (500, (), "fa2"), (500, ("fa2",), "torch"),
                                 (20000, ("fa4",), "fa2"), (500, ("fa2", "torch"), "fa4")]:
        missing.clear()
        missing.update(absent)
        assert flash.choose_impl(torch.empty(tokens, 2, 8), k, True, (-1, -1))[0] == want, (tokens, absent)
    missing.update(flash.IMPLS)
    impl, whys = flash.choose_impl(torch.empty(500, 2, 8), k, True, (-1, -1))
    assert impl is None and whys == ["fa2: absent", "torch: absent", "fa4: absent"]


@pytest.mark.parametrize("max_seqlen, want", [(1, 128), (128, 128), (129, 256), (1000, 1024), (1024, 1024),
                                              (1025, 2048)])
def test_fa4_max_seqlen_buckets(max_seqlen, want):
    from varlen.attention import fa4

    assert fa4.bucket(max_seqlen) == want


def test_xformers_is_imported_with_a_flash_attn4_package_hidden(tmp_path, monkeypatch):
    # xFormers 0.0.35 imports flash_attn.flash_attn_interface whenever a flash_attn package is
    # importable; flash-attn-4 has only flash_attn.cute, so xformers must not see it
    import sys

    from varlen.attention import xformers as xf

    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    fmha = tmp_path / "xformers" / "ops" / "fmha"
    fmha.mkdir(parents=True)
    for d in (tmp_path / "xformers", tmp_path / "xformers" / "ops"):
        (d / "__init__.py").write_text("")
    (tmp_path / "xformers" / "_cpp_lib.py").write_text("_built_with_cuda = True\n")
    (fmha / "__init__.py").write_text(
        "import importlib.util\nif importlib.util.find_spec('flash_attn'):\n"
        "    import flash_attn.flash_attn_interface\nSAW_FLASH_ATTN = importlib.util.find_spec('flash_attn') is not None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] in ("xformers", "flash_attn")]:
        monkeypatch.delitem(sys.modules, name)
    assert xf._fa4_only()
    _, fmha_mod = xf._import_xformers()
    assert fmha_mod.SAW_FLASH_ATTN is False
    import flash_attn.cute  # noqa: F401  (FA4 stays importable afterwards)
    for name in [m for m in sys.modules if m.split(".")[0] in ("xformers", "flash_attn")]:
        del sys.modules[name]


@pytest.mark.parametrize("backend", ["reference", "flex"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap_against_float64(backend, causal):
    # Gemma 2's logit soft-capping, at a cap that bites (scores of a few units against 0.8)
    lengths = [1, 9, 30, 4]
    q, k, v = random_qkv(lengths, 4, 2, 16, torch.float32, seed=7)
    q, k = q * 3, k * 3
    info = SeqInfo.from_lengths(lengths)
    grad = backend == "reference"  # Flex is forward-only on the CPU
    with torch.set_grad_enabled(grad):
        out = attention(q, k, v, info, causal=causal, softcap=0.8, backend=backend)
    truth = truth_attention(q.double(), k.double(), v.double(), lengths, causal, softcap=0.8)
    base = truth_attention(q, k, v, lengths, causal, dtype=torch.float32, softcap=0.8)
    assert max_err(out, truth) <= bound(max_err(base, truth), torch.float32)
    uncapped = truth_attention(q.double(), k.double(), v.double(), lengths, causal)
    assert max_err(uncapped, truth) > 1e-2, "the cap must change the result"


def test_flex_softcap_compiles_with_dynamic_shapes():
    # A float cap closed over by the score_mod became a symbol under torch.compile(dynamic=True) and
    # Inductor's Flex lowering failed (LoweringException: unbacked_bindings; Gemma 2 on the H100).
    # On the CPU the document mask does not compile (a C++ error in Inductor), a causal one does.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from varlen.attention import flex

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=True)
    cap = torch.tensor(0.8)
    for n in (128, 256, 384):
        q, k, v = random_qkv([n], 2, 2, 16, torch.float32, seed=n)
        q, k = q * 3, k * 3
        mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, n, n, device="cpu")
        qf, kf, vf = (x.transpose(0, 1)[None] for x in (q, k, v))
        out = compiled(qf, kf, vf, score_mod=flex.soft_cap_mod(cap), block_mask=mask)[0].transpose(0, 1)
        truth = truth_attention(q.double(), k.double(), v.double(), [n], True, softcap=0.8)
        base = truth_attention(q, k, v, [n], True, dtype=torch.float32, softcap=0.8)
        assert max_err(out, truth) <= bound(max_err(base, truth), torch.float32)


@pytest.mark.parametrize("backend", ["reference", "flex"])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (5, 0))],
                         ids=["causal", "full", "window"])
@pytest.mark.parametrize("softcap", [0.0, 0.8], ids=["no_cap", "softcap"])
def test_sinks_against_float64(backend, causal, window, softcap):
    # GPT-OSS's attention sinks: a learned logit per head beside every row's scores, large enough
    # to take a visible share; length 1 (the sink against one key) and many tiny sequences included
    lengths = [1, 9, 30, 4, 1, 2, 3]
    q, k, v = random_qkv(lengths, 4, 2, 16, torch.float32, seed=11)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(3)) * 2
    info = SeqInfo.from_lengths(lengths)
    grad = backend == "reference"  # Flex is forward-only on the CPU (its gradients: tests/test_gpu.py)
    for x in (q, k, v, sinks):
        x.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = attention(q, k, v, info, causal=causal, window_size=window, softcap=softcap, backend=backend,
                        sinks=sinks)
    assert_matches_truth(out, q, k, v, lengths, causal, window, grad=grad, softcap=softcap, sinks=sinks)
    plain = truth_attention(q.double(), k.double(), v.double(), lengths, causal, window, softcap=softcap)
    assert max_err(out, plain) > 1e-2, "the sinks must change the result"


@pytest.mark.parametrize("backend", ["sdpa", "nested"])
def test_softcap_refused_where_a_backend_cannot(backend):
    q, k, v = random_qkv([3, 5], 2, 2, 8, torch.float32)
    info = SeqInfo.from_lengths([3, 5])
    with pytest.raises(varlen.BackendUnavailable, match="no logit soft-capping"):
        attention(q, k, v, info, softcap=1.0, backend=backend)
    name, reason = varlen.choose_backend(q, k, v, info, softcap=1.0)
    assert name == "flex" and f"{backend} (no logit soft-capping" in reason


def test_flash_implementations_without_softcap_or_sinks_say_so(monkeypatch):
    from varlen.attention import flash

    monkeypatch.setattr(flash, "impl_unavailable", lambda impl: None)
    k = torch.empty(1, 2, 64)
    many, few = torch.empty(20000, 2, 64), torch.empty(100, 2, 64)
    assert flash.choose_impl(many, k, True, (-1, -1), softcap=1.0) == ("fa4", [])  # FA2 and FA4 cap
    assert flash.choose_impl(few, k, True, (-1, -1), softcap=1.0) == ("fa2", [])
    assert flash.impl_reasons("torch", few, k, True, (-1, -1), 1.0) == ["no logit soft-capping (fa2 and fa4 have it)"]
    assert flash.choose_impl(few, k, True, (-1, -1), sinks=True) == ("fa4", [])  # FA4 alone has sinks
    assert flash.choose_impl(few, k, True, (-1, -1), impl="fa2", sinks=True) == (
        None, ["fa2: no attention sinks (fa4 has them)"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dv", [8, 24])
@pytest.mark.parametrize("lengths", ["len1", "many_tiny", "max_len"])
def test_v_head_size_unlike_qk_mla(backend, dv, lengths):
    # multi-head latent attention (DeepSeek): v's head size differs from q's and k's
    lengths = _lengths(lengths, 3)
    g = torch.Generator().manual_seed(dv)
    t = sum(lengths)
    q, k = torch.randn(t, 4, 16, generator=g), torch.randn(t, 2, 16, generator=g)
    v = torch.randn(t, 2, dv, generator=g)
    info = SeqInfo.from_lengths(lengths)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    if backend_reasons(backend, q, k, k, info, True, (-1, -1)):
        pytest.skip(f"{backend} cannot run here")
    out = attention(q, k, v, info, causal=True, backend=backend)
    assert out.shape == (t, 4, dv)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    truth = truth_attention(q64, k64, v64, lengths, causal=True)
    base_q, base_k, base_v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    base = truth_attention(base_q, base_k, base_v, lengths, causal=True, dtype=torch.float32)
    assert max_err(out, truth) <= bound(max_err(base, truth), torch.float32)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(dout.float()), truth.backward(dout), base.backward(dout.float())
    magnitude = max(x.grad.abs().max().item() for x in (q64, k64, v64))
    for x, x64, xb in ((q, q64, base_q), (k, k64, base_k), (v, v64, base_v)):
        assert max_err(x.grad, x64.grad) <= bound(max_err(xb.grad, x64.grad), torch.float32, magnitude)


def test_attention_is_decided_once_per_batch_and_kind_of_input(monkeypatch):
    # the first layer checks and chooses; the others (same info, shapes, flags) reuse the decision,
    # and a new batch, another shape or a bad input is decided (and checked) afresh
    import varlen
    from varlen.attention import api

    calls = []
    decide = api._decide_call
    monkeypatch.setattr(api, "_decide_call", lambda *a: calls.append(a[-2]) or decide(*a))
    model = varlen.Decoder("tiny", backend="sdpa").eval()  # 2 layers
    info = varlen.SeqInfo.from_lengths([5, 3])
    with torch.no_grad():
        first = model(torch.randint(1, 50, (8,)), info=info, causal=True)
        model(torch.randint(1, 50, (8,)), info=info, causal=True)
        assert len(calls) == 1
        model(torch.randint(1, 50, (8,)), info=varlen.SeqInfo.from_lengths([5, 3]), causal=False)
        assert len(calls) == 2
    q = torch.randn(8, 4, 16)
    varlen.attention(q, q, q, info, backend="reference")
    varlen.attention(q, q, q, info, backend="reference")
    assert len(calls) == 3
    with pytest.raises(ValueError, match="q has 7 tokens but cu_seqlens ends at 8"):
        varlen.attention(q[:7], q[:7], q[:7], info, backend="reference")
    assert first.shape == (8, model.cfg.vocab_size)
