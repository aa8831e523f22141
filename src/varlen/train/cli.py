"""``varlen train`` / ``python -m varlen.train``: packed training under torchrun.

    varlen train --model DIR --data docs.jsonl --optimizer adamw --lr-schedule cosine --export OUT
    torchrun --standalone --nproc-per-node 2 -m varlen.train --preset tiny --device cpu \\
        --steps 5 --max-tokens 4096 --seed 0 --out DIR

``--max-tokens`` is the token budget of one optimizer step across all ranks (and micro-steps), so
a run means the same thing on 1 or 8 GPUs: the loss column does not depend on the process count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import NoReturn

import torch

from ..argtypes import (backend_name, default_device, device_name, device_problem, dtype_name, nonneg_float, nonneg_int,
                        positive_float, positive_int, runtime_error, usage_error)
from ..attention import pads_to_max_seqlen
from ..buckets import GRAPH_BUCKETS_PER_OCTAVE, ceil_div, graph_num_seqs
from ..data import CostModel, TokenBudgetSampler, move_batch
from ..measure import GarbageCollection, compile_counter, graph_count, since, start
from ..models import DecoderConfig, family
from ..models.decoder import PRESETS
from ..loss import cross_entropy_sum, linear_cross_entropy_sum
from ..models.families import HiddenStates, PretrainedFamily, head_refusal
from ..levers import Levers
from ..parallel import context_shard, shard_batch
from . import checkpoint
from .cost import measure_cost
from .data import DataError, DataReport, TrainCollator, fingerprint, load
from ..options import add_flags, from_args
from .distributed import Dist, Wrapping, all_agree, from_rank0, per_rank, run_then_teardown, setup, wrap
from .guard import FiniteGuard, NonFinite
from .evaluate import evaluate, hold_out
from .export import export, export_refusal
from .lock import LockHeld, RunLock
from .optim import SCHEDULES, Schedule, make_optimizer
from .text import TextError, load_tokenizer
from .step import train_step
from .watchdog import Watchdog, process_group_timeout


def parse_args(argv):
    p = argparse.ArgumentParser(prog="varlen train", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (model_and_data_args, parallel_args, optimizer_args, lever_args, run_args):
        add(p)
    args = p.parse_args(argv)
    check_flags(p, args)
    check_model(p, args)
    return args


def model_and_data_args(p: argparse.ArgumentParser) -> None:
    """The model trained and the data it trains on."""
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model size of decoder / hf-gpt2 / hf-llama (default tiny); varlen bench's presets of the same names "
                        "run the same model")
    p.add_argument("--model", default="decoder", metavar="NAME|DIR",
                   help="a folder holding a saved HF causal LM (config.json, safetensors weights, tokenizer files) to "
                        "fine-tune; or, for the study, varlen's decoder, hf-gpt2 or hf-llama of --preset's size with "
                        "random weights")
    p.add_argument("--backend", type=backend_name, default="auto",
                   help="attention backend: auto, flash, flash:fa4|fa2|torch, xformers, flex, sdpa, nested, reference")
    p.add_argument("--device", type=device_name, default=default_device(),
                   help="cpu, cuda or cuda:N (one process; under torchrun each rank takes the GPU of its LOCAL_RANK)")
    p.add_argument("--steps", type=positive_int, default=20, help="optimizer steps")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="tokens of one optimizer step, all ranks together")
    p.add_argument("--max-tokens-per-rank", type=positive_int, default=None, help="alternatively: tokens per rank and step")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--data", default="uniform",
                   help="uniform | lognormal | fixed | a file of lengths | FILE.jsonl | hf:NAME_OR_PATH[:split]; JSONL "
                        "rows and dataset columns hold token ids, text ({\"text\": ...}, EOS appended) or chat "
                        "({\"messages\": [...]}, the loss on assistant turns only), the last two for --model DIR")
    p.add_argument("--eval-split", type=fraction, default=0.0, metavar="F",
                   help="hold out this fraction of the samples (chosen by --seed) and evaluate on them")
    p.add_argument("--eval-every", type=nonneg_int, default=0, metavar="N",
                   help="evaluate every N steps (and after the last); 0: after the last step only")
    long = p.add_mutually_exclusive_group()
    long.add_argument("--truncate", action="store_true", help="cut samples longer than a step takes (default: an error)")
    long.add_argument("--drop-long", action="store_true", help="drop samples longer than a step takes")
    p.add_argument("--num-samples", type=positive_int, default=100_000, help="synthetic samples in an epoch")
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="longest sample (default and most: the preset's positions - 1)")


def parallel_args(p: argparse.ArgumentParser) -> None:
    """How a step is split over ranks and shaped."""
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp2"], default=None, help="default: ddp on several processes")
    p.add_argument("--cp", type=positive_int, default=1,
                   help="context parallelism: N ranks share each packed row, a slice each (Ulysses)")
    p.add_argument("--split", choices=["balanced", "naive"], default="balanced",
                   help="how a global batch is split over ranks: by a cost model, or by sample count")
    p.add_argument("--cost", choices=["flops", "measure"], default="flops",
                   help="the cost model's weights: from FLOPs, or timed once on this device and model")
    p.add_argument("--window", type=positive_int, default=None, help="samples packed together (default ~32 batches' worth)")
    p.add_argument("--static", action="store_true", help="every step has the same shape (filler tokens)")


def optimizer_args(p: argparse.ArgumentParser) -> None:
    """The optimizer, its schedule and the loss."""
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="the peak learning rate")
    p.add_argument("--weight-decay", type=nonneg_float, default=None,
                   help="AdamW's decoupled weight decay (default 0.01), on linear layers' matrices only (not on biases, "
                        "norms, embeddings)")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="constant",
                   help="after the warm-up: constant, or linear / cosine decay to --min-lr-ratio x --lr at --steps")
    p.add_argument("--warmup-steps", type=nonneg_int, default=0, help="learning-rate warm-up: linear from 0 over N steps")
    p.add_argument("--min-lr-ratio", type=fraction, default=0.0, help="where linear / cosine decay ends, as a fraction of --lr")
    p.add_argument("--max-grad-norm", type=positive_float, default=None,
                   help="scale the gradients down to this total norm when above it (default: no clipping; the "
                        "norm is logged either way)")
    p.add_argument("--loss-chunk", type=nonneg_int, default=0, metavar="N",
                   help="HF models: apply the LM head inside the loss, N tokens at a time, never holding all [T, vocab] "
                        "logits (large vocabularies); 0: the model's own logits")


def lever_args(p: argparse.ArgumentParser) -> None:
    """Precision, the decoder's kernels, data-parallel wrapping, compilation."""
    p.add_argument("--dtype", type=dtype_name("bf16", "fp32"), default=None, metavar="{bf16,fp32}",
                   help="autocast dtype (default: bf16 on CUDA)")
    Levers.add_flags(p)  # --residual-dtype, --gelu, --mlp-kernel, --fp8: shared with varlen bench
    add_flags(Wrapping, p)  # --reduce-dtype, --bucket-mb, --static-graph, --reshard-after-forward: as the sweep's
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with --compile, on one GPU, one micro-batch a step: the model as CUDA graphs (rows padded "
                        "to one number of sequences and one of 8 sizes an octave, a graph recorded per size the "
                        "first time it comes), for steps bound by kernel launches (few tokens a step)")
    p.add_argument("--num-workers", type=nonneg_int, default=None, help="DataLoader workers (default 2 on CUDA, 0 on CPU)")
    p.add_argument("--gc-every", type=nonneg_int, default=50,
                   help="Python's collector off, a collection every N steps on all ranks at once (0: Python's own)")


def run_args(p: argparse.ArgumentParser) -> None:
    """Seed, output, checkpoints and what the run reports."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="train_log.jsonl, train.png, summary.json, checkpoint/")
    p.add_argument("--save-every", type=nonneg_int, default=0, help="checkpoint every N steps into OUT/checkpoint")
    p.add_argument("--keep", type=positive_int, default=2, help="complete checkpoints kept (the newest)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds an earlier run")
    p.add_argument("--allow-change", default="", metavar="FIELD,...",
                   help=f"on --resume, accept these settings differing from the checkpoint's ({', '.join(CONFIG_FIELDS)})")
    p.add_argument("--log-every", type=positive_int, default=1, metavar="N",
                   help="read the loss, gradient norm and step time from the device every N steps, one read for all "
                        "N (the host then runs ahead of the device); a non-finite step is skipped on the device by "
                        "the fused optimizer and ends the run at the next read, with the weights of the step before")
    p.add_argument("--timing-warmup", type=nonneg_int, default=2, metavar="N",
                   help="steps left out of the summary's timings (not the learning rate's: --warmup-steps)")
    p.add_argument("--warmup", type=renamed_warmup, help=argparse.SUPPRESS)
    p.add_argument("--export", type=Path, default=None, metavar="DIR",
                   help="after training, write the model as a save_pretrained folder (safetensors, config, tokenizer)")
    p.add_argument("--stall-timeout", type=nonneg_float, default=300.0, metavar="S",
                   help="end the run (every rank, one line naming the rank that stopped) when no step finishes for "
                        "S seconds; the first step, which compiles, gets 30 minutes more; 0: no watchdog")
    p.add_argument("--no-progress", action="store_true")


def check_flags(p: argparse.ArgumentParser, args) -> None:
    """Flags that cannot work together: one line each (exit 2), before anything runs."""
    if (args.resume or args.save_every) and args.out is None:
        p.error("--resume and --save-every need --out")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out, --overwrite starts over: choose one")
    if args.max_tokens and args.max_tokens_per_rank:
        p.error("give --max-tokens or --max-tokens-per-rank, not both")
    if args.static_graph and args.grad_accum > 1:
        p.error("--static-graph with --grad-accum > 1 is broken in PyTorch (pytorch/pytorch#187732); drop one of them")
    if args.cuda_graphs and not args.compile:
        p.error("--cuda-graphs records what torch.compile generates: add --compile")
    if args.cuda_graphs and args.grad_accum > 1:
        p.error("--cuda-graphs with --grad-accum > 1: gradients summed over graph replays are not supported here; "
                "one micro-batch a step")
    if args.cuda_graphs and args.static:
        p.error("--cuda-graphs pads rows itself (8 sizes an octave, a graph each): drop --static")
    if args.cuda_graphs and args.device == "cpu":
        p.error("--cuda-graphs needs a CUDA device")
    unknown = set(filter(None, args.allow_change.split(","))) - set(CONFIG_FIELDS)
    if unknown:
        p.error(f"--allow-change: unknown field(s) {', '.join(sorted(unknown))}; choose from {', '.join(CONFIG_FIELDS)}")


def check_model(p: argparse.ArgumentParser, args) -> None:
    """The model's sizes against --cp and --max-len; the optimizer's and schedule's flags."""
    try:
        cfg = model_config(args)
    except ValueError as e:
        p.error(str(e))
    if not os.path.isdir(args.model):
        args.preset = args.preset or "tiny"
    if cfg.n_heads % args.cp:
        p.error(f"--cp {args.cp}: context parallelism splits the heads, and {model_label(args)} has {cfg.n_heads}")
    if args.max_len is not None and args.max_len >= cfg.max_len:
        p.error(f"--max-len {args.max_len}: {model_label(args)} takes samples of at most {cfg.max_len - 1} tokens; "
                "choose a larger model or a shorter --max-len")
    if args.weight_decay is not None and args.optimizer != "adamw":
        p.error("--weight-decay is AdamW's: add --optimizer adamw")
    args.weight_decay = 0.01 if args.weight_decay is None else args.weight_decay
    if args.eval_every and not args.eval_split:
        p.error("--eval-every needs held-out samples: add --eval-split F")
    if args.warmup_steps >= args.steps and args.lr_schedule != "constant":
        p.error(f"--warmup-steps {args.warmup_steps} leaves no step of the {args.lr_schedule} decay within "
                f"--steps {args.steps}")


def renamed_warmup(_value: str):
    raise argparse.ArgumentTypeError("renamed: --timing-warmup N leaves N steps out of the timings, --warmup-steps N "
                                     "warms the learning rate up")


def fraction(text: str) -> float:
    value = nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction below 1")
    return value


def model_config(args) -> DecoderConfig:
    """The sizes of the model trained: a preset's, or those of the folder's config."""
    fam = family(args.model)
    if isinstance(fam, PretrainedFamily):
        if args.preset is not None:
            raise ValueError(f"--preset sizes the study's models; --model {args.model} is a folder with its own config")
        return fam.sizes()
    return DecoderConfig.from_name(args.preset or "tiny")


def model_label(args) -> str:
    return f"--model {args.model}" if os.path.isdir(args.model) else f"preset {args.preset or 'tiny'}"


# The settings a checkpoint is tied to: resuming with another value changes what the run computes.
CONFIG_FIELDS = ("model", "preset", "backend", "data", "data_fingerprint", "num_samples", "max_len", "too_long",
                 "max_tokens", "grad_accum", "split", "cost", "window", "static", "optimizer", "lr", "seed",
                 "world_size", "parallel", "cp", "dtype", "reduce_dtype", "residual_dtype", "fp8", "gelu", "mlp_kernel",
                 "max_grad_norm", "weight_decay", "lr_schedule", "warmup_steps", "min_lr_ratio", "schedule_steps",
                 "eval_split", "loss_chunk")


def fail(message: str) -> NoReturn:
    """An expected failure (bad data, a bad --out, a config mismatch): one line, exit code 2.
    Every rank gets here alike; rank 0 speaks."""
    if int(os.environ.get("RANK", "0")) == 0:
        usage_error("varlen train", message)
    raise SystemExit(2)


def stop(message: str) -> NoReturn:
    """A failure while training (a non-finite loss, a failed save, out of memory): one line, exit
    code 1. Every rank gets here alike; rank 0 speaks."""
    if int(os.environ.get("RANK", "0")) == 0:
        runtime_error("varlen train", message)
    raise SystemExit(1)


def say(message: str) -> None:
    print(f"varlen train: {message}", flush=True)


def make_plot(log: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps = [r["step"] for r in log]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, [r["loss"] for r in log], label="train")
    evals = [r for r in log if "eval_loss" in r]
    if evals:
        a.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held out")
        a.legend()
    a.set(xlabel="step", ylabel="loss", title="loss")
    b.plot(steps, [r["tokens"] / r["step_ms"] for r in log])
    b.set(xlabel="step", ylabel="k tokens / s", title="throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    why = device_problem(args.device)
    if why:
        usage_error("varlen train", why)
    try:
        d = setup(args.device, process_group_timeout(args.stall_timeout))
    except ValueError as e:  # a device choice torchrun's ranks cannot follow
        usage_error("varlen train", str(e))
    return run_then_teardown(run, args, d)


def load_data(args, cfg: DecoderConfig, micro_budget: int, report: DataReport, tokenizer=None):
    """The dataset, every row checked; samples longer than a step takes follow --truncate /
    --drop-long, else stop the run with the row named."""
    max_len = args.max_len or cfg.max_len - 1
    longest = min(max_len, micro_budget)
    too_long = "truncate" if args.truncate else "drop" if args.drop_long else "error"
    try:
        ds = load(args.data, num_samples=args.num_samples, max_len=max_len, vocab_size=cfg.vocab_size,
                  seed=args.seed, too_long=too_long, report=report, longest=longest, tokenizer=tokenizer)
    except (DataError, ValueError) as e:
        fail(str(e))
    if max(ds.lengths) > micro_budget:  # synthetic lengths up to --max-len
        fail(f"samples reach {max(ds.lengths)} tokens but a micro-step takes {micro_budget} (--max-tokens "
             f"{args.max_tokens or '(per rank x ranks)'} / --grad-accum {args.grad_accum}); raise --max-tokens")
    return ds, max_len, too_long


def run_config(args, d: Dist, budget: int, parallel: str, dtype: str, max_len: int, too_long: str) -> dict:
    """The settings this run's checkpoints are tied to (CONFIG_FIELDS)."""
    try:
        data_fp = fingerprint(args.data)
    except DataError as e:
        fail(str(e))
    return {"model": args.model, "preset": args.preset, "backend": args.backend, "data": args.data,
            "data_fingerprint": data_fp, "num_samples": args.num_samples, "max_len": max_len, "too_long": too_long,
            "max_tokens": budget, "grad_accum": args.grad_accum, "split": args.split, "cost": args.cost,
            "window": args.window, "static": args.static, "optimizer": args.optimizer, "lr": args.lr,
            "seed": args.seed, "world_size": d.world_size, "parallel": parallel, "cp": args.cp, "dtype": dtype,
            "reduce_dtype": args.reduce_dtype,
            # only when changed: checkpoints from before the option resume as float32 runs
            **Levers.from_args(args).changed(),
            **({"max_grad_norm": args.max_grad_norm} if args.max_grad_norm is not None else {}),
            **({"weight_decay": args.weight_decay} if args.optimizer == "adamw" else {}),
            **({"lr_schedule": args.lr_schedule, "schedule_steps": args.steps, "min_lr_ratio": args.min_lr_ratio}
               if args.lr_schedule != "constant" else {}),
            **({"warmup_steps": args.warmup_steps} if args.warmup_steps else {}),
            **({"eval_split": args.eval_split} if args.eval_split else {}),
            **({"loss_chunk": args.loss_chunk} if args.loss_chunk else {})}


# what a run writes into --out besides checkpoints
EARLIER_RUN = ("train_log.jsonl", "summary.json", "train.png", "tensorboard")


def claim_out(args, d: Dist) -> RunLock | None:
    """--out as a folder this run may write into, locked for this run alone (rank 0 holds the
    lock for the job); refused in one line when another live run holds it."""
    if args.out is None:
        return None
    if args.out.exists() and not args.out.is_dir():
        fail(f"--out {args.out} is a file; --out names a folder")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / f".write-test-{d.rank}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        fail(f"--out {args.out} is not writable ({e.strerror or e})")
    lock, held = RunLock(args.out), None
    if d.main:
        try:
            took_over = lock.acquire()
            if took_over:
                say(took_over)
        except LockHeld as e:
            held = str(e)
    if not all_agree(held is None, d):
        fail(held or "--out is in use by another run")
    return lock


def resume_point(args, d: Dist, config: dict) -> Path | None:
    """The checkpoint to resume from (the newest that passes its check), or None to start at step
    0. An --out holding an earlier run is refused without --resume or --overwrite; a checkpoint
    of other settings is refused, naming them, unless --allow-change lists them."""
    if args.out is None:
        return None
    root = args.out / "checkpoint"
    if args.overwrite:
        if d.main:
            shutil.rmtree(root, ignore_errors=True)
            for name in EARLIER_RUN:
                path = args.out / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return None
    if not args.resume:
        refuse_earlier_run(args, root)
        return None
    found = choose_checkpoint(root, d)
    if found is None:
        if d.main:
            say(f"no checkpoint in {root}; starting at step 0")
        return None
    allowed = set(filter(None, args.allow_change.split(",")))
    try:
        saved = checkpoint.config_of(found)
    except checkpoint.CheckpointError as e:
        fail(f"--resume: {e}")
    diffs = {k: v for k, v in checkpoint.differences(saved, config).items() if k not in allowed}
    if diffs:
        listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in diffs.items())
        fail(f"--resume: this run's settings differ from {found}'s: {listed}. Use that run's settings, or "
             f"--allow-change {','.join(diffs)} if the change is intended")
    if d.main and checkpoint.step_of(found) < args.steps:
        say(f"resuming from {found} (step {checkpoint.step_of(found)})")
    return found


def refuse_earlier_run(args, root: Path) -> None:
    """A fresh run into an --out that holds a checkpoint or another run's log: nothing is
    overwritten without being asked."""
    found = checkpoint.latest(root)
    if found is not None:
        fail(f"--out {args.out} holds a checkpoint of an earlier run (step {checkpoint.step_of(found)}); pass "
             "--resume to continue it or --overwrite to start over")
    earlier = [n for n in EARLIER_RUN if (args.out / n).exists()]
    if earlier:
        fail(f"--out {args.out} holds an earlier run's {', '.join(earlier)}; pass --overwrite to replace them "
             "(or --resume to continue that run from a checkpoint)")


def choose_checkpoint(root: Path, d: Dist) -> Path | None:
    """Rank 0 verifies the checkpoints, newest first, naming each one that fails; every rank gets
    its choice. Refused in one line when every checkpoint fails."""
    step, why = -1, ""
    if d.main:
        try:
            found = checkpoint.newest_good(root, say=say)
            step = -1 if found is None else checkpoint.step_of(found)
        except checkpoint.CheckpointError as e:
            step, why = -2, str(e)
    step = from_rank0(step, d)
    if step == -2:
        fail(f"--resume: {why}; pass --overwrite to start over")
    return None if step == -1 else checkpoint.folder(root, step)


def settings(args, d: Dist):
    """The run's derived settings, each refused in one line where it cannot work: the step's token
    budget (all ranks) and a micro-step's, the context shard, data-parallel groups, the parallelism
    and the autocast dtype."""
    why = args.export and export_refusal(args.export, args.model, family(args.model).hf, args.overwrite)
    if why:
        fail(why)
    budget = args.max_tokens or (args.max_tokens_per_rank or 16384) * d.world_size
    micro_budget = budget // args.grad_accum
    if micro_budget < 1:
        fail(f"--max-tokens {budget} over --grad-accum {args.grad_accum} micro-steps leaves no token per micro-step")
    try:
        shard = context_shard(d.rank, d.world_size, args.cp)
    except ValueError as e:
        fail(f"--cp {args.cp}: {e}")
    parallel = args.parallel or ("ddp" if d.world_size > 1 else "none")
    if parallel == "none" and d.world_size > 1:
        fail("--parallel none with several processes: choose ddp or fsdp2")
    if args.log_every > 1 and parallel == "fsdp2":
        fail("--log-every > 1 skips a non-finite step with the fused optimizer's flag, which FSDP2's sharded "
             "parameters do not take here; read every step (--log-every 1) with --parallel fsdp2")
    if args.cuda_graphs and d.world_size > 1:
        fail(f"--cuda-graphs runs one process; this run has {d.world_size} (DDP/FSDP2 with CUDA graphs is not supported)")
    dtype = args.dtype or ("bf16" if d.device.type == "cuda" else "fp32")
    levers = Levers.from_args(args)
    why = next(iter(levers.problems(args.model, dtype)), None) or levers.unavailable(d.device.type)
    if why:
        fail(why)
    return budget, micro_budget, shard, d.world_size // args.cp, parallel, dtype


def run(args, d: Dist) -> int:
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    budget, micro_budget, shard, dp, parallel, dtype = settings(args, d)
    lock = claim_out(args, d)
    try:
        return train(args, d, budget, micro_budget, shard, dp, parallel, dtype)
    finally:
        if lock is not None:
            lock.release()


def train(args, d: Dist, budget: int, micro_budget: int, shard, dp: int, parallel: str, dtype: str) -> int:
    fam = family(args.model)
    cfg = model_config(args) if isinstance(fam, PretrainedFamily) else DecoderConfig.from_name(
        args.preset, **Levers.from_args(args).decoder_fields())
    tokenizer = model_tokenizer(args, fam)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if dtype == "bf16" else None
    report = DataReport()
    ds, max_len, too_long = load_data(args, cfg, micro_budget, report, tokenizer)
    ds, held_out = hold_out(ds, args.eval_split, args.seed)
    config = run_config(args, d, budget, parallel, dtype, max_len, too_long)
    resume_from = resume_point(args, d, config)
    if resume_from is not None and checkpoint.step_of(resume_from) >= args.steps:
        return nothing_to_do(args, d, checkpoint.step_of(resume_from))
    model = build_model(args, fam, cfg).to(d.device)
    cost = measure_cost(model, fam, cfg, d, autocast) if args.cost == "measure" else \
        CostModel.from_flops(cfg.dim, cfg.n_layers, cfg.vocab_size)
    sampler = TokenBudgetSampler(ds.lengths, micro_budget, window=args.window, seed=args.seed,
                                 world_size=dp, rank=d.rank // args.cp, split=args.split, cost=cost)
    collate = make_collator(args, sampler, ds, max_len, d.device.type)
    trained, forward, loss_sum = head_in_loss(args, fam, model, parallel)
    wrapped = wrap(trained, parallel, d, **from_args(Wrapping, args).wrap_kwargs(),
                   param_dtype=torch.bfloat16 if dtype == "bf16" else None,
                   compile=args.compile, compile_mode="reduce-overhead" if args.cuda_graphs else None)
    opt = make_optimizer(args.optimizer, model, args.lr, args.weight_decay,
                         fused=parallel != "fsdp2" and (d.device.type == "cuda" or args.log_every > 1))
    step, batches_done = restore(resume_from, wrapped, opt, sampler, d)
    if d.main:
        info = {"world_size": d.world_size, "parallel": parallel, "cp": args.cp, "split": args.split, "max_tokens": budget,
                "grad_accum": args.grad_accum, "per_rank_budget": ceil_div(micro_budget, d.world_size), "data": args.data,
                "model": args.model, "preset": args.preset, "packing_efficiency": round(sampler.efficiency(), 4),
                "cost_per_token_sq": cost.per_token_sq, "cost_per_seq": cost.per_seq, "resumed_at": step,
                "held_out": len(held_out) if held_out else 0, "data_report": vars(report)}
        print("varlen train:", json.dumps(info), flush=True)
    eval_collate = make_collator(args, sampler, ds, max_len, d.device.type, plain=True)  # built once, not per eval
    evaluator = None if held_out is None else (lambda: evaluate(
        wrapped, forward, held_out, eval_collate, micro_budget, device=d.device, dp=dp, dp_rank=d.rank // args.cp,
        shard=shard, autocast=autocast, loss_sum=loss_sum))
    loop = Loop(args, d, wrapped, opt, sampler, ds, collate, config, autocast, shard, evaluator, forward, loss_sum)
    log = loop.run(step, batches_done)
    if d.main:
        compiled_late = graph_count() - loop.graphs_after_warmup if args.compile else None
        write_summary(args, d, log, loop.step, parallel, budget, sampler, report, compiled_late)
    if args.export:
        export(model, args.export, tokenizer, d.main)
        if d.main:
            say(f"exported to {args.export} (AutoModelForCausalLM.from_pretrained loads it)")
    return 0


def head_in_loss(args, fam, model, parallel: str):
    """(the module to wrap, forward, loss_sum): the model and its logits' cross-entropy, or with
    --loss-chunk the model without its head and the head applied in the loss, chunk by chunk."""
    if not args.loss_chunk:
        return model, fam.logits, cross_entropy_sum
    why = "varlen's decoder keeps its head (a small vocabulary)" if not fam.hf else head_refusal(model) or (
        "under FSDP2 the head's weight is sharded outside its module" if parallel == "fsdp2" else None)
    if why:
        fail(f"--loss-chunk: {why}")
    hidden = HiddenStates(model)

    def forward(m, batch):
        return m(**batch.hf_kwargs(), use_cache=False)

    def loss_sum(h, labels):
        return linear_cross_entropy_sum(h, hidden.head_weight, labels, chunk=args.loss_chunk)

    return hidden, forward, loss_sum


def model_tokenizer(args, fam):
    """The folder's tokenizer, where it has one (text and chat rows, and --export, need it)."""
    if not isinstance(fam, PretrainedFamily):
        return None
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((Path(args.model) / n).exists() for n in names):
        return None
    try:
        return load_tokenizer(Path(args.model))
    except TextError as e:
        fail(str(e))


def build_model(args, fam, cfg: DecoderConfig):
    """The model, in training mode (from_pretrained leaves it in eval mode), fp8-converted where asked;
    a folder transformers cannot load, or a model varlen cannot pack, is one line."""
    try:
        model = fam.build(cfg, args.backend)
    except ValueError as e:  # varlen.hf.PackingRefused too
        fail(f"--model {args.model}: {e}" if str(args.model) not in str(e) else str(e))
    model.train()
    Levers.from_args(args).convert(model)
    return model


def nothing_to_do(args, d: Dist, step: int) -> int:
    """--resume from a checkpoint at or past --steps: said, and nothing in --out touched."""
    if step > args.steps:
        fail(f"--resume: the newest checkpoint is at step {step}, past --steps {args.steps}; nothing was changed. "
             f"Pass --steps above {step} to train on")
    if d.main:
        say(f"the newest checkpoint is at step {step} = --steps; nothing to do (pass a larger --steps to train on)")
    return 0


def restore(found: Path | None, wrapped, opt, sampler, d: Dist) -> tuple[int, int]:
    """Model, optimizer, sampler and RNG from checkpoint ``found``; (step, batches done in its
    epoch). A checkpoint that passed its check but cannot be loaded on some rank: one line."""
    if found is None:
        return 0, 0
    why = None
    try:
        extra = checkpoint.load(found, wrapped, opt, rank=d.rank)
    except checkpoint.CheckpointError as e:
        why = str(e)
    if not all_agree(why is None, d):
        fail(f"--resume: {why or f'another rank could not load {found}'}; pass --overwrite to start over")
    sampler.load_state_dict(extra["sampler"])
    return extra["step"], extra["sampler"]["batches_done"]


def make_collator(args, sampler, ds, max_len: int, device_type: str, plain: bool = False) -> TrainCollator:
    """Rows as the flags shape them: ``--static`` one token count (the busiest rank's share),
    ``--cuda-graphs`` one number of sequences and one of 8 row sizes an octave; ``plain``: neither
    (evaluation)."""
    # rows split evenly over the context group, each slice a whole number of fp8 GEMM tiles
    multiple_of = args.cp * (Levers.from_args(args).token_multiple or 1)
    if plain:
        return TrainCollator(max_seqlen=max_len, multiple_of=multiple_of,
                             bucket_max_seqlen=pads_to_max_seqlen(args.backend, device_type))
    shares = [s for b in sampler.global_batches() for s in sampler.shares(b)] if args.static or args.cuda_graphs else []
    row = max((sum(ds.lengths[i] for i in s) for s in shares), default=0)
    # planned from this epoch's rows; a later epoch's larger row gets a shape of its own (TrainCollator)
    if args.cuda_graphs:
        num_seqs = graph_num_seqs(max(len(s) for s in shares), row, max_len)
        return TrainCollator(max_seqlen=max_len, multiple_of=multiple_of, num_seqs=num_seqs,
                             pad_to_bucket=GRAPH_BUCKETS_PER_OCTAVE)
    return TrainCollator(pad_to=row if args.static else None, max_seqlen=max_len,
                         multiple_of=multiple_of, bucket_max_seqlen=pads_to_max_seqlen(args.backend, device_type))


class Loop:
    """The training loop: steps, the log, progress and checkpoints."""

    def __init__(self, args, d: Dist, wrapped, opt, sampler, ds, collate, config: dict, autocast, shard=None,
                 evaluator=None, forward=None, loss_sum=cross_entropy_sum):
        self.args, self.d, self.wrapped, self.opt, self.sampler = args, d, wrapped, opt, sampler
        self.schedule = Schedule(args.lr_schedule, args.lr, args.warmup_steps, args.steps, args.min_lr_ratio)
        self.evaluator = evaluator  # () -> {"eval_loss", "eval_ppl", "eval_targets"}, every rank
        self.board = None  # a TensorBoard writer, while run() runs
        self.shard = shard  # context parallelism: this rank's slice of each row
        self.ds, self.collate, self.config, self.autocast = ds, collate, config, autocast
        self.fwd = forward or family(args.model).logits
        self.loss_sum = loss_sum
        self.log_path = args.out / "train_log.jsonl" if args.out else None
        self.step = 0
        self.batches_done = 0
        self.graphs_after_warmup = 0  # graph_count() once the warm-up steps have run
        self.guard = FiniteGuard(wrapped.parameters(), defer=args.log_every > 1)
        self.unread: list[tuple] = []  # (row, values, counts) of the steps since the last read
        self.t0 = 0.0  # when the unread steps began

    def batches(self):
        on_gpu = self.d.device.type == "cuda"
        workers = self.args.num_workers if self.args.num_workers is not None else (2 if on_gpu else 0)
        while True:
            loader = torch.utils.data.DataLoader(self.ds, batch_sampler=self.sampler, collate_fn=self.collate,
                                                 num_workers=workers, pin_memory=on_gpu)
            for b in loader:
                self.batches_done += 1
                yield b
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self.batches_done = 0

    def trim_log(self) -> None:
        """A resumed run drops the lines written after its checkpoint (and a line a kill cut short)."""
        if not (self.d.main and self.log_path and self.log_path.exists()):
            return
        kept = []
        for line in self.log_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # the last line, half written when the run was killed
            if row["step"] <= self.step:
                kept.append(line)
        self.log_path.write_text("".join(x + "\n" for x in kept))

    def one_step(self) -> None:
        """One optimizer step, its values left on the device (see :meth:`read`)."""
        args, d = self.args, self.d
        micro = []
        for _ in range(args.grad_accum):
            b = next(self.it)
            if self.shard is not None:
                b = shard_batch(b, self.shard)
            b = move_batch(b, d.device, non_blocking=True)
            micro.append(b.mark_dynamic() if args.compile else b)
        read = {}
        lr = self.schedule.apply(self.opt, self.step + 1)

        def before_update(stats):  # every step: the one host read of the step, before the update
            read["values"] = self.guard.before_update(stats, self.step + 1, self.opt)

        stats = train_step(self.wrapped, micro, self.opt, self.fwd, autocast=self.autocast,
                           max_grad_norm=args.max_grad_norm, before_update=before_update, loss_sum=self.loss_sum)
        self.guard.after_update(self.step + 1)
        self.step += 1
        counts = torch.cat([stats.targets.reshape(1), per_rank(stats.local_tokens, d, torch.int64)])
        self.unread.append(({"step": self.step, "lr": lr}, read["values"], counts))

    def read(self) -> tuple[list[dict], NonFinite | None]:
        """The log rows of the steps since the last read, read once the device has finished them (one
        synchronisation for the window; ``--log-every``: none in between, so the host runs ahead of
        the device); step times are the window's mean."""
        unread, self.unread = self.unread, []
        step_ms = 1e3 * since(self.t0, self.d.device) / max(1, len(unread))
        counts = torch.stack([c for _, _, c in unread]).tolist() if unread else []
        values, problem = self.guard.read() if self.guard.defer else ([v for _, v, _ in unread], None)
        rows = []
        for (row, _, _), (loss, grad_norm), (targets, *rank_tokens) in zip(unread, values, counts):
            rows.append({**row, "loss": loss, "grad_norm": grad_norm, "tokens": sum(rank_tokens), "targets": targets,
                         "step_ms": round(step_ms, 3), "rank_tokens": rank_tokens})
        return rows, problem

    def read_due(self, steps_run: int) -> bool:
        args, step = self.args, self.step
        return (step % args.log_every == 0 or step == args.steps or steps_run == args.timing_warmup
                or bool(args.save_every and step % args.save_every == 0) or self.eval_due())

    def eval_due(self) -> bool:
        every = self.args.eval_every
        return self.evaluator is not None and (self.step == self.args.steps or bool(every and self.step % every == 0))

    def watch_compiles(self, steps_run: int) -> None:
        """Graphs made after the warm-up steps (recompiles: one-off steps of tens of seconds that a
        mean over the run hides), and no CUDA graphs silently dropped under ``--cuda-graphs``."""
        if steps_run == 1 and self.args.cuda_graphs and compile_counter("inductor", "cudagraph_skips"):
            fail("--cuda-graphs: Inductor ran the model without CUDA graphs (its 'skipping cudagraphs' log line "
                 "says why); refusing to train as if graphed")
        if steps_run == self.args.timing_warmup:
            self.graphs_after_warmup = graph_count()

    def run(self, step: int, batches_done: int) -> list[dict]:
        args, d = self.args, self.d
        self.step, self.batches_done = step, batches_done
        self.trim_log()
        self.board = tensorboard(args.out, self.d.main, step)
        progress = self.progress_bar(step)
        self.it = self.batches()
        self.graphs_after_warmup = graph_count()
        collector = GarbageCollection(args.gc_every)
        watchdog = Watchdog(args.stall_timeout, d.rank, d.world_size)
        log: list[dict] = []
        self.t0 = start(d.device)
        try:
            while self.step < args.steps:
                collector.step()
                self.guarded(self.one_step)
                watchdog.beat(self.step)
                self.watch_compiles(self.step - step)
                if not self.read_due(self.step - step):
                    continue
                self.log_rows(log, progress)
                watchdog.beat(self.step)
                if args.save_every and self.step % args.save_every == 0:
                    self.save()
                    watchdog.beat()
                self.t0 = start(d.device)  # the next window's clock starts after the eval and the save
            self.guarded(self.guard.check_weights)  # the last update's weights, before the summary
        finally:
            watchdog.close()
            self.it.close()  # releases the DataLoader (and its workers) now, not at interpreter exit
            collector.close()
            if progress:
                progress.close()
            if self.board is not None:
                self.board.close()
        return log

    def log_rows(self, log: list[dict], progress) -> None:
        """Read the unread steps (and evaluate, when due), write their rows; a non-finite value ends
        the run after the rows of the steps before it are written."""
        rows, problem = self.guarded(self.read)
        if problem is None and self.eval_due():
            rows[-1].update(self.guarded(self.evaluator))
        for row in rows:
            log.append(row)
            self.record(row, progress)
        if problem is not None:
            stop(str(problem))

    def guarded(self, fn):
        """``fn()``, with a non-finite value or running out of memory ended in one line (exit 1)."""
        try:
            return fn()
        except NonFinite as e:
            stop(str(e))
        except (MemoryError, torch.OutOfMemoryError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            stop(f"out of memory in step {self.step + 1} ({first}); lower --max-tokens or raise --grad-accum")

    def save(self) -> None:
        """A checkpoint of the step just made, once its weights are known finite; a failed save
        (a full disk) ends the run in one line, its partial folder removed, the previous kept."""
        self.guarded(self.guard.check_weights)
        args, d = self.args, self.d
        try:
            checkpoint.save(args.out / "checkpoint", self.wrapped, self.opt, step=self.step,
                            sampler_state=self.sampler.state_dict(self.batches_done), rank=d.rank,
                            config=self.config, keep=args.keep)
        except checkpoint.SAVE_ERRORS as e:
            kept = checkpoint.latest(args.out / "checkpoint")
            stop(f"saving the checkpoint of step {self.step} failed ({checkpoint.describe(e)}); its partial folder was "
                 f"removed, {'the newest checkpoint is ' + str(kept) if kept else 'no checkpoint is left'}")

    def record(self, row: dict, progress) -> None:
        if self.d.main and self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for key in ("loss", "grad_norm", "lr", "eval_loss", "eval_ppl"):
                if row.get(key) is not None:
                    self.board.add_scalar(key, row[key], row["step"])
            self.board.add_scalar("tokens_per_s", 1e3 * row["tokens"] / row["step_ms"], row["step"])
        if progress:
            progress.set_postfix(loss=f"{row['loss']:.4f}", ktok_s=f"{row['tokens'] / row['step_ms']:.1f}")
            progress.update(1)

    def progress_bar(self, step: int):
        if not self.d.main or self.args.no_progress:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # the train extra brings it
            return None
        return tqdm(total=self.args.steps, initial=step, desc="varlen train", unit="step", file=sys.stderr)


def tensorboard(out: Path | None, main: bool, step: int):
    """A TensorBoard writer into OUT/tensorboard where tensorboard is installed (rank 0); a resumed
    run drops the events written after its checkpoint, as the log does."""
    if out is None or not main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the train extra brings it
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)


def write_summary(args, d: Dist, log: list[dict], step: int, parallel: str, budget: int, sampler,
                  report: DataReport, compiled_late: int | None) -> None:
    """``compiled_late``: graphs torch.compile made after the warm-up steps (each a one-off step of
    seconds inside ``step_ms_mean``; ``step_ms_median`` leaves them out)."""
    on_gpu = d.device.type == "cuda"
    timed = log[args.timing_warmup:] or log
    summary = {"steps": step, "world_size": d.world_size, "parallel": parallel, "split": args.split,
               "data": args.data, "max_tokens": budget,
               "step_ms_mean": sum(r["step_ms"] for r in timed) / len(timed) if timed else None,
               "step_ms_median": statistics.median(r["step_ms"] for r in timed) if timed else None,
               "compiled_after_warmup": compiled_late,
               "tokens_per_s": 1e3 * sum(r["tokens"] for r in timed) / sum(r["step_ms"] for r in timed) if timed else None,
               "peak_mem_gib": torch.cuda.max_memory_allocated(d.device) / 2**30 if on_gpu else None,
               "packing_efficiency": sampler.efficiency(), "data_report": vars(report),
               "losses": [r["loss"] for r in log]}
    if args.out:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        log_path = args.out / "train_log.jsonl"
        full = [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.exists() else log
        make_plot(full, args.out / "train.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}), flush=True)
