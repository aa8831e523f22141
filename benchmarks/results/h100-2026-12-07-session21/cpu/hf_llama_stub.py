"""HF Llama (24 layers, tiny sizes) through attn_implementation="varlen" with flash's kernel stubbed: host cost on the CPU."""
import sys, time, statistics, torch, importlib
fl = importlib.import_module("varlen.attention.flash")
fl.impl_unavailable = lambda impl: None if impl == "torch" else "stub"
fl._varlen_attn = lambda q, k, v, *a, **kw: torch.empty_like(q)
fl.CAPS = fl.CAPS.__class__(**{**fl.CAPS.__dict__, "devices": frozenset({"cpu", "cuda"}), "dtypes": frozenset({torch.float32, torch.bfloat16, torch.float16})})
from transformers import LlamaConfig, LlamaForCausalLM
import varlen.hf as vhf
mode = sys.argv[1]
torch.manual_seed(0); torch.set_num_threads(1)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=24, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
model = LlamaForCausalLM._from_config(config, attn_implementation="varlen")
vhf.use("flash", model)
model.train(mode == "train")
lens = [5, 9, 3, 7]
batch = vhf.VarlenCollator()([{"input_ids": torch.randint(0, 64, (n,))} for n in lens]); batch.pop("labels")
def one():
    with torch.set_grad_enabled(mode == "train"):
        out = model(**batch).logits
        if mode == "train": out.sum().backward()
for _ in range(30): one()
ts = []
for _ in range(5):
    t = time.perf_counter()
    for _ in range(50): one()
    ts.append((time.perf_counter() - t) * 20)
print(f"hf llama flash(stub) {mode}: median {statistics.median(ts):.3f} ms/step, min {min(ts):.3f}")
