"""Fine-tune a stock HuggingFace model padding-free with HF's Trainer and varlen's collator.

    python examples/hf_trainer.py --model llama --steps 20 --out /tmp/varlen-trainer

A tiny random-initialised model (no hub download) trains on random-length samples packed into
one row per step; attention runs through ``attn_implementation="varlen"``. Point
``--model`` at a hub name on a machine that has it to fine-tune a real model the same way.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import varlen.hf

TINY = {
    "llama": lambda: LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, vocab_size=256, max_position_embeddings=512,
                                 bos_token_id=1, eos_token_id=2),
}


def counting_samples(n: int, max_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """Samples of random length that count up from a random token: learnable, so the loss falls."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (n,), generator=g).tolist()
    starts = torch.randint(3, vocab, (n,), generator=g).tolist()
    return [{"input_ids": [3 + (s - 3 + i) % (vocab - 3) for i in range(L)]} for s, L in zip(starts, lengths)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="llama", help="'llama' (tiny random) or a hub name")
    p.add_argument("--backend", default="auto", help="varlen backend behind attn_implementation='varlen'")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8, help="samples per packed row")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--out", default="/tmp/varlen-trainer")
    args = p.parse_args(argv)

    cfg = TINY[args.model]() if args.model in TINY else AutoConfig.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="varlen")
    varlen.hf.use(args.backend, model)  # this model's kernel
    data = counting_samples(args.steps * args.batch_size, args.max_len, cfg.vocab_size)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                               learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no",
                               use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0),
        train_dataset=data,
        data_collator=varlen.hf.VarlenCollator(),
    )
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"trained {result.global_step} steps padding-free; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return {"steps": result.global_step, "losses": losses}


if __name__ == "__main__":
    main()
