"""Fine-tune a saved causal LM on real documents, padding-free, then export and reload it.

The documents are the Python standard library's sources (every machine has them: long-tailed,
real lengths). A byte-level BPE tokenizer is trained on them and a small Llama-shaped model with
random weights is saved beside it, as a real checkpoint folder would be; ``varlen train --model``
fine-tunes that folder with held-out evaluation, a cosine schedule and clipping, ``--export``
writes a ``save_pretrained`` folder, and transformers alone loads it back.

    python examples/finetune_stdlib.py --work /tmp/stdlib-ft            # CPU, a few minutes
    python examples/finetune_stdlib.py --work /tmp/stdlib-ft --device cuda --steps 200 --hidden 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from varlen.corpus import save_model_folder, stdlib_documents, train_tokenizer, write_text_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="a folder for the model, the data, the run and the export")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--docs", type=int, default=400, help="standard-library files used")
    args = p.parse_args()

    docs = stdlib_documents(limit=args.docs)
    tok = train_tokenizer(docs, vocab_size=2048)
    model_dir = save_model_folder(args.work / "model", tok, "llama", hidden_size=args.hidden,
                                  intermediate_size=4 * args.hidden, num_hidden_layers=4, num_attention_heads=4,
                                  max_position_embeddings=4096)
    data = write_text_jsonl(docs, args.work / "docs.jsonl")
    subprocess.run([sys.executable, "-m", "varlen.train", "--model", str(model_dir), "--data", str(data),
                    "--device", args.device, "--steps", str(args.steps), "--max-tokens", "16384", "--max-len", "4096",
                    "--truncate", "--optimizer", "adamw", "--lr", "2e-3", "--lr-schedule", "cosine",
                    "--warmup-steps", str(max(1, args.steps // 10)), "--max-grad-norm", "1.0", "--eval-split", "0.05",
                    "--eval-every", str(max(1, args.steps // 3)), "--out", str(args.work / "run"), "--overwrite",
                    "--export", str(args.work / "export")], check=True)
    log = [json.loads(x) for x in (args.work / "run" / "train_log.jsonl").read_text().splitlines()]
    for row in (r for r in log if "eval_loss" in r):
        print(f"step {row['step']:4d}: held-out loss {row['eval_loss']:.3f}, perplexity {row['eval_ppl']:.1f}")

    from transformers import AutoModelForCausalLM, AutoTokenizer  # no varlen from here on

    model = AutoModelForCausalLM.from_pretrained(args.work / "export")
    tokenizer = AutoTokenizer.from_pretrained(args.work / "export")
    prompt = tokenizer("def ", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    print("reloaded; greedy continuation of 'def ':", repr(tokenizer.decode(out[0], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
