"""Fine-tuning side by side (issue 28's measurement): one saved Llama-shaped folder, the standard
library's sources as documents, the same seed; each way a user would train it, in its own process.

    python benchmarks/finetune_compare.py --out DIR [--work DIR] [--size 1b|tiny] [--steps N] [--only NAME,...]

Runs (``--only`` picks):
- ``hf-padded``: HF ``Trainer`` as its docs say: ``DataCollatorForLanguageModeling`` (pad to the
  longest), ``attn_implementation="sdpa"``, bf16;
- ``hf-flattening``: ``Trainer`` with ``DataCollatorWithFlattening`` (transformers' own padding-free
  path), ``sdpa``, ``torch_compile=True``;
- ``varlen-train``: ``varlen train --model DIR --compile``; ``varlen-train-chunked`` with
  ``--loss-chunk 4096`` (the head inside the loss: no [T, vocab] logits at once);
- ``varlen-trainer``: ``Trainer`` with varlen's batches (``varlen.trainer``) and attention.

The Trainer runs take ``--batch`` samples a device step (their own batching); the varlen runs take
``--max-tokens`` a step. Each run writes ``NAME.json``: tokens/s over the steps after the first
``--timing-warmup`` (real tokens, padding excluded), peak memory, the median step, the loss curve;
``results.json`` collects them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # Llama-shaped, GQA; "1b": about 1.25B parameters with a 128K vocabulary
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               vocab=128256, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab=2048,
                 max_position_embeddings=1024),
}
RUNS = ("hf-padded", "hf-flattening", "varlen-train", "varlen-train-chunked", "varlen-trainer")


def prepare(out: Path, size: str, docs_limit: int | None) -> tuple[Path, Path]:
    """The model folder (random init, saved) and the documents as text rows; made once."""
    from varlen.corpus import save_model_folder, stdlib_documents, train_tokenizer, write_text_jsonl

    model, data = out / "model", out / "docs.jsonl"
    if not (model / "config.json").exists():
        docs = stdlib_documents(limit=docs_limit)
        tok = train_tokenizer(docs, vocab_size=min(32768, SIZES[size]["vocab"]))
        sizes = {k: v for k, v in SIZES[size].items() if k != "vocab"}
        save_model_folder(model, tok, "llama", vocab_size=SIZES[size]["vocab"], **sizes)
        write_text_jsonl(docs, data)
    return model, data


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


class Timer:
    """A TrainerCallback: each optimizer step's wall time (synchronised) and its real tokens."""

    def __init__(self):
        import torch
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                sync()
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                sync()
                timer.ms.append(1e3 * (time.perf_counter() - timer.t0))

        self.ms, self.callback = [], CB()


def hf_run(name: str, model_dir: Path, data: Path, args) -> dict:
    """One Trainer run in this process."""
    import torch
    import transformers as tf

    gpu = torch.cuda.is_available()
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(x)["text"] for x in data.read_text().splitlines()]
    ids = [tok(t)["input_ids"][: args.max_len - 1] + [tok.eos_token_id] for t in rows]
    attn = "varlen" if name == "varlen-trainer" else "sdpa"
    if attn == "varlen":
        import varlen.hf
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    if attn == "varlen":
        varlen.hf.use(args.backend, model)
    targs = tf.TrainingArguments(
        output_dir=str(args.out / name), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=2e-4, lr_scheduler_type="constant", optim="adamw_torch_fused" if gpu else "adamw_torch",
        bf16=gpu, use_cpu=not gpu, seed=0, logging_steps=1, report_to=[], save_strategy="no",
        dataloader_num_workers=2 if gpu else 0, disable_tqdm=True, torch_compile=gpu and name != "hf-padded",
        max_grad_norm=1.0)
    timer = Timer()
    counted = {"tokens": []}
    if name == "hf-padded":
        collate = tf.DataCollatorForLanguageModeling(tok, mlm=False)
    elif name == "hf-flattening":
        collate = tf.DataCollatorWithFlattening()
    kw = dict(model=model, args=targs, train_dataset=[{"input_ids": x} for x in ids], callbacks=[timer.callback])
    if name == "varlen-trainer":
        from varlen.trainer import token_budget_trainer

        trainer = token_budget_trainer(tf.Trainer)(**kw, max_tokens=args.max_tokens, max_seqlen=args.max_len)
    else:
        trainer = tf.Trainer(**kw, data_collator=collate)
    original = trainer.training_step

    def counting_step(model, inputs, num_items_in_batch=None):
        real = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
        counted["tokens"].append(int(real))
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = counting_step
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return summarise(name, timer.ms, counted["tokens"], losses, args)


def varlen_run(name: str, model_dir: Path, data: Path, args) -> dict:
    import torch

    out = args.out / name
    cmd = [sys.executable, "-m", "varlen.train", "--model", str(model_dir), "--data", str(data), "--max-len",
           str(args.max_len), "--truncate", "--max-tokens", str(args.max_tokens), "--steps", str(args.steps),
           "--optimizer", "adamw", "--lr", "2e-4", "--weight-decay", "0", "--max-grad-norm", "1.0", "--compile",
           "--backend", args.backend, *([] if torch.cuda.is_available() else ["--device", "cpu"]), "--timing-warmup", str(args.timing_warmup), "--no-progress", "--overwrite",
           "--out", str(out), *(["--loss-chunk", "4096"] if name.endswith("chunked") else [])]
    if subprocess.run(cmd).returncode != 0:
        return None
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    s = json.loads((out / "summary.json").read_text())
    rec = summarise(name, [r["step_ms"] for r in log], [r["tokens"] for r in log],
                    [r["loss"] for r in log], args)
    rec["peak_mem_gib"] = s["peak_mem_gib"]
    rec["tokens_per_s_summary"] = s["tokens_per_s"]
    return rec


def summarise(name: str, ms: list[float], tokens: list[int], losses: list[float], args) -> dict:
    k = min(args.timing_warmup, len(ms) - 1)
    return {"name": name, "tokens_per_s": 1e3 * sum(tokens[k:]) / sum(ms[k:]),
            "step_ms_median": statistics.median(ms[k:]), "peak_mem_gib": peak_gib(),
            "steps": len(ms), "tokens_per_step_median": statistics.median(tokens), "losses": losses,
            "step_ms": [round(x, 2) for x in ms], "tokens": tokens}


def plot(records: list[dict], path: Path) -> None:
    """The loss curves side by side, each beside its 10-step moving mean (one step's loss is noisy:
    each run draws other samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in records:
        losses = r["losses"]
        mean = [statistics.mean(losses[max(0, i - 9): i + 1]) for i in range(len(losses))]
        (line,) = ax.plot(range(1, len(losses) + 1), mean, label=f"{r['name']} ({r['tokens_per_s']:,.0f} tokens/s)")
        ax.plot(range(1, len(losses) + 1), losses, color=line.get_color(), alpha=0.2, linewidth=0.8)
    ax.set(xlabel="optimizer step", ylabel="training loss (10-step mean)", ylim=(None, 10))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=None, help="where the model folder and the documents go (default: --out)")
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--timing-warmup", type=int, default=15)
    p.add_argument("--max-len", type=int, default=4096)
    # the corpus's mean sample is ~2,000 tokens (at most 4,096): 4 samples and 8,192 tokens a step put
    # about as many real tokens into each step of both kinds, so that peak memory compares
    p.add_argument("--batch", type=int, default=4, help="Trainer runs: samples a device step")
    p.add_argument("--max-tokens", type=int, default=8192, help="varlen runs: tokens a step")
    p.add_argument("--backend", default="auto")
    p.add_argument("--docs", type=int, default=None, help="standard-library files used (default: all)")
    p.add_argument("--only", default=",".join(RUNS))
    p.add_argument("--prepare-only", action="store_true", help="make the model folder and the documents, run nothing")
    p.add_argument("--plot-only", action="store_true", help="draw loss_curves.png from --out's results.json, run nothing")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a Trainer run, in a process of its own
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        return plot(json.loads((args.out / "results.json").read_text()), args.out / "loss_curves.png")
    model_dir, data = prepare(args.work or args.out, args.size, args.docs)
    if args.prepare_only:
        return
    if args.one:
        rec = hf_run(args.one, model_dir, data, args)
        (args.out / f"{args.one}.json").write_text(json.dumps(rec, indent=1))
        return
    records = []
    for name in args.only.split(","):
        if name.startswith("varlen-train"):
            rec = varlen_run(name, model_dir, data, args)
            if rec is not None:
                (args.out / f"{name}.json").write_text(json.dumps(rec, indent=1))
        else:
            subprocess.run([sys.executable, *sys.argv, "--one", name], check=False, env=os.environ)
        path = args.out / f"{name}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
            r = records[-1]
            print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s, median step {r['step_ms_median']:.1f} ms, "
                  f"peak {r['peak_mem_gib']} GiB, loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}", flush=True)
        else:
            print(f"{name}: failed (no record)", flush=True)
    (args.out / "results.json").write_text(json.dumps(records, indent=1))
    if records:
        plot(records, args.out / "loss_curves.png")


if __name__ == "__main__":
    main()
