"""The host's time for one eager step, alone: the Python and dispatch that issue a step's kernels.

Before each step the GPU is handed a sleep kernel longer than the step's launches, so no launch
waits for the GPU and no GPU time hides in the span timed; a step whose launches outlast the sleep
(a host-device sync inside, or a full launch queue) is reported as such instead of as host time.
Only ``SeqInfo``, ``Decoder`` and ``varlen.hf``'s collator and registration are used, so the same
script times older versions of the library on one machine (``PYTHONPATH=<their src>``), and the
versions can be run in turns:

    PYTHONPATH=src python benchmarks/host_time.py --model decoder --preset study --mode eval

Needs a CUDA GPU (on the CPU it times the step as it runs, which is not the host's share alone).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from varlen import SeqInfo


def lengths(tokens: int, seed: int = 0) -> list[int]:
    """Long-tailed sample lengths (lognormal, 16..1024) adding up to ``tokens``."""
    rng, out = random.Random(seed), []
    while sum(out) < tokens:
        out.append(min(1024, max(16, int(rng.lognormvariate(5.5, 0.8)))))
    out[-1] -= sum(out) - tokens
    return [n for n in out if n > 0]


def decoder_step(args, device):
    from varlen.models import Decoder, DecoderConfig

    cfg = DecoderConfig.from_name(args.preset, vocab_size=1024, max_len=1024)
    model = Decoder(cfg, backend=args.backend).to(device).train(args.mode == "train")
    lens = lengths(args.tokens)
    info = SeqInfo.from_lengths(lens).to(device)
    ids = torch.randint(0, 1024, (sum(lens),), device=device)
    return model, lambda: model(ids, info=info), len(lens)


def hf_step(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    import varlen.hf as vhf

    layers = {"small": 4, "study": 24}[args.preset]
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    # bf16 weights, not autocast: varlen before 2.x took no float32 rotary q, k under autocast
    model = LlamaForCausalLM._from_config(config, attn_implementation="varlen").to(device, torch.bfloat16)
    vhf.use(args.backend, model)
    model.train(args.mode == "train")
    lens = lengths(args.tokens)
    batch = vhf.VarlenCollator()([{"input_ids": torch.randint(0, 1024, (n,))} for n in lens])
    batch = {k: v.to(device) for k, v in batch.items()}
    batch.pop("labels")
    return model, lambda: model(**batch).logits, len(lens)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["decoder", "hf-llama"], default="decoder")
    p.add_argument("--preset", default="study", help="decoder preset; hf-llama: small (4 layers) or study (24)")
    p.add_argument("--mode", choices=["eval", "train"], default="eval", help="train: forward and backward")
    p.add_argument("--backend", default="flash:torch")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=100, help="timed steps, after 20 untimed")
    p.add_argument("--sleep-ms", type=float, default=40.0, help="the GPU's head start a step")
    p.add_argument("--label", default="")
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, fn, seqs = (decoder_step if args.model == "decoder" else hf_step)(args, device)
    train = args.mode == "train"
    cycles = int(args.sleep_ms * 1e-3 * 1.98e9)  # ~1.98 GHz SM clock (H100 boost): a lower clock sleeps longer
    times, waited = [], 0
    for i in range(20 + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda._sleep(cycles)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(train), torch.autocast(device.type, torch.bfloat16, enabled=args.model == "decoder"):
            t0 = time.perf_counter()
            out = fn()
            if train:
                out.float().sum().backward()
            dt = time.perf_counter() - t0
        if device.type == "cuda":  # the GPU done, or launches as long as its head start: the host waited for it
            waited += i >= 20 and (torch.cuda.current_stream().query() or dt > 0.8e-3 * args.sleep_ms)
            torch.cuda.synchronize()
        if i >= 20:
            times.append(1e3 * dt)
    q = statistics.quantiles(times, n=10)
    print(json.dumps({"label": args.label, "model": args.model, "preset": args.preset, "mode": args.mode,
                      "backend": args.backend, "tokens": args.tokens, "sequences": seqs,
                      "median_ms": round(statistics.median(times), 3), "p10_ms": round(q[0], 3),
                      "p90_ms": round(q[-1], 3), "steps": len(times), "steps_host_waited": int(waited)}))


if __name__ == "__main__":
    main()
