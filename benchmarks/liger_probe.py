"""Liger's LayerNorm (Triton, liger-kernel 0.8.5) beside Inductor's own, in the compiled study train
step: issue 18's cheaper peer for the fused-elementwise lever. The study decoder (24 x 1024, torch's
FA2 so that FlashAttention-4 need not be carried), 25 packed rows of 32 uniform samples (1..1023
tokens), bf16 autocast, fused SGD, compiled with the row dynamic; every LayerNorm stock, then every
LayerNorm swapped for LigerLayerNorm with the same weight (its zero bias included). 5 warm-up and 20
timed steps each, medians. Run on the GPU machine (liger-kernel's wheel in .whl/):
PYTHONPATH=src python3 benchmarks/liger_probe.py"""
import statistics

import torch

from varlen import Decoder, DecoderConfig
from varlen.data import move_batch
from varlen.data.synthetic import sample_lengths
from varlen.measure.timing import since, start
from varlen.models.families import family
from varlen.data import TrainCollator
from varlen.engine.step import train_step

cfg = DecoderConfig.from_name("study")
lengths = sample_lengths(32 * 25, "uniform", 1023, seed=0)
g = torch.Generator().manual_seed(0)
rows = [[(torch.randint(1, cfg.vocab_size, (n,), generator=g),) * 2 for n in lengths[i:i + 32]]
        for i in range(0, len(lengths), 32)]


def liger(model):
    from liger_kernel.transformers import LigerLayerNorm

    for parent in [*model.blocks, model]:
        for name in ("ln1", "ln2", "ln_f"):
            ln = getattr(parent, name, None)
            if isinstance(ln, torch.nn.LayerNorm):
                new = LigerLayerNorm(cfg.dim, eps=ln.eps).cuda()
                new.weight.data.copy_(ln.weight.data)
                setattr(parent, name, new)
    return model


def run(name, convert):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = convert(Decoder(cfg, backend="flash:torch").cuda().train())
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, fused=True)
    collate, ms, losses = TrainCollator(max_seqlen=1023), [], []
    for i, samples in enumerate(rows):
        batch = move_batch(collate(samples), "cuda", non_blocking=True).mark_dynamic()
        t0 = start("cuda")
        stats = train_step(compiled, [batch], opt, family("decoder").logits,
                           autocast=torch.autocast("cuda", dtype=torch.bfloat16))
        elapsed = since(t0, "cuda")
        if i >= 5:
            ms.append(1e3 * elapsed)
        losses.append(float(stats.loss))
    print(f"{name}: median {statistics.median(ms):.1f} ms, mean {statistics.mean(ms):.1f} ms "
          f"({len(ms)} steps), last loss {losses[-1]:.5f}", flush=True)
    return statistics.median(ms)


stock = run("Inductor LayerNorm", lambda m: m)
lig = run("Liger LayerNorm", liger)
print(f"Liger / Inductor (medians): {lig / stock:.3f}")
