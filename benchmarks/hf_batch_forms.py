"""A compiled HF model's train step through ``attn_implementation="varlen"`` on one packed batch in
the forms users hand it: ``varlen_info`` (varlen's collators), ``position_ids`` alone (TRL's
padding-free batches, transformers' ``DataCollatorWithFlattening``) and transformers' flash kwargs
(``cu_seq_lens_q/k``, ``max_length_q/k``). Prints, per form, the median step and the graphs the
compiled model ran as. Only ``varlen.hf``'s collator and ``use`` are used, so older versions run it too:

    PYTHONPATH=src python benchmarks/hf_batch_forms.py --layers 4 --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch


def batches(n: int, tokens: int, collate, seed: int = 0) -> list[dict]:
    """``n`` packed batches of ``tokens`` tokens each, long-tailed sample lengths."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        lens = []
        while sum(lens) < tokens:
            lens.append(min(2048, max(16, int(rng.lognormvariate(6.0, 1.0)))))
        lens[-1] -= sum(lens) - tokens
        out.append(collate([{"input_ids": torch.randint(0, 32000, (k,))} for k in lens if k > 0]))
    return out


def form(batch: dict, name: str) -> dict:
    keep = {"varlen_info": ("input_ids", "labels", "position_ids", "varlen_info"),
            "position_ids": ("input_ids", "labels", "position_ids"),
            "flash_kwargs": ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                             "max_length_k")}[name]
    return {k: v for k, v in batch.items() if k in keep}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20, help="timed steps, after 5 untimed")
    p.add_argument("--backend", default="flash:torch")
    p.add_argument("--forms", default="varlen_info,position_ids,flash_kwargs")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (16 heads, 4 key/value heads)")
    p.add_argument("--label", default="")
    args = p.parse_args()
    from torch._dynamo.testing import CompileCounterWithBackend
    from transformers import LlamaConfig, LlamaForCausalLM

    import varlen.hf as vhf

    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096, use_cache=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: to try the script, not to time it
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(1)  # the same batches whatever the import of varlen drew
    data = batches(25, args.tokens, vhf.VarlenCollator(flash_kwargs=True))
    for name in args.forms.split(","):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="varlen").to(device)
        vhf.use(args.backend, model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, fused=device == "cuda")
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter)
        times, first = [], time.perf_counter()
        for i, b in enumerate(data):
            b = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in form(b, name).items()}
            sync()
            t = time.perf_counter()
            with torch.autocast(device, torch.bfloat16):
                loss = compiled(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= 5:
                times.append(1e3 * (time.perf_counter() - t))
        print(json.dumps({"label": args.label, "form": name, "layers": args.layers, "tokens": args.tokens,
                          "median_ms": round(statistics.median(times), 2), "graphs": counter.frame_count,
                          "loss": round(float(loss), 4), "wall_s": round(time.perf_counter() - first, 1)}), flush=True)


if __name__ == "__main__":
    main()
