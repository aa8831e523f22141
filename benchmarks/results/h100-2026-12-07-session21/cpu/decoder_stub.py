"""The eager packed decoder (24 layers, tiny sizes) with flash's kernel stubbed: host cost on the CPU."""
"""Host cost of the eager packed decoder's flash path on the CPU: torch's varlen kernel replaced by
a stand-in that returns at once, so what is timed is the Python and dispatch around it."""
import sys, time, statistics, torch
import importlib; fl = importlib.import_module("varlen.attention.flash")
from varlen import SeqInfo
from varlen.models import Decoder, DecoderConfig
fl.impl_unavailable = lambda impl: None if impl == "torch" else "stub"
try:
    fl.impl_unavailable.cache_clear()
except AttributeError:
    pass
fl._varlen_attn = lambda q, k, v, *a, **kw: torch.empty_like(q)
fl.CAPS = fl.CAPS.__class__(**{**fl.CAPS.__dict__, "devices": frozenset({"cpu", "cuda"}), "dtypes": frozenset({torch.float32, torch.bfloat16, torch.float16})})
mode = sys.argv[1] if len(sys.argv) > 1 else "eval"
torch.manual_seed(0); torch.set_num_threads(1)
cfg = DecoderConfig(max_len=64, dim=32, n_layers=24, n_heads=2, vocab_size=64)
m = Decoder(cfg, backend="flash")
lengths = [5, 9, 3, 7]
ids = torch.randint(0, 64, (sum(lengths),))
m.train(mode == "train")
def one():
    info = SeqInfo.from_lengths(lengths)
    if mode == "train":
        m(ids, info=info).sum().backward()
    else:
        with torch.no_grad():
            m(ids, info=info)
for _ in range(50): one()
ts = []
for _ in range(7):
    t = time.perf_counter()
    for _ in range(100): one()
    ts.append((time.perf_counter() - t) * 10)
print(f"flash(stub) {mode}: median {statistics.median(ts):.3f} ms/step, min {min(ts):.3f}")
