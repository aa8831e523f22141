"""HF's Trainer with varlen's token budget (varlen.trainer) on a saved model folder and a JSONL of
text rows; rank 0 writes the trained weights. Run alone or under torchrun (gloo)."""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import varlen.hf
from varlen.train.data import load
from varlen.trainer import token_budget_trainer

model_dir, data, out, steps, lr, max_tokens, seed, kind = sys.argv[1:9]
resume = sys.argv[9] if len(sys.argv) > 9 else None  # "save": checkpoints every 2 steps; a folder: resume from it
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="varlen", dtype=torch.float32)
varlen.hf.use("auto", model)
rows = load(data, num_samples=0, max_len=512, vocab_size=len(tok), seed=0, too_long="truncate", tokenizer=tok).rows
if kind == "sft":  # TRL's SFTTrainer on the pre-tokenised rows, as a datasets.Dataset
    import datasets
    from trl import SFTConfig, SFTTrainer

    Args, base, extra = SFTConfig, SFTTrainer, {"processing_class": tok}
    precision = {"bf16": False}  # SFTConfig turns bf16 on by default; the comparison is in float32
    train = datasets.Dataset.from_list([{"input_ids": ids} for ids, _ in rows])
else:
    Args, base, extra = TrainingArguments, Trainer, {}
    precision = {}
    train = [{"input_ids": ids} for ids, _ in rows]
args = Args(output_dir=out, max_steps=int(steps), learning_rate=float(lr), optim="sgd",
                         lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, seed=int(seed),
                         use_cpu=True, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None, report_to=[], save_strategy="steps" if resume == "save" else "no", save_steps=2, logging_steps=1,
                         dataloader_num_workers=0, disable_tqdm=True, **precision)
trainer = token_budget_trainer(base)(model=model, args=args, train_dataset=train, max_tokens=int(max_tokens), **extra)
trainer.train(resume_from_checkpoint=resume if resume not in (None, "save") else None)
if args.process_index == 0:
    (Path(out) / "world.txt").write_text(str(args.world_size))
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, str(Path(out) / "weights.safetensors"))
