"""``varlen bench``'s settings as one typed object, :class:`BenchOptions`: its flags are generated from
the fields (:mod:`varlen.options`), the decoder's levers are the :class:`~varlen.levers.Levers` group
``varlen train`` takes too, and :meth:`BenchOptions.problems` is every check of flags against each
other, one line each, before any case runs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

from ..argtypes import device_name, nonneg_int, positive_float, positive_int
from ..levers import Levers
from ..options import add_flags, from_args, option
from .cases import STRATEGIES, WORKLOADS, strategies_of


@dataclass(frozen=True)
class BenchOptions:
    """What varlen bench runs (the workload's unset fields are the preset's), how, and its report."""
    preset: str | None = option(None, "workload preset (default: study on a GPU, tiny on a CPU)",
                                choices=sorted(WORKLOADS))
    model: str = option("decoder", "the study's reference decoder, or a stock HF GPT2LMHeadModel of the same size",
                        choices=["decoder", "hf-gpt2"])
    strategies: str | None = option(None, f"comma list (default: all of the model's): {','.join(STRATEGIES)}; a "
                                    "flash one may name its implementation: packed-flash:fa4, packed-flash:torch")
    modes: str = option("eval,train", "comma list of eval,train")
    compile: str = option("both", "eager cases, compiled ones, or both", choices=["both", "on", "off"])
    batch_size: int | None = option(None, "samples a batch", type=positive_int)
    max_len: int | None = option(None, "longest sample length", type=positive_int)
    length_dist: str | None = option(None, "uniform, fixed, lognormal, or a file of lengths")
    # spelt as varlen train spells the same things (the older spellings still parse)
    tokens_per_batch: int | None = option(None, "token-budget batches (best-fit packed) of N tokens instead of "
                                          "--batch-size samples; for length scaling", type=positive_int, metavar="N",
                                          flag="--max-tokens", aliases=("--tokens-per-batch",))
    steps: int | None = option(None, "timed steps per case", type=positive_int)
    warmup: int | None = option(None, "untimed steps per case (compilation happens here)", type=positive_int,
                                metavar="N", flag="--timing-warmup", aliases=("--warmup",))
    seed: int | None = option(None, "the seed of weights and data", type=int)
    num_workers: int | None = option(None, "DataLoader workers", type=nonneg_int)
    device: str | None = option(None, "cpu, cuda or cuda:N (the cases then run with CUDA_VISIBLE_DEVICES naming "
                                "that GPU alone)", type=device_name)
    profile: bool = option(False, "profile 3 extra steps per case: attention / GEMM / elementwise / optimizer / host "
                           "time", action="store_true")
    cuda_graphs: bool = option(False, "compiled packed cases run as CUDA graphs (torch.compile "
                               "mode='reduce-overhead'): every batch padded to one number of sequences and, with "
                               "--max-tokens, one token count, else one of 8 row sizes an octave (a graph each, "
                               "recorded in warm-up)", action="store_true")
    autotune: bool = option(False, "compiled cases with Inductor's max-autotune: GEMMs as autotuned Triton/cuBLAS "
                            "templates with the elementwise work around them fused in (compiling takes minutes "
                            "longer)", action="store_true")
    jobs: int = option(1, "cases run at once (default 1; more only to check that every case runs, e.g. the GPU "
                       "smoke: concurrent cases share the GPU and the host, so their timings mean little)",
                       type=positive_int)
    strict: bool = option(False, "a case this machine cannot run (a backend not installed) also fails the run",
                          action="store_true")
    case_timeout: float | None = option(None, "seconds per case (default 900 GPU, 600 CPU)", type=positive_float)
    out: Path | None = option(None, "results folder (default bench-out/DEVICE-DATE)", type=Path)
    wide: bool = option(False, "print every column (throughput, floors, padding, recompiles, kernel, whole errors); "
                        "by default the table fits 100 columns and cases n/a here are one line per reason "
                        "(results.md has it all)", action="store_true")
    merge: list[Path] | None = option(None, "combine the results.json of runs split across calls (same device) into "
                                      "--out; runs nothing", type=Path, nargs="+", metavar="DIR")
    levers: Levers = Levers()  # --residual-dtype, --gelu, --mlp-kernel, --fp8: shared with varlen train

    @staticmethod
    def add_flags(p: argparse.ArgumentParser) -> None:
        add_flags(BenchOptions, p)
        Levers.add_flags(p.add_argument_group("the decoder's levers (shared with varlen train)"))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchOptions:
        return replace(from_args(cls, args), levers=Levers.from_args(args))

    def problems(self) -> list[str]:
        """Flags that cannot go together, one line each; empty when they can."""
        out = []
        if self.autotune and self.compile == "off":
            out.append("--autotune tunes what torch.compile generates; --compile off compiles nothing")
        family = strategies_of(self.model)
        wrong = [s for s in self.chosen_strategies() if s.partition(":")[0] not in family]
        if wrong:
            out.append(f"--strategies: --model {self.model} runs {','.join(family)}; not {','.join(wrong)}")
        modes = self.chosen_modes()
        if not modes or set(modes) - {"eval", "train"}:
            out.append(f"--modes {self.modes}: a comma list of eval and train")
        return out

    def chosen_modes(self) -> list[str]:
        return [m for m in self.modes.split(",") if m]

    def chosen_strategies(self) -> list[str]:
        return [s for s in self.strategies.split(",") if s] if self.strategies else strategies_of(self.model)
