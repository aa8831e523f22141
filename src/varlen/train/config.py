"""``varlen train``'s settings as one typed object: :class:`TrainConfig`, made of option groups.

Each group is a frozen dataclass whose fields generate their flags (:mod:`varlen.options`), so a
flag's name, default, type and help live in one place; :meth:`TrainConfig.problems` is every check
of flags against each other and against the model, one line each, before anything runs; the
checkpoint's ``run.json`` records the fields that a resumed run must share (:data:`CONFIG_FIELDS`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..argtypes import (backend_option, device_option, dtype_name, nonneg_float, nonneg_int, positive_float,
                        positive_int)
from ..levers import Levers
from ..models import DecoderConfig, family
from ..models.decoder import PRESETS
from ..models.families import PretrainedFamily, aux_loss_refusal
from ..options import add_flags, from_args, option
from ..parallel import Wrapping
from .optim import SCHEDULES

# The settings a checkpoint is tied to: resuming with another value changes what the run computes.
CONFIG_FIELDS = ("model", "preset", "backend", "data", "data_fingerprint", "num_samples", "max_len", "too_long",
                 "max_tokens", "grad_accum", "split", "cost", "window", "static", "optimizer", "lr", "seed",
                 "world_size", "parallel", "cp", "dtype", "reduce_dtype", "residual_dtype", "fp8", "gelu", "mlp_kernel",
                 "max_grad_norm", "weight_decay", "lr_schedule", "warmup_steps", "min_lr_ratio", "schedule_steps",
                 "eval_split", "loss_chunk")


def fraction(text: str) -> float:
    value = nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction below 1")
    return value


def field_list(text: str) -> tuple[str, ...]:
    return tuple(filter(None, text.split(",")))


@dataclass(frozen=True)
class ModelOptions:
    """The model trained and where."""
    preset: str | None = option(None, "model size of decoder / hf-gpt2 / hf-llama (default tiny); varlen bench's "
                                "presets of the same names run the same model", choices=sorted(PRESETS))
    model: str = option("decoder", "a folder holding a saved HF causal LM (config.json, safetensors weights, tokenizer "
                        "files) to fine-tune; or, for the study, varlen's decoder, hf-gpt2 or hf-llama of --preset's "
                        "size with random weights", metavar="NAME|DIR")
    backend: str = backend_option()
    device: str = device_option("one process; under torchrun each rank takes the GPU of its LOCAL_RANK")


@dataclass(frozen=True)
class DataOptions:
    """The samples and how long ones are treated."""
    data: str = option("uniform", "uniform | lognormal | fixed | a file of lengths | FILE.jsonl | "
                       "hf:NAME_OR_PATH[:split]; JSONL rows and dataset columns hold token ids, text "
                       "({\"text\": ...}, EOS appended) or chat ({\"messages\": [...]}, the loss on assistant "
                       "turns only), the last two for --model DIR")
    eval_split: float = option(0.0, "hold out this fraction of the samples (chosen by --seed) and evaluate on them",
                               type=fraction, metavar="F")
    eval_every: int = option(0, "evaluate every N steps (and after the last); 0: after the last step only",
                             type=nonneg_int, metavar="N")
    truncate: bool = option(False, "cut samples longer than a step takes (default: an error)", action="store_true")
    drop_long: bool = option(False, "drop samples longer than a step takes", action="store_true")
    num_samples: int = option(100_000, "synthetic samples in an epoch", type=positive_int)
    max_len: int | None = option(None, "longest sample (default and most: the preset's positions - 1)",
                                 type=positive_int)

    @property
    def too_long(self) -> str:
        return "truncate" if self.truncate else "drop" if self.drop_long else "error"


@dataclass(frozen=True)
class StepOptions:
    """How many steps, how many tokens each, and how a step is split over ranks and shaped."""
    steps: int = option(20, "optimizer steps", type=positive_int)
    max_tokens: int | None = option(None, "tokens of one optimizer step, all ranks together", type=positive_int)
    max_tokens_per_rank: int | None = option(None, "alternatively: tokens per rank and step", type=positive_int)
    grad_accum: int = option(1, "micro-steps per optimizer step", type=positive_int)
    parallel: str | None = option(None, "default: ddp on several processes", choices=["none", "ddp", "fsdp2"])
    cp: int = option(1, "context parallelism: N ranks share each packed row, a slice each (Ulysses)", type=positive_int)
    split: str = option("balanced", "how a global batch is split over ranks: by a cost model, or by sample count",
                        choices=["balanced", "naive"])
    cost: str = option("flops", "the cost model's weights: from FLOPs, or timed once on this device and model",
                       choices=["flops", "measure"])
    window: int | None = option(None, "samples packed together (default ~32 batches' worth)", type=positive_int)
    static: bool = option(False, "every step has the same shape (filler tokens)", action="store_true")


@dataclass(frozen=True)
class OptimOptions:
    """The optimizer, its schedule and the loss."""
    optimizer: str = option("sgd", "the optimizer", choices=["sgd", "adamw"])
    lr: float = option(1e-3, "the peak learning rate", type=positive_float)
    weight_decay: float | None = option(None, "AdamW's decoupled weight decay (default 0.01), on linear layers' "
                                        "matrices only (not on biases, norms, embeddings)", type=nonneg_float)
    lr_schedule: str = option("constant", "after the warm-up: constant, or linear / cosine decay to --min-lr-ratio x "
                              "--lr at --steps", choices=SCHEDULES)
    warmup_steps: int = option(0, "learning-rate warm-up: linear from 0 over N steps", type=nonneg_int)
    min_lr_ratio: float = option(0.0, "where linear / cosine decay ends, as a fraction of --lr", type=fraction)
    max_grad_norm: float | None = option(None, "scale the gradients down to this total norm when above it (default: "
                                         "no clipping; the norm is logged either way)", type=positive_float)
    loss_chunk: int = option(0, "HF models: apply the LM head inside the loss, N tokens at a time, never holding all "
                             "[T, vocab] logits (large vocabularies); 0: the model's own logits", type=nonneg_int,
                             metavar="N")


@dataclass(frozen=True)
class RuntimeOptions:
    """Precision, compilation and the host's side of a step (the decoder's levers are :class:`Levers`)."""
    dtype: str | None = option(None, "autocast dtype (default: bf16 on CUDA)", type=dtype_name("bf16", "fp32"),
                               metavar="{bf16,fp32}")
    compile: bool = option(False, "torch.compile the model", action=argparse.BooleanOptionalAction)
    cuda_graphs: bool = option(False, "with --compile, on one GPU, one micro-batch a step: the model as CUDA graphs "
                               "(rows padded to one number of sequences and one of 8 sizes an octave, a graph recorded "
                               "per size the first time it comes), for steps bound by kernel launches (few tokens a "
                               "step)", action="store_true")
    num_workers: int | None = option(None, "DataLoader workers (default 2 on CUDA, 0 on CPU)", type=nonneg_int)
    gc_every: int = option(50, "Python's collector off, a collection every N steps on all ranks at once (0: Python's "
                           "own)", type=nonneg_int)


@dataclass(frozen=True)
class RunOptions:
    """Seed, output, checkpoints and what the run reports."""
    seed: int = option(0, "the seed of weights, data order and held-out samples", type=int)
    out: Path | None = option(None, "train_log.jsonl, train.png, summary.json, checkpoint/", type=Path)
    save_every: int = option(0, "checkpoint every N steps into OUT/checkpoint", type=nonneg_int)
    keep: int = option(2, "complete checkpoints kept (the newest)", type=positive_int)
    resume: bool = option(False, "continue from the newest checkpoint in OUT/checkpoint", action="store_true")
    overwrite: bool = option(False, "start over in an --out that holds an earlier run", action="store_true")
    allow_change: tuple[str, ...] = option((), "on --resume, accept these settings differing from the checkpoint's "
                                           f"({', '.join(CONFIG_FIELDS)})", type=field_list, metavar="FIELD,...")
    log_every: int = option(1, "read the loss, gradient norm and step time from the device every N steps, one read "
                            "for all N (the host then runs ahead of the device); a non-finite step is skipped on the "
                            "device by the fused optimizer and ends the run at the next read, with the weights of the "
                            "step before", type=positive_int, metavar="N")
    timing_warmup: int = option(2, "steps left out of the summary's timings (not the learning rate's: --warmup-steps)",
                                type=nonneg_int, metavar="N")
    export: Path | None = option(None, "after training, write the model as a save_pretrained folder (safetensors, "
                                 "config, tokenizer)", type=Path, metavar="DIR")
    stall_timeout: float = option(300.0, "end the run (every rank, one line naming the rank that stopped) when no "
                                  "step finishes for S seconds; the first step, which compiles, gets 30 minutes more; "
                                  "0: no watchdog", type=nonneg_float, metavar="S")
    no_progress: bool = option(False, "no progress bar", action="store_true")


GROUPS = {"model": ModelOptions, "data": DataOptions, "step": StepOptions, "optim": OptimOptions,
          "runtime": RuntimeOptions, "levers": Levers, "wrapping": Wrapping, "run": RunOptions}
TITLES = {"levers": "the decoder's levers (shared with varlen bench)",
          "wrapping": "data-parallel wrapping (shared with the scaling sweep)"}


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a ``varlen train`` run, a group each."""
    model: ModelOptions = ModelOptions()
    data: DataOptions = DataOptions()
    step: StepOptions = StepOptions()
    optim: OptimOptions = OptimOptions()
    runtime: RuntimeOptions = RuntimeOptions()
    levers: Levers = Levers()
    wrapping: Wrapping = Wrapping()
    run: RunOptions = RunOptions()

    @staticmethod
    def add_flags(p: argparse.ArgumentParser) -> None:
        """Every group's flags, in a section of ``--help`` each."""
        for name, group in GROUPS.items():
            add_flags(group, p.add_argument_group(TITLES.get(name, (group.__doc__ or name).splitlines()[0])))
        p.add_argument("--warmup", type=renamed_warmup, help=argparse.SUPPRESS)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        return cls(**{name: from_args(group, args) for name, group in GROUPS.items()})

    def as_dict(self) -> dict[str, dict]:
        """Every setting, group by group, as JSON values (what a checkpoint's run.json keeps as "settings")."""
        def plain(v):
            return str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v

        return {name: {f.name: plain(getattr(getattr(self, name), f.name)) for f in fields(group)}
                for name, group in GROUPS.items()}

    def resolved(self) -> TrainConfig:
        """The defaults that depend on other settings filled in: the preset of a study model, AdamW's
        weight decay."""
        model, optim = self.model, self.optim
        if model.preset is None and not os.path.isdir(model.model):
            model = replace(model, preset="tiny")
        if optim.weight_decay is None and optim.optimizer == "adamw":
            optim = replace(optim, weight_decay=0.01)
        return replace(self, model=model, optim=optim)

    def problems(self) -> list[str]:
        """Settings that cannot work together, one line each; empty when they can."""
        return self.flag_problems() or self.model_problems()

    def flag_problems(self) -> list[str]:
        run, step, rt = self.run, self.step, self.runtime
        rules = [
            ((run.resume or run.save_every) and run.out is None, "--resume and --save-every need --out"),
            (run.resume and run.overwrite, "--resume continues the run in --out, --overwrite starts over: choose one"),
            (self.data.truncate and self.data.drop_long, "--truncate and --drop-long: choose one"),
            (step.max_tokens and step.max_tokens_per_rank, "give --max-tokens or --max-tokens-per-rank, not both"),
            (self.wrapping.static_graph and step.grad_accum > 1,
             "--static-graph with --grad-accum > 1 is broken in PyTorch (pytorch/pytorch#187732); drop one of them"),
            (rt.cuda_graphs and not rt.compile, "--cuda-graphs records what torch.compile generates: add --compile"),
            (rt.cuda_graphs and step.grad_accum > 1, "--cuda-graphs with --grad-accum > 1: gradients summed over graph "
             "replays are not supported here; one micro-batch a step"),
            (rt.cuda_graphs and step.static, "--cuda-graphs pads rows itself (8 sizes an octave, a graph each): drop "
             "--static"),
            (rt.cuda_graphs and self.model.device == "cpu", "--cuda-graphs needs a CUDA device"),
        ]
        out = [why for bad, why in rules if bad]
        unknown = set(run.allow_change) - set(CONFIG_FIELDS)
        if unknown:
            out.append(f"--allow-change: unknown field(s) {', '.join(sorted(unknown))}; choose from "
                       f"{', '.join(CONFIG_FIELDS)}")
        return out

    def model_problems(self) -> list[str]:
        """The model's sizes against --cp and --max-len; the optimizer's and schedule's flags."""
        try:
            cfg = self.decoder_sizes()
        except ValueError as e:
            return [str(e)]
        optim, out = self.optim, []
        fam = family(self.model.model)
        why = isinstance(fam, PretrainedFamily) and aux_loss_refusal(fam.hf_config())
        if why:
            out.append(f"--model {self.model.model}: {why}")
        if cfg.n_heads % self.step.cp:
            out.append(f"--cp {self.step.cp}: context parallelism splits the heads, and {self.model_label} has "
                       f"{cfg.n_heads}")
        if self.data.max_len is not None and self.data.max_len >= cfg.max_len:
            out.append(f"--max-len {self.data.max_len}: {self.model_label} takes samples of at most {cfg.max_len - 1} "
                       "tokens; choose a larger model or a shorter --max-len")
        if optim.weight_decay is not None and optim.optimizer != "adamw":
            out.append("--weight-decay is AdamW's: add --optimizer adamw")
        if self.data.eval_every and not self.data.eval_split:
            out.append("--eval-every needs held-out samples: add --eval-split F")
        if optim.warmup_steps >= self.step.steps and optim.lr_schedule != "constant":
            out.append(f"--warmup-steps {optim.warmup_steps} leaves no step of the {optim.lr_schedule} decay within "
                       f"--steps {self.step.steps}")
        return out

    def decoder_sizes(self) -> DecoderConfig:
        """The sizes of the model trained: a preset's, or those of the folder's config."""
        fam = family(self.model.model)
        if isinstance(fam, PretrainedFamily):
            if self.model.preset is not None:
                raise ValueError(f"--preset sizes the study's models; --model {self.model.model} is a folder with its "
                                 "own config")
            return fam.sizes()
        return DecoderConfig.from_name(self.model.preset or "tiny")

    @property
    def model_label(self) -> str:
        m = self.model
        return f"--model {m.model}" if os.path.isdir(m.model) else f"preset {m.preset or 'tiny'}"


def renamed_warmup(_value: str):
    raise argparse.ArgumentTypeError("renamed: --timing-warmup N leaves N steps out of the timings, --warmup-steps N "
                                     "warms the learning rate up")


def names() -> set[str]:
    """Every field of every group (each one flag): no two groups may share a name."""
    return {f.name for group in GROUPS.values() for f in fields(group)}
