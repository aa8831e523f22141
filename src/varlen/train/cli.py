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

from ..argtypes import device_problem, runtime_error, usage_error
from ..buckets import GRAPH_BUCKETS_PER_OCTAVE, ceil_div, graph_num_seqs
from ..data import CostModel, TokenBudgetSampler, TrainCollator
from ..engine import Engine, Objective, build_model, measure_cost
from ..measure import GarbageCollection, compile_counter, graph_count, since, start
from ..models import DecoderConfig, family
from ..loss import linear_cross_entropy_sum
from ..models.families import HiddenStates, PretrainedFamily, head_refusal
from ..parallel import Dist, all_agree, context_shard, from_rank0, per_rank, run_then_teardown, setup
from . import checkpoint
from .data import DataError, DataReport, fingerprint, load
from .config import TrainConfig
from .guard import FiniteGuard, NonFinite
from .evaluate import Evaluator, hold_out
from .export import export, export_refusal
from .lock import LockHeld, RunLock
from .optim import Schedule, make_optimizer
from .text import TextError, load_tokenizer
from .watchdog import Watchdog, process_group_timeout


def parse_args(argv) -> TrainConfig:
    """The command line as a :class:`TrainConfig`; a setting that cannot work is one line (exit 2)."""
    p = argparse.ArgumentParser(prog="varlen train", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    TrainConfig.add_flags(p)
    conf = TrainConfig.from_args(p.parse_args(argv))
    why = conf.problems()
    if why:
        p.error(why[0])
    return conf.resolved()


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
    conf = parse_args(sys.argv[1:] if argv is None else argv)
    why = device_problem(conf.model.device)
    if why:
        usage_error("varlen train", why)
    try:
        d = setup(conf.model.device, process_group_timeout(conf.run.stall_timeout))
    except ValueError as e:  # a device choice torchrun's ranks cannot follow
        usage_error("varlen train", str(e))
    return run_then_teardown(run, conf, d)


def load_data(conf, cfg: DecoderConfig, micro_budget: int, report: DataReport, tokenizer=None):
    """The dataset, every row checked; samples longer than a step takes follow --truncate /
    --drop-long, else stop the run with the row named."""
    max_len = conf.data.max_len or cfg.max_len - 1
    longest = min(max_len, micro_budget)
    try:
        ds = load(conf.data.data, num_samples=conf.data.num_samples, max_len=max_len, vocab_size=cfg.vocab_size,
                  seed=conf.run.seed, too_long=conf.data.too_long, report=report, longest=longest, tokenizer=tokenizer)
    except (DataError, ValueError) as e:
        fail(str(e))
    if max(ds.lengths) > micro_budget:  # synthetic lengths up to --max-len
        fail(f"samples reach {max(ds.lengths)} tokens but a micro-step takes {micro_budget} (--max-tokens "
             f"{conf.step.max_tokens or '(per rank x ranks)'} / --grad-accum {conf.step.grad_accum}); raise "
             "--max-tokens")
    return ds, max_len


def run_config(conf, d: Dist, budget: int, parallel: str, dtype: str, max_len: int) -> dict:
    """The settings this run's checkpoints are tied to (:data:`~varlen.train.config.CONFIG_FIELDS`)."""
    try:
        data_fp = fingerprint(conf.data.data)
    except DataError as e:
        fail(str(e))
    m, data, st, o = conf.model, conf.data, conf.step, conf.optim
    return {"model": m.model, "preset": m.preset, "backend": m.backend, "data": data.data,
            "data_fingerprint": data_fp, "num_samples": data.num_samples, "max_len": max_len, "too_long": data.too_long,
            "max_tokens": budget, "grad_accum": st.grad_accum, "split": st.split, "cost": st.cost,
            "window": st.window, "static": st.static, "optimizer": o.optimizer, "lr": o.lr,
            "seed": conf.run.seed, "world_size": d.world_size, "parallel": parallel, "cp": st.cp, "dtype": dtype,
            "reduce_dtype": conf.wrapping.reduce_dtype,
            # only when changed: checkpoints from before the option resume as float32 runs
            **conf.levers.changed(),
            **({"max_grad_norm": o.max_grad_norm} if o.max_grad_norm is not None else {}),
            **({"weight_decay": o.weight_decay} if o.optimizer == "adamw" else {}),
            **({"lr_schedule": o.lr_schedule, "schedule_steps": st.steps, "min_lr_ratio": o.min_lr_ratio}
               if o.lr_schedule != "constant" else {}),
            **({"warmup_steps": o.warmup_steps} if o.warmup_steps else {}),
            **({"eval_split": conf.data.eval_split} if conf.data.eval_split else {}),
            **({"loss_chunk": conf.optim.loss_chunk} if conf.optim.loss_chunk else {})}


# what a run writes into --out besides checkpoints
EARLIER_RUN = ("train_log.jsonl", "summary.json", "train.png", "tensorboard")


def claim_out(conf, d: Dist) -> RunLock | None:
    """--out as a folder this run may write into, locked for this run alone (rank 0 holds the
    lock for the job); refused in one line when another live run holds it."""
    if conf.run.out is None:
        return None
    if conf.run.out.exists() and not conf.run.out.is_dir():
        fail(f"--out {conf.run.out} is a file; --out names a folder")
    try:
        conf.run.out.mkdir(parents=True, exist_ok=True)
        probe = conf.run.out / f".write-test-{d.rank}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        fail(f"--out {conf.run.out} is not writable ({e.strerror or e})")
    lock, held = RunLock(conf.run.out), None
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


def resume_point(conf, d: Dist, config: dict) -> Path | None:
    """The checkpoint to resume from (the newest that passes its check), or None to start at step
    0. An --out holding an earlier run is refused without --resume or --overwrite; a checkpoint
    of other settings is refused, naming them, unless --allow-change lists them."""
    if conf.run.out is None:
        return None
    root = conf.run.out / "checkpoint"
    if conf.run.overwrite:
        if d.main:
            shutil.rmtree(root, ignore_errors=True)
            for name in EARLIER_RUN:
                path = conf.run.out / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return None
    if not conf.run.resume:
        refuse_earlier_run(conf, root)
        return None
    found = choose_checkpoint(root, d)
    if found is None:
        if d.main:
            say(f"no checkpoint in {root}; starting at step 0")
        return None
    allowed = set(conf.run.allow_change)
    try:
        saved = checkpoint.config_of(found)
    except checkpoint.CheckpointError as e:
        fail(f"--resume: {e}")
    diffs = {k: v for k, v in checkpoint.differences(saved, config).items() if k not in allowed}
    if diffs:
        listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in diffs.items())
        fail(f"--resume: this run's settings differ from {found}'s: {listed}. Use that run's settings, or "
             f"--allow-change {','.join(diffs)} if the change is intended")
    if d.main and checkpoint.step_of(found) < conf.step.steps:
        say(f"resuming from {found} (step {checkpoint.step_of(found)})")
    return found


def refuse_earlier_run(conf, root: Path) -> None:
    """A fresh run into an --out that holds a checkpoint or another run's log: nothing is
    overwritten without being asked."""
    found = checkpoint.latest(root)
    if found is not None:
        fail(f"--out {conf.run.out} holds a checkpoint of an earlier run (step {checkpoint.step_of(found)}); pass "
             "--resume to continue it or --overwrite to start over")
    earlier = [n for n in EARLIER_RUN if (conf.run.out / n).exists()]
    if earlier:
        fail(f"--out {conf.run.out} holds an earlier run's {', '.join(earlier)}; pass --overwrite to replace them "
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


def settings(conf, d: Dist):
    """The run's derived settings, each refused in one line where it cannot work: the step's token
    budget (all ranks) and a micro-step's, the context shard, data-parallel groups, the parallelism
    and the autocast dtype."""
    why = conf.run.export and export_refusal(conf.run.export, conf.model.model, family(conf.model.model).hf,
                                             conf.run.overwrite)
    if why:
        fail(why)
    budget = conf.step.max_tokens or (conf.step.max_tokens_per_rank or 16384) * d.world_size
    micro_budget = budget // conf.step.grad_accum
    if micro_budget < 1:
        fail(f"--max-tokens {budget} over --grad-accum {conf.step.grad_accum} micro-steps leaves no token per "
             "micro-step")
    try:
        shard = context_shard(d.rank, d.world_size, conf.step.cp)
    except ValueError as e:
        fail(f"--cp {conf.step.cp}: {e}")
    parallel = conf.step.parallel or ("ddp" if d.world_size > 1 else "none")
    if parallel == "none" and d.world_size > 1:
        fail("--parallel none with several processes: choose ddp or fsdp2")
    if conf.run.log_every > 1 and parallel == "fsdp2":
        fail("--log-every > 1 skips a non-finite step with the fused optimizer's flag, which FSDP2's sharded "
             "parameters do not take here; read every step (--log-every 1) with --parallel fsdp2")
    if conf.runtime.cuda_graphs and d.world_size > 1:
        fail(f"--cuda-graphs runs one process; this run has {d.world_size} (DDP/FSDP2 with CUDA graphs is not "
             "supported)")
    dtype = conf.runtime.dtype or ("bf16" if d.device.type == "cuda" else "fp32")
    levers = conf.levers
    why = next(iter(levers.problems(conf.model.model, dtype)), None) or levers.unavailable(d.device.type)
    if why:
        fail(why)
    return budget, micro_budget, shard, d.world_size // conf.step.cp, parallel, dtype


def run(conf, d: Dist) -> int:
    torch.manual_seed(conf.run.seed)  # the same initial weights on every rank
    budget, micro_budget, shard, dp, parallel, dtype = settings(conf, d)
    lock = claim_out(conf, d)
    try:
        return train(conf, d, budget, micro_budget, shard, dp, parallel, dtype)
    finally:
        if lock is not None:
            lock.release()


def train(conf, d: Dist, budget: int, micro_budget: int, shard, dp: int, parallel: str, dtype: str) -> int:
    fam = family(conf.model.model)
    cfg = conf.decoder_sizes() if isinstance(fam, PretrainedFamily) else DecoderConfig.from_name(
        conf.model.preset, **conf.levers.decoder_fields())
    tokenizer = model_tokenizer(conf, fam)
    autocast_dtype = torch.bfloat16 if dtype == "bf16" else None  # the engine's and the cost fit's
    report = DataReport()
    ds, max_len = load_data(conf, cfg, micro_budget, report, tokenizer)
    ds, held_out = hold_out(ds, conf.data.eval_split, conf.run.seed)
    config = run_config(conf, d, budget, parallel, dtype, max_len)
    resume_from = resume_point(conf, d, config)
    if resume_from is not None and checkpoint.step_of(resume_from) >= conf.step.steps:
        return nothing_to_do(conf, d, checkpoint.step_of(resume_from))
    model = new_model(conf, fam, cfg, d.device)
    cost = measure_cost(model, fam, cfg, d, autocast_dtype) if conf.step.cost == "measure" else \
        CostModel.from_flops(cfg.dim, cfg.n_layers, cfg.vocab_size)
    sampler = TokenBudgetSampler(ds.lengths, micro_budget, window=conf.step.window, seed=conf.run.seed,
                                 world_size=dp, rank=d.rank // conf.step.cp, split=conf.step.split, cost=cost)
    collate = make_collator(conf, sampler, ds, max_len)
    trained, objective = head_in_loss(conf, fam, model, parallel)
    engine = Engine.around(trained, objective, d, parallel=parallel, wrapping=conf.wrapping,
                           compile=conf.runtime.compile, compile_mode="reduce-overhead" if conf.runtime.cuda_graphs
                           else None, dtype=autocast_dtype, shard=shard, attention=conf.model.backend)
    opt = make_optimizer(conf.optim.optimizer, model, conf.optim.lr, conf.optim.weight_decay,
                         fused=parallel != "fsdp2" and (d.device.type == "cuda" or conf.run.log_every > 1))
    step, batches_done = restore(resume_from, engine.wrapped, opt, sampler, d)
    if d.main:
        st = conf.step
        info = {"world_size": d.world_size, "parallel": parallel, "cp": st.cp, "split": st.split, "max_tokens": budget,
                "grad_accum": st.grad_accum, "per_rank_budget": ceil_div(micro_budget, d.world_size),
                "data": conf.data.data, "model": conf.model.model, "preset": conf.model.preset,
                "packing_efficiency": round(sampler.efficiency(), 4),
                "cost_per_token_sq": cost.per_token_sq, "cost_per_seq": cost.per_seq, "resumed_at": step,
                "held_out": len(held_out) if held_out else 0, "data_report": vars(report)}
        print("varlen train:", json.dumps(info), flush=True)
    eval_collate = make_collator(conf, sampler, ds, max_len, plain=True)  # built once, not per eval
    evaluator = None if held_out is None else Evaluator(engine, held_out, eval_collate, micro_budget, dp=dp,
                                                        dp_rank=d.rank // conf.step.cp)
    loop = Loop(conf, d, engine, opt, sampler, ds, collate, {**config, "settings": conf.as_dict()}, evaluator)
    log = loop.run(step, batches_done)
    if d.main:
        compiled_late = graph_count() - loop.graphs_after_warmup if conf.runtime.compile else None
        write_summary(conf, d, log, loop.step, parallel, budget, sampler, report, compiled_late)
    if conf.run.export:
        export(model, conf.run.export, tokenizer, d.main)
        if d.main:
            say(f"exported to {conf.run.export} (AutoModelForCausalLM.from_pretrained loads it)")
    return 0


def head_in_loss(conf, fam, model, parallel: str) -> tuple[torch.nn.Module, Objective]:
    """(the module to wrap, its objective): the model and its logits' cross-entropy, or with
    --loss-chunk the model without its head and the head applied in the loss, chunk by chunk."""
    if not conf.optim.loss_chunk:
        return model, Objective.logits(fam)
    why = "varlen's decoder keeps its head (a small vocabulary)" if not fam.hf else head_refusal(model) or (
        "under FSDP2 the head's weight is sharded outside its module" if parallel == "fsdp2" else None)
    if why:
        fail(f"--loss-chunk: {why}")
    hidden = HiddenStates(model)

    def forward(m, batch):
        return m(**batch.hf_kwargs(), use_cache=False)

    def loss_sum(h, labels):
        return linear_cross_entropy_sum(h, hidden.head_weight, labels, chunk=conf.optim.loss_chunk)

    return hidden, Objective(forward, loss_sum)


def model_tokenizer(conf, fam):
    """The folder's tokenizer, where it has one (text and chat rows, and --export, need it)."""
    if not isinstance(fam, PretrainedFamily):
        return None
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((Path(conf.model.model) / n).exists() for n in names):
        return None
    try:
        return load_tokenizer(Path(conf.model.model))
    except TextError as e:
        fail(str(e))


def new_model(conf, fam, cfg: DecoderConfig, device: torch.device):
    """The model, in training mode (from_pretrained leaves it in eval mode), fp8-converted where asked;
    a folder transformers cannot load, or a model varlen cannot pack, is one line."""
    try:
        return build_model(fam, cfg, conf.model.backend, device, levers=conf.levers)
    except ValueError as e:  # varlen.hf.PackingRefused too
        fail(f"--model {conf.model.model}: {e}" if str(conf.model.model) not in str(e) else str(e))


def nothing_to_do(conf, d: Dist, step: int) -> int:
    """--resume from a checkpoint at or past --steps: said, and nothing in --out touched."""
    if step > conf.step.steps:
        fail(f"--resume: the newest checkpoint is at step {step}, past --steps {conf.step.steps}; nothing was changed. "
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


def make_collator(conf, sampler, ds, max_len: int, plain: bool = False) -> TrainCollator:
    """Rows as the flags shape them: ``--static`` one token count (the busiest rank's share),
    ``--cuda-graphs`` one number of sequences and one of 8 row sizes an octave; ``plain``: neither
    (evaluation)."""
    # rows split evenly over the context group, each slice a whole number of fp8 GEMM tiles
    multiple_of = conf.step.cp * (conf.levers.token_multiple or 1)
    if plain:
        return TrainCollator(max_seqlen=max_len, multiple_of=multiple_of)
    planned = conf.step.static or conf.runtime.cuda_graphs
    shares = [s for b in sampler.global_batches() for s in sampler.shares(b)] if planned else []
    row = max((sum(ds.lengths[i] for i in s) for s in shares), default=0)
    # planned from this epoch's rows; a later epoch's larger row gets a shape of its own (TrainCollator)
    if conf.runtime.cuda_graphs:
        num_seqs = graph_num_seqs(max(len(s) for s in shares), row, max_len)
        return TrainCollator(max_seqlen=max_len, multiple_of=multiple_of, num_seqs=num_seqs,
                             pad_to_bucket=GRAPH_BUCKETS_PER_OCTAVE)
    return TrainCollator(pad_to=row if conf.step.static else None, max_seqlen=max_len, multiple_of=multiple_of)


class Loop:
    """The training loop: steps, the log, progress and checkpoints."""

    def __init__(self, conf, d: Dist, engine: Engine, opt, sampler, ds, collate, run_json: dict, evaluator=None):
        self.conf, self.d, self.engine, self.opt, self.sampler = conf, d, engine, opt, sampler
        o = conf.optim
        self.schedule = Schedule(o.lr_schedule, o.lr, o.warmup_steps, conf.step.steps, o.min_lr_ratio)
        self.evaluator = evaluator  # () -> {"eval_loss", "eval_ppl", "eval_targets"}, every rank
        self.board = None  # a TensorBoard writer, while run() runs
        self.ds, self.collate, self.run_json = ds, collate, run_json  # what each checkpoint's run.json holds
        self.log_path = conf.run.out / "train_log.jsonl" if conf.run.out else None
        self.step = 0
        self.batches_done = 0
        self.graphs_after_warmup = 0  # graph_count() once the warm-up steps have run
        self.guard = FiniteGuard(engine.wrapped.parameters(), defer=conf.run.log_every > 1)
        self.unread: list[tuple] = []  # (row, values, counts) of the steps since the last read
        self.t0 = 0.0  # when the unread steps began

    def batches(self):
        on_gpu = self.d.device.type == "cuda"
        workers = self.conf.runtime.num_workers if self.conf.runtime.num_workers is not None else (2 if on_gpu else 0)
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
        conf, d = self.conf, self.d
        micro = [self.engine.prepare(next(self.it)) for _ in range(conf.step.grad_accum)]
        read = {}
        lr = self.schedule.apply(self.opt, self.step + 1)

        def before_update(stats):  # every step: the one host read of the step, before the update
            read["values"] = self.guard.before_update(stats, self.step + 1, self.opt)

        stats = self.engine.step(micro, self.opt, max_grad_norm=conf.optim.max_grad_norm, before_update=before_update)
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
        conf, step = self.conf, self.step
        return (step % conf.run.log_every == 0 or step == conf.step.steps or steps_run == conf.run.timing_warmup
                or bool(conf.run.save_every and step % conf.run.save_every == 0) or self.eval_due())

    def eval_due(self) -> bool:
        every = self.conf.data.eval_every
        last = self.step == self.conf.step.steps
        return self.evaluator is not None and (last or bool(every and self.step % every == 0))

    def watch_compiles(self, steps_run: int) -> None:
        """Graphs made after the warm-up steps (recompiles: one-off steps of tens of seconds that a
        mean over the run hides), and no CUDA graphs silently dropped under ``--cuda-graphs``."""
        if steps_run == 1 and self.conf.runtime.cuda_graphs and compile_counter("inductor", "cudagraph_skips"):
            fail("--cuda-graphs: Inductor ran the model without CUDA graphs (its 'skipping cudagraphs' log line "
                 "says why); refusing to train as if graphed")
        if steps_run == self.conf.run.timing_warmup:
            self.graphs_after_warmup = graph_count()

    def run(self, step: int, batches_done: int) -> list[dict]:
        conf, d = self.conf, self.d
        self.step, self.batches_done = step, batches_done
        self.trim_log()
        self.board = tensorboard(conf.run.out, self.d.main, step)
        progress = self.progress_bar(step)
        self.it = self.batches()
        self.graphs_after_warmup = graph_count()
        collector = GarbageCollection(conf.runtime.gc_every)
        watchdog = Watchdog(conf.run.stall_timeout, d.rank, d.world_size)
        log: list[dict] = []
        self.t0 = start(d.device)
        try:
            while self.step < conf.step.steps:
                collector.step()
                self.guarded(self.one_step)
                watchdog.beat(self.step)
                self.watch_compiles(self.step - step)
                if not self.read_due(self.step - step):
                    continue
                self.log_rows(log, progress)
                watchdog.beat(self.step)
                if conf.run.save_every and self.step % conf.run.save_every == 0:
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
        conf, d = self.conf, self.d
        try:
            checkpoint.save(conf.run.out / "checkpoint", self.engine.wrapped, self.opt, step=self.step,
                            sampler_state=self.sampler.state_dict(self.batches_done), rank=d.rank,
                            config=self.run_json, keep=conf.run.keep)
        except checkpoint.SAVE_ERRORS as e:
            kept = checkpoint.latest(conf.run.out / "checkpoint")
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
        if not self.d.main or self.conf.run.no_progress:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # the train extra brings it
            return None
        return tqdm(total=self.conf.step.steps, initial=step, desc="varlen train", unit="step", file=sys.stderr)


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


def write_summary(conf, d: Dist, log: list[dict], step: int, parallel: str, budget: int, sampler,
                  report: DataReport, compiled_late: int | None) -> None:
    """``compiled_late``: graphs torch.compile made after the warm-up steps (each a one-off step of
    seconds inside ``step_ms_mean``; ``step_ms_median`` leaves them out)."""
    on_gpu = d.device.type == "cuda"
    timed = log[conf.run.timing_warmup:] or log
    summary = {"steps": step, "world_size": d.world_size, "parallel": parallel, "split": conf.step.split,
               "data": conf.data.data, "max_tokens": budget,
               "step_ms_mean": sum(r["step_ms"] for r in timed) / len(timed) if timed else None,
               "step_ms_median": statistics.median(r["step_ms"] for r in timed) if timed else None,
               "compiled_after_warmup": compiled_late,
               "tokens_per_s": (1e3 * sum(r["tokens"] for r in timed) / sum(r["step_ms"] for r in timed)
                                if timed else None),
               "peak_mem_gib": torch.cuda.max_memory_allocated(d.device) / 2**30 if on_gpu else None,
               "packing_efficiency": sampler.efficiency(), "data_report": vars(report),
               "losses": [r["loss"] for r in log]}
    if conf.run.out:
        (conf.run.out / "summary.json").write_text(json.dumps(summary, indent=1))
        log_path = conf.run.out / "train_log.jsonl"
        full = [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.exists() else log
        make_plot(full, conf.run.out / "train.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}), flush=True)
