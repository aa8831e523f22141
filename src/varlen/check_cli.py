"""``varlen check``: the packing-correctness probe, pointed at a model, a kernel and a device.

    varlen check --hf-config path/to/model_or_config --random-init --attn-implementation varlen
    varlen check --preset tiny --backend flex

Prints a table (every check with its number and tolerance), writes ``--json``, and exits 1 when a
check fails (2 for a bad argument).
"""

from __future__ import annotations

import argparse
import sys

import torch

from .argtypes import DTYPES, device_problem, usage_error
from .check import CheckOptions
from .options import add_flags, from_args


def parse_args(argv) -> CheckOptions:
    """The command line as a :class:`~varlen.check.CheckOptions`; flags that cannot go together, or that
    would be ignored, are one line (exit 2)."""
    p = argparse.ArgumentParser(prog="varlen check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(CheckOptions, p)
    opts = from_args(CheckOptions, p.parse_args(argv))
    why = opts.problems()
    if why:
        p.error(why[0])
    return opts


def all_architectures(args) -> int:
    """Check every causal-LM type (or the ones named); exits 1 when one is wrong or crashed."""
    import json
    import time

    import transformers

    from . import matrix

    types = args.all_architectures or matrix.causal_lm_types()
    unknown = sorted(set(types) - set(matrix.causal_lm_types()))
    if unknown:
        usage_error("varlen check", f"--all-architectures: not causal-LM types of transformers "
                                    f"{transformers.__version__}: {', '.join(unknown)}")
    say = lambda o: print(f"{o.model_type:32s} {o.outcome:14s} {o.seconds:6.1f} s  {o.reason[:160]}", flush=True)  # noqa: E731
    outcomes = matrix.run_matrix(types, jobs=args.jobs, timeout=args.case_timeout, progress=say)
    versions = {"transformers": transformers.__version__, "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d")}
    if args.json:
        args.json.write_text(json.dumps({"versions": versions, "outcomes": matrix.to_dicts(outcomes)}, indent=1))
    if args.markdown:
        args.markdown.write_text(matrix.markdown(outcomes, versions))
    counts = {k: sum(o.outcome == k for o in outcomes) for k in matrix.KINDS}
    print("varlen check --all-architectures: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 1 if counts["wrong"] or counts["crash"] else 0


def load_model(args):
    dtype = DTYPES[args.dtype or ("fp32" if args.device == "cpu" else "bf16")]
    torch.manual_seed(args.seed)
    if args.preset:
        from .models import Decoder, DecoderConfig

        try:
            cfg = DecoderConfig.from_name(args.preset)
        except ValueError as e:
            usage_error("varlen check", str(e))
        return Decoder(cfg, backend=args.backend).to(args.device, dtype), cfg.max_len - 1
    import transformers

    from . import hf

    hf.register()
    path = args.hf_config
    if not path.exists():
        usage_error("varlen check", f"--hf-config {path}: no such file or folder (this machine reads local paths)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        usage_error("varlen check", f"--hf-config {path}: not a transformers config ({str(e).splitlines()[0]})")
    causal = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if config.model_type not in causal:
        usage_error("varlen check", f"--hf-config {path}: a {type(config).__name__} ({config.model_type!r}) is not a "
                                    "causal LM that transformers registers (AutoModelForCausalLM); varlen checks those")
    kw = {"attn_implementation": args.attn_implementation}
    if not args.random_init and not (path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))):
        usage_error("varlen check", f"--hf-config {path}: no weights there; pass --random-init")
    try:
        model = (transformers.AutoModelForCausalLM.from_config(config, **kw) if args.random_init else
                 transformers.AutoModelForCausalLM.from_pretrained(str(path), **kw))
    except (ValueError, ImportError) as e:  # e.g. an attn_implementation the model does not take
        usage_error("varlen check", f"--hf-config {path}: transformers cannot build it "
                                    f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})")
    try:
        hf.use(args.backend, model)
    except hf.PackingRefused as e:
        print(f"varlen check: FAILED before any check could run: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 4096
    return model.to(args.device, dtype), positions


def main(argv=None) -> int:
    from .check import check

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.all_architectures is not None:
        return all_architectures(args)
    why = device_problem(args.device)
    if why:
        usage_error("varlen check", why)
    model, positions = load_model(args)
    from .attention import BackendUnavailable
    from .hf import PackingRefused

    try:
        report = check(model, max_len=min(args.max_len, positions), seed=args.seed, compile=args.compile)
    except (BackendUnavailable, PackingRefused) as e:  # refused: a feature varlen cannot honour, in one line
        print(f"varlen check: FAILED before any check could run: {e}", file=sys.stderr)
        return 1
    print(report.table())
    if args.json:
        from .check import to_json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(to_json(report))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
