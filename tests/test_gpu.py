"""GPU checks, run on the H100 through the device: ``pytest -m gpu``.

Each backend against a float64 computation in bf16, forward and backward, causal and not, at the
study's shapes (16 heads of 64, lengths up to 1023); the decoder's packed path against padded
under bf16 autocast; and no host sync inside ``attention``.
"""

import subprocess
import sys

import pytest
import torch

from varlen import BACKENDS, Decoder, PackCollator, PadCollator, SeqInfo, attention, attention_qkvpacked
from varlen.attention import backend_reasons
from varlen.data import SyntheticDataset, move_batch
from varlen.models import forward_batch, lm_loss

from helpers import assert_matches_truth, random_qkv

pytestmark = pytest.mark.gpu

# every backend, and each FlashAttention implementation on its own (skipped with its reason when absent)
KERNELS = [*BACKENDS, "flash:torch", "flash:fa4"]
STUDY_LENGTHS = {"random": None, "len1_and_max": [1, 1023, 1, 512], "many_tiny": [1, 2, 3] * 20}


def _lengths(name):
    if STUDY_LENGTHS[name] is not None:
        return STUDY_LENGTHS[name]
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 1024, (16,), generator=g).tolist()


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_smoke_backend_vs_float64(backend, causal, kv_heads):
    # the GPU smoke's kernel check (benchmarks/run_gpu.sh smoke): every backend, forward and
    # backward, at small shapes with length 1, many tiny sequences and one past a 128-token block
    _check_bf16(backend, [1, 37, 200, 5, 64] + [1, 2, 3] * 4, 4, kv_heads, causal, seed=kv_heads + causal)


def _check_bf16(backend, lengths, heads, kv_heads, causal, seed):
    """``backend`` in bf16 against float64, forward and gradients; skipped with its reasons."""
    q, k, v = random_qkv(lengths, heads, kv_heads, 64, torch.bfloat16, device="cuda", seed=seed)
    info = SeqInfo.from_lengths(lengths, device="cuda")
    for x in (q, k, v):
        x.requires_grad_()
    why = backend_reasons(backend, q, k, v, info, causal, (-1, -1))
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")
    out = attention(q, k, v, info, causal=causal, backend=backend)
    assert_matches_truth(out, q, k, v, lengths, causal)


@pytest.mark.parametrize("backend", ["flash:fa4", "flash:torch", "auto"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("softcap", [0.0, 4.0], ids=["no_cap", "softcap"])
def test_smoke_qkvpacked_vs_float64(backend, causal, softcap):
    # attention_qkvpacked: FA4 reads q, k, v as strided views of [T, 3, H, D] and writes the gradients
    # into one such buffer (stack's backward hands q, k, v their thirds); the study's heads; with
    # Gemma 2's soft-capping the same op pair (FA4's packed form took no cap before)
    lengths = [1, 37, 200, 5, 1023] + [1, 2, 3] * 4
    q, k, v = random_qkv(lengths, 16, 16, 64, torch.bfloat16, device="cuda", seed=3 + causal)
    if softcap:
        q, k = q * 2, k * 2  # scores of a few units, so a cap of 4 bites
    info = SeqInfo.from_lengths(lengths, device="cuda")
    for x in (q, k, v):
        x.requires_grad_()
    why = backend_reasons(backend, q, k, v, info, causal, (-1, -1), softcap) if backend != "auto" else []
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")
    out = attention_qkvpacked(torch.stack((q, k, v), 1), info, causal=causal, backend=backend, softcap=softcap)
    assert_matches_truth(out, q, k, v, lengths, causal, softcap=softcap)


@pytest.mark.parametrize("backend", ["flash:fa4", "flex", "reference", "auto"])
@pytest.mark.parametrize("window", [(-1, -1), (64, 0)], ids=["causal", "window64"])
@pytest.mark.parametrize("softcap", [0.0, 4.0], ids=["no_cap", "softcap"])
def test_smoke_sinks_vs_float64(backend, window, softcap):
    # GPT-OSS's attention sinks (FA4's learnable_sink; Flex through its log-sum-exp), with Gemma 2's
    # soft-capping beside them: forward and every gradient, the sinks' included
    lengths = [1, 37, 200, 5, 300] + [1, 2, 3] * 4
    q, k, v = random_qkv(lengths, 8, 2, 64, torch.bfloat16, device="cuda", seed=5)
    q, k = q * 2, k * 2  # scores of a few units, so a cap of 4 bites
    sinks = (torch.randn(8, generator=torch.Generator().manual_seed(1)) * 2).cuda()
    info = SeqInfo.from_lengths(lengths, device="cuda")
    for x in (q, k, v, sinks):
        x.requires_grad_()
    if backend != "auto":
        why = backend_reasons(backend, q, k, v, info, True, window, softcap, True)
        if why:
            pytest.skip(f"{backend}: {'; '.join(why)}")
    out = attention(q, k, v, info, causal=True, window_size=window, softcap=softcap, backend=backend, sinks=sinks)
    assert_matches_truth(out, q, k, v, lengths, True, window, softcap=softcap, sinks=sinks)


@pytest.mark.parametrize("backend", ["flash:fa4", "flash:torch", "flex", "auto"])
@pytest.mark.parametrize("dims", [(96, 64), (64, 32), (192, 128)], ids=["qk96-v64", "qk64-v32", "deepseek"])
def test_smoke_mla_vs_float64(backend, dims):
    # multi-head latent attention: v's head size unlike q's and k's (DeepSeek), forward and gradients
    dqk, dv = dims
    lengths = [1, 37, 200, 5, 300] + [1, 2, 3] * 4
    q, k, _ = random_qkv(lengths, 8, 8, dqk, torch.bfloat16, device="cuda", seed=6)
    v = random_qkv(lengths, 8, 8, dv, torch.bfloat16, device="cuda", seed=7)[2]
    info = SeqInfo.from_lengths(lengths, device="cuda")
    for x in (q, k, v):
        x.requires_grad_()
    if backend != "auto":
        pad = lambda x: torch.nn.functional.pad(x, (0, max(dims) - x.shape[-1]))  # noqa: E731  (what api does)
        why = backend_reasons(backend, pad(q), pad(k), pad(v), info, True, (-1, -1))
        if why:
            pytest.skip(f"{backend}: {'; '.join(why)}")
    out = attention(q, k, v, info, causal=True, backend=backend)
    assert_matches_truth(out, q, k, v, lengths, True)


@pytest.mark.parametrize("tokens", [1, 7, 1000, 4099])
def test_smoke_quack_mlp_vs_float64(tokens):
    # quack's fused MLP (GELU in fc1's epilogue, its derivative in fc2's backward) under bf16 autocast:
    # output and every gradient within 2x the error of the torch MLP under the same autocast
    from varlen.models.mlp import quack_mlp, quack_unavailable, torch_mlp

    why = quack_unavailable()
    if why:
        pytest.skip(why)
    torch.manual_seed(tokens)
    fc1, fc2 = torch.nn.Linear(1024, 4096).cuda(), torch.nn.Linear(4096, 1024).cuda()
    x = torch.randn(tokens, 1024, device="cuda", requires_grad=True)

    def run(f, dtype):
        layers = [torch.nn.Linear(1, 1).cuda().to(dtype) for _ in range(2)]
        for new, old in zip(layers, (fc1, fc2)):
            new.weight, new.bias = (torch.nn.Parameter(t.detach().to(dtype)) for t in (old.weight, old.bias))
        xi = x.detach().to(dtype).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            out = f(xi, *layers, "tanh")
        dout = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda")
        out.backward(dout.to(out.dtype))
        return [out.detach().double(), xi.grad.double(), *(p.grad.double() for l in layers for p in l.parameters())]

    truth, base, got = run(torch_mlp, torch.float64), run(torch_mlp, torch.float32), run(quack_mlp, torch.float32)
    names = ("out", "dx", "dfc1.weight", "dfc1.bias", "dfc2.weight", "dfc2.bias")
    for name, t, b, g in zip(names, truth, base, got):
        err, base_err, scale = (g - t).abs().max().item(), (b - t).abs().max().item(), t.abs().max().item()
        assert err <= 2 * base_err + 1e-3 * scale, (name, err, base_err, scale)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lengths", STUDY_LENGTHS)
@pytest.mark.parametrize("kv_heads", [16, 4], ids=["mha", "gqa"])
def test_backend_bf16_vs_float64(backend, causal, lengths, kv_heads):
    lengths = _lengths(lengths)
    _check_bf16(backend, lengths, 16, kv_heads, causal, seed=len(lengths))


@pytest.mark.parametrize("backend,compiled", [("flash:torch", False), ("flash:fa4", False), ("flex", False),
                                              ("flash:torch", True), ("flash:fa4", True)],
                         ids=["torch-eager", "fa4-eager", "flex-eager", "torch-compiled", "fa4-compiled"])
@pytest.mark.parametrize("window", [(64, 0), (32, 32)], ids=["left64", "band32"])
def test_window_bf16_vs_float64(backend, window, compiled):
    # sliding windows, and the flash kernels inside one torch.compile graph (fullgraph: FA4's
    # custom ops must not break it). Flex inside an outer compile did not finish compiling in
    # 7 minutes on the H100 (its own compiled kernel is what the backend runs eager)
    lengths = _lengths("random") + [1, 1023]
    q, k, v = random_qkv(lengths, 16, 4, 64, torch.bfloat16, device="cuda", seed=3)
    info = SeqInfo.from_lengths(lengths, device="cuda")
    why = backend_reasons(backend, q, k, v, info, False, window)
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")
    for x in (q, k, v):
        x.requires_grad_()
    fn = lambda q, k, v: attention(q, k, v, info, window_size=window, backend=backend)
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True)
    assert_matches_truth(fn(q, k, v), q, k, v, lengths, window_size=window)


@pytest.mark.parametrize("backend", ["flash", "flash:fa4", "flex", "sdpa", "nested"])
def test_attention_does_not_sync(backend):
    lengths = _lengths("random")
    q, k, v = random_qkv(lengths, 16, 16, 64, torch.bfloat16, device="cuda")
    info = SeqInfo.from_lengths(lengths, device="cuda")
    if backend_reasons(backend, q, k, v, info, True, (-1, -1)):
        pytest.skip(f"{backend} unavailable")
    # the module-level compiled Flex has met more (GQA, grad, mask) variants in this test session
    # than dynamo's recompile limit (8) allows, after which it runs eager Flex, which syncs
    torch._dynamo.reset()
    attention(q, k, v, info, causal=True, backend=backend)  # warm-up builds per-batch masks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attention(q, k, v, info, causal=True, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _skip_unless_runs(backend):
    why = backend_reasons(backend, *random_qkv([8], 16, 16, 64, torch.bfloat16, device="cuda"),
                          SeqInfo.from_lengths([8], device="cuda"), True, (-1, -1))
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")


@pytest.mark.parametrize("backend", ["flash", "flash:fa4", "flex", "sdpa"])
def test_decoder_packed_matches_padded_bf16(backend):
    _skip_unless_runs(backend)  # FA4 is optional: a machine without it skips, naming why
    torch.manual_seed(0)
    model = Decoder("small").cuda()
    ds = SyntheticDataset(16, max_len=511)
    samples = [ds[i] for i in range(16)]
    packed = move_batch(PackCollator()(samples), "cuda")
    padded = move_batch(PadCollator(length=512)(samples), "cuda")
    losses = {}
    with torch.autocast("cuda", torch.bfloat16):
        for train in (False, True):
            model.train(train)
            lp = lm_loss(forward_batch(model, packed, backend=backend), packed.labels)
            ld = lm_loss(forward_batch(model, padded), padded.labels)
            losses[train] = (lp.item(), ld.item())
            assert abs(lp.item() - ld.item()) < 1e-2, (train, lp.item(), ld.item())
    print(backend, losses)


@pytest.mark.parametrize("backend", ["flash:torch", "flash:fa4"])
def test_compiled_train_step_neither_syncs_nor_recompiles(backend):
    # the study's compiled packed step on changing batches: after warm-up, no host sync in the
    # step (sync debug mode "error") and no new graph
    from torch._dynamo.utils import counters

    _skip_unless_runs(backend)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Decoder("small", backend=backend).cuda().train()
    step_model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, fused=True)
    ds = SyntheticDataset(16 * 12, max_len=511)
    collate = PackCollator(max_seqlen=511)
    batches = [move_batch(collate([ds[j] for j in range(i * 16, i * 16 + 16 - i % 5)]), "cuda") for i in range(12)]
    for i, batch in enumerate(batches):
        batch = batch.mark_dynamic()
        if i == 4:
            graphs = counters["stats"]["unique_graphs"]
        if i >= 4:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", torch.bfloat16):
                loss = lm_loss(forward_batch(step_model, batch, causal=True), batch.labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled after warm-up"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_smoke_te_peer_keeps_sequences_apart(causal):
    # the TransformerEngine peer (packed-te) on one packed row gives each sequence what it gives that
    # sequence alone: its THD attention honours cu_seqlens (length 1, short, long), bf16 rounding apart
    from varlen.models import DecoderConfig
    from varlen.models.te_decoder import TEDecoder, te_unavailable

    why = te_unavailable()
    if why:
        pytest.skip(why)
    torch.manual_seed(0)
    model = TEDecoder(DecoderConfig.from_name("smoke")).cuda()
    lengths = [1, 37, 200, 5, 64]
    ids = torch.randint(1, 1000, (sum(lengths),), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model(ids, info=SeqInfo.from_lengths(lengths).to("cuda"), causal=causal).float()
        alone = torch.cat([model(x, info=SeqInfo.from_lengths([len(x)]).to("cuda"), causal=causal).float()
                           for x in ids.split(lengths)])
    assert packed.shape == alone.shape == (sum(lengths), 1024)
    # a leak across sequences moves logits by their own scale; bf16 rounding by ~1% of it
    err, scale = (packed - alone).abs().max().item(), alone.abs().max().item()
    assert err <= 2e-2 * scale, (err, scale)
    too_long = model.cfg.max_len + 1  # refused in one line before a position runs off the table
    with pytest.raises(ValueError, match="longer than max_len"):
        model(torch.ones(too_long, dtype=torch.long, device="cuda"), info=SeqInfo.from_lengths([too_long]).to("cuda"))


def test_smoke_te_imports_after_torch_used_cudnn():
    # TE's extension finds cuDNN's sub-libraries by name: after torch had used its own cuDNN, a system
    # cuDNN of another version was found and the import failed (undefined symbol, the H100 machine);
    # a fresh process, so that nothing imported TE first
    from varlen.models.te_decoder import te_unavailable

    why = te_unavailable()
    if why:
        pytest.skip(why)
    code = ("import torch, torch.nn.functional as F\n"
            "from torch.nn.attention import SDPBackend, sdpa_kernel\n"
            "q = torch.randn(1, 8, 128, 64, device='cuda', dtype=torch.bfloat16)\n"
            "with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):\n"
            "    F.scaled_dot_product_attention(q, q, q)\n"
            "from varlen.models.te_decoder import te_unavailable\n"
            "print(te_unavailable())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "None", out


@pytest.mark.parametrize("backend,dtype", [("flash", torch.bfloat16), ("flex", torch.float32)],
                         ids=["flash-bf16", "flex-fp32"])
def test_smoke_mrope_packs_on_gpu(backend, dtype):
    # Qwen2-VL's 3-D rotary positions (one sample holding an image grid) through a packed row on the GPU:
    # logits and every gradient within 4x the error that each sample alone through sdpa has, both against
    # each sample alone in float64 on the CPU
    pytest.importorskip("transformers")
    import copy

    import varlen.hf
    from test_mrope import _grid_positions, _models

    eager64, _ = _models("qwen2_vl")
    alone, packed = (copy.deepcopy(eager64).to("cuda", dtype) for _ in range(2))
    packed.set_attn_implementation("varlen")
    varlen.hf.use(backend, packed)
    g = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(1, 200, (n,), generator=g)} for n in (12, 1, 37, 5)]
    samples[0]["position_ids"] = _grid_positions(12)
    pos = [s.get("position_ids", torch.arange(len(s["input_ids"])).expand(3, -1))[:, None] for s in samples]

    def each_alone(model, device):
        return torch.cat([model(input_ids=s["input_ids"][None].to(device), position_ids=p.to(device),
                                use_cache=False).logits[0] for s, p in zip(samples, pos)])

    batch = varlen.hf.VarlenCollator(mrope=True)(samples)
    out = packed(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(),
                 varlen_info=batch["varlen_info"].to("cuda"), use_cache=False).logits[0]
    runs = {"truth": (eager64, each_alone(eager64, "cpu")), "alone": (alone, each_alone(alone, "cuda")),
            "packed": (packed, out)}
    w = torch.randn(runs["truth"][1].shape, dtype=torch.float64, generator=g)
    for model, logits in runs.values():
        (logits * w.to(logits.device, logits.dtype)).sum().backward()
    truth = runs["truth"][1]
    err = lambda x, t: (x.detach().double().cpu() - t).abs().max().item()  # noqa: E731
    assert err(out, truth) <= 4 * err(runs["alone"][1], truth) + 1e-6, (err(out, truth), err(runs["alone"][1], truth))
    named = [dict(m.named_parameters()) for m, _ in runs.values()]
    for name, p64 in named[0].items():
        if p64.grad is None:
            continue
        scale = p64.grad.abs().max().item()
        e, base = err(named[2][name].grad, p64.grad), err(named[1][name].grad, p64.grad)
        assert e <= 4 * base + 1e-6 * scale, (name, e, base)
