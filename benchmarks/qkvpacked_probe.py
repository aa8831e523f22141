"""What the qkv-packed attention entry spares (issue 18's lever: the backward's cat of dq, dk, dv).
Eight study attention sub-layers (LayerNorm, qkv Linear, FA4 varlen causal, proj Linear, residual;
16 heads of 64) on a row of 16,384 tokens (32 sequences of 512), compiled, forward + backward under
bf16 autocast: q, k, v split from the projection (`attention`, the backward cats their gradients)
against the projection viewed [T, 3, H, D] (`attention_qkvpacked`). Timed A B A B, 100 calls each.
Run on the GPU machine: PYTHONPATH=src python3 benchmarks/qkvpacked_probe.py [flash:fa4]"""
import statistics
import sys

import torch

from varlen import SeqInfo, attention, attention_qkvpacked
from varlen.measure.timing import time_calls

BACKEND = (sys.argv[1:] + ["flash:fa4"])[0]
T, C, H, LAYERS = 16384, 1024, 16, 8
info = SeqInfo.from_lengths([512] * 32, device="cuda")
torch.manual_seed(0)
layers = torch.nn.ModuleList(
    torch.nn.ModuleDict({"ln": torch.nn.LayerNorm(C), "qkv": torch.nn.Linear(C, 3 * C), "proj": torch.nn.Linear(C, C)})
    for _ in range(LAYERS)).cuda()


def split(x):
    for l in layers:
        q, k, v = (t.unflatten(-1, (H, C // H)) for t in l["qkv"](l["ln"](x)).chunk(3, -1))
        x = x + l["proj"](attention(q, k, v, info, causal=True, backend=BACKEND).flatten(-2))
    return x


def packed(x):
    for l in layers:
        qkv = l["qkv"](l["ln"](x)).unflatten(-1, (3, H, C // H))
        x = x + l["proj"](attention_qkvpacked(qkv, info, causal=True, backend=BACKEND).flatten(-2))
    return x


x = torch.randn(T, C, device="cuda", requires_grad=True)
dout = torch.randn(T, C, device="cuda")
compiled = {name: torch.compile(f) for name, f in (("split", split), ("packed", packed))}
ms = {name: [] for name in compiled}
for name in ("split", "packed", "split", "packed"):
    def step(cf=compiled[name]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = cf(x)
        out.backward(dout)
        x.grad = None
        layers.zero_grad(set_to_none=True)

    ms[name] += [1e3 * t for t in time_calls(step, "cuda", repeat=100, warmup=5)]
for name, t in ms.items():
    print(f"{name}: median {statistics.median(t):.3f} ms, min {min(t):.3f} ms ({len(t)} calls, {LAYERS} layers, {BACKEND})")
print(f"packed / split (medians): {statistics.median(ms['packed']) / statistics.median(ms['split']):.3f}")
