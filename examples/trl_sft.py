"""TRL's SFTTrainer, padding-free, through varlen: no patched modeling file, no FlashAttention needed.

    python examples/trl_sft.py --steps 20 --out /tmp/varlen-trl            # padding-free batches
    python examples/trl_sft.py --packing --steps 20 --out /tmp/varlen-trl  # TRL's best-fit packing

A tiny random-initialised Llama (no hub download) trains on random-length samples; TRL flattens
each batch into one row with position_ids (and cu_seq_lens), and attn_implementation="varlen"
keeps every sample's attention to itself on any device and kernel (``--backend``).
"""

from __future__ import annotations

import argparse
import tempfile

import datasets
import torch
import transformers
from tokenizers import Tokenizer, models
from trl import SFTConfig, SFTTrainer

import varlen.hf


def tiny_tokenizer(vocab: int) -> transformers.PreTrainedTokenizerFast:
    words = {f"t{i}": i for i in range(vocab)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="t1")),
                                                pad_token="t0", eos_token="t2", unk_token="t1")


def counting_rows(n: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Samples that count up from a random token: learnable, so the loss falls."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (n,), generator=g).tolist()
    starts = torch.randint(3, vocab, (n,), generator=g).tolist()
    return [[3 + (s + i) % (vocab - 3) for i in range(n_)] for s, n_ in zip(starts, lengths)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--packing", action="store_true", help="TRL's best-fit packing into rows of --max-length")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--backend", default="auto", help="varlen's kernel: auto, flash, flex, sdpa, ...")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    vocab = 97
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=vocab, max_position_embeddings=512,
                                      pad_token_id=0, eos_token_id=2, bos_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="varlen")
    varlen.hf.use(args.backend, model)  # this model's kernel
    train = datasets.Dataset.from_dict({"input_ids": counting_rows(512, 64, vocab)})
    packing = dict(packing=True, packing_strategy="bfd", max_length=args.max_length) if args.packing else {"max_length": None}
    sft = SFTConfig(output_dir=args.out or tempfile.mkdtemp(), per_device_train_batch_size=8, max_steps=args.steps,
                    learning_rate=3e-3, logging_steps=5, padding_free=True, report_to=[],
                    use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), **packing)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=train, processing_class=tiny_tokenizer(vocab))
    result = trainer.train()
    print(f"trained {result.global_step} steps padding-free through varlen; final loss {result.training_loss:.3f}")


if __name__ == "__main__":
    main()
