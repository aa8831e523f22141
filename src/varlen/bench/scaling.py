"""Weak scaling of packed training: one torchrun launch per (world size, parallel); inside it the
model is built and compiled once and every (length distribution, split) runs on it.

    torchrun --nproc-per-node 4 -m varlen.bench.scaling --parallel ddp --out DIR
    python -m varlen.bench.scaling --report DIR...      # join launches, efficiency vs 1 GPU

Each rank's budget is fixed (``--max-tokens-per-rank``): the global batch grows with the world
size, so ideal weak scaling keeps the step time flat. Efficiency = tokens/s at W GPUs / (W x
tokens/s at 1 GPU) for the same parallel kind, split and distribution.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..options import add_flags, from_args
from ..parallel import Wrapping, run_then_teardown
from .sweep import SweepOptions, report, sweep


def parse(argv) -> tuple[SweepOptions, Wrapping]:
    """The command line as the sweep's options and its wrapping; a setting that cannot run is one line (exit 2)."""
    p = argparse.ArgumentParser(prog="varlen.bench.scaling", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(SweepOptions, p.add_argument_group("the sweep"))
    add_flags(Wrapping, p.add_argument_group("data-parallel wrapping (shared with varlen train)"))
    args = p.parse_args(argv)
    opts = from_args(SweepOptions, args)
    why = opts.problems()
    if why:
        p.error(why[0])
    return opts, from_args(Wrapping, args)


def main(argv=None) -> int:
    opts, wrapping = parse(sys.argv[1:] if argv is None else argv)
    if opts.report:
        report(opts.report, opts.out or Path("."))
    else:
        run_then_teardown(sweep, opts, wrapping)
    return 0


if __name__ == "__main__":
    sys.exit(main())
