"""The decoder's levers are one typed object: both commands get the same flags from its fields, the
same refusals from its one check, and run.json records what differs from the defaults."""

from __future__ import annotations

import itertools
import json
from dataclasses import fields

import pytest

from varlen.levers import Levers, flag_of

CHOICES = {"residual_dtype": ["fp32", "bf16"], "gelu": ["exact", "tanh"], "mlp_kernel": ["torch", "quack"],
           "fp8": [None, "tensorwise", "rowwise"]}


def _option(parser, name: str):
    return next(a for a in parser._actions if flag_of(name) in a.option_strings)


def test_every_field_is_a_flag_of_both_commands_with_the_same_default_and_choices():
    from varlen.bench.cli import parse_args as bench_args
    from varlen.train.cli import parse_args as train_args

    assert set(CHOICES) == {f.name for f in fields(Levers)}  # a new lever gets its choices listed here
    bench, train = bench_args([]), train_args([])
    assert bench.levers == train.levers == Levers()
    for f in fields(Levers):
        for value in CHOICES[f.name][1:]:
            argv = [flag_of(f.name), value]
            assert getattr(bench_args(argv).levers, f.name) == value
            assert getattr(train_args(argv).levers, f.name) == value


def test_long_dtype_names_are_taken():
    from varlen.train.cli import parse_args

    assert parse_args(["--residual-dtype", "bfloat16"]).levers.residual_dtype == "bf16"


@pytest.mark.parametrize("values", list(itertools.product(*CHOICES.values())))
def test_problems_hold_for_every_combination(values):
    levers = Levers(**dict(zip(CHOICES, values)))
    changed = levers.changed()
    assert set(changed) == {k for k, v in zip(CHOICES, values) if v != CHOICES[k][0]}
    # a model of its own takes no lever; varlen's decoder under bf16 takes every valid one
    assert bool(levers.problems("hf-llama", "bf16")) == bool(changed)
    quack_ok = levers.mlp_kernel != "quack" or levers.gelu == "tanh"
    assert (levers.problems("decoder", "bf16") == []) == quack_ok
    fp32_ok = quack_ok and levers.residual_dtype == "fp32" and levers.mlp_kernel == "torch"
    assert (levers.problems("decoder", "fp32") == []) == fp32_ok
    for line in levers.problems("hf-llama", "fp32"):
        assert "\n" not in line and line.startswith("--")


def test_decoder_fields_build_a_decoder_config():
    from varlen.models import DecoderConfig

    cfg = DecoderConfig.from_name("tiny", **Levers(residual_dtype="bf16", gelu="tanh").decoder_fields())
    assert (cfg.residual_dtype, cfg.activation, cfg.mlp_kernel) == ("bfloat16", "gelu_tanh", "torch")
    assert DecoderConfig.from_name("tiny", **Levers().decoder_fields()) == DecoderConfig.from_name("tiny")


def test_quack_is_unavailable_without_a_gpu():
    assert Levers(gelu="tanh", mlp_kernel="quack").unavailable("cpu") == "--mlp-kernel quack: it needs a CUDA device"
    assert Levers().unavailable("cpu") is None


def test_preset_names_are_the_decoder_presets_in_every_command(capsys):
    import re

    from varlen.bench.cases import WORKLOADS
    from varlen.bench.cli import parse_args as bench
    from varlen.check_cli import parse_args as check
    from varlen.models.decoder import PRESETS
    from varlen.train.cli import parse_args as train
    from varlen.bench.scaling import parse as scaling

    # a bench preset of a name runs the decoder preset of that name
    assert set(WORKLOADS) == set(PRESETS) and all(w.model == name for name, w in WORKLOADS.items())
    listed = []
    for parse in (bench, train, check, scaling):
        with pytest.raises(SystemExit):
            parse(["--preset", "huge"])
        listed.append(re.search(r"invalid choice: 'huge' \(choose from (.*)\)", capsys.readouterr().err).group(1))
    assert len(set(listed)) == 1 and set(re.findall(r"\w+", listed[0])) == set(PRESETS), listed


def test_one_spelling_for_each_setting_across_commands():
    # what varlen train calls --timing-warmup (untimed steps), --max-tokens (a step's token budget),
    # --max-tokens-per-rank and varlen bench's --case-timeout, the other commands spell alike; their
    # older spellings still parse to the same setting
    from varlen.bench.cli import parse_args as bench
    from varlen.bench.scaling import parse as scaling
    from varlen.check_cli import parse_args as check
    from varlen.train.cli import parse_args as train

    conf = train(["--timing-warmup", "3", "--max-tokens", "4096"])
    assert (conf.run.timing_warmup, conf.step.max_tokens) == (3, 4096)
    assert train(["--max-tokens-per-rank", "512"]).step.max_tokens_per_rank == 512
    for argv in (["--timing-warmup", "3", "--max-tokens", "4096"], ["--warmup", "3", "--tokens-per-batch", "4096"]):
        args = bench(argv)
        assert (args.warmup, args.tokens_per_batch) == (3, 4096)
    for argv in (["--timing-warmup", "3", "--max-tokens-per-rank", "512"], ["--warmup", "3", "--tokens-per-rank", "512"]):
        args, _ = scaling(argv)
        assert (args.warmup, args.tokens_per_rank) == (3, 512)
    one = ["--all-architectures"]
    assert check([*one, "--case-timeout", "60"]).case_timeout == check([*one, "--timeout", "60"]).case_timeout == 60
    assert bench(["--case-timeout", "60"]).case_timeout == 60


def test_a_bench_case_carries_its_levers_to_the_worker_and_back():
    from varlen.bench.cases import WORKLOADS, Case

    levers = Levers(residual_dtype="bf16", gelu="tanh", fp8="rowwise")
    case = Case("packed-sdpa", "train", True, WORKLOADS["tiny"].__class__(**{**WORKLOADS["tiny"].__dict__, "levers": levers}))
    assert Case.from_dict(json.loads(json.dumps(case.to_dict()))) == case


def test_convert_and_token_multiple_follow_fp8():
    from varlen.fp8 import TOKEN_MULTIPLE
    from varlen.models import Decoder, DecoderConfig

    assert Levers().token_multiple is None and Levers(fp8="tensorwise").token_multiple == TOKEN_MULTIPLE
    model = Decoder(DecoderConfig.from_name("tiny"))
    before = [type(m).__name__ for m in model.modules()]
    Levers().convert(model)
    assert [type(m).__name__ for m in model.modules()] == before
    pytest.importorskip("torchao")
    Levers(fp8="rowwise").convert(model)
    assert "Float8Linear" in [type(m).__name__ for m in model.modules()]


def test_one_spelling_for_compile_backend_and_dtypes_across_commands(capsys):
    from varlen.check_cli import parse_args as check
    from varlen.train.cli import parse_args as train
    from varlen.bench.scaling import parse as scaling

    base = {train: [], scaling: [], check: ["--preset", "tiny"]}
    compiled = {train: lambda c: c.runtime.compile, scaling: lambda c: c[0].compile}  # settings in groups
    for parse, extra in base.items():
        on = compiled.get(parse, lambda c: c.compile)
        assert on(parse([*extra, "--compile"])) is True and on(parse([*extra, "--no-compile"])) is False
        with pytest.raises(SystemExit):
            parse([*extra, "--backend", "nope"])
        assert "--backend" in capsys.readouterr().err
    reduce = ["--reduce-dtype", "bfloat16"]
    assert train(reduce).wrapping.reduce_dtype == scaling(reduce)[1].reduce_dtype == "bf16"
    for flag in ("--steps", "--tokens-per-rank", "--cp"):
        with pytest.raises(SystemExit):
            scaling([flag, "0"])
        assert flag in capsys.readouterr().err
    # what cannot run is one line before anything starts
    for argv, said in ((["--dists", "uniform,zipf"], "'zipf' is neither"), (["--splits", "balanced,random"], "random"),
                       (["--preset", "tiny", "--cp", "3"], "--cp 3: context parallelism splits the heads")):
        with pytest.raises(SystemExit):
            scaling(argv)
        err = capsys.readouterr().err
        assert said in err and len([x for x in err.splitlines() if "error" in x]) == 1, err


def test_train_and_the_scaling_sweep_take_the_same_wrapping_flags():
    import torch

    from varlen.train.cli import parse_args as train
    from varlen.parallel.distributed import Wrapping
    from varlen.bench.scaling import parse as scaling

    argv = ["--reduce-dtype", "bfloat16", "--bucket-mb", "7", "--static-graph", "--no-reshard-after-forward"]
    want = Wrapping(reduce_dtype="bf16", bucket_mb=7, static_graph=True, reshard_after_forward=False)
    assert train(argv).wrapping == scaling(argv)[1] == want
    assert train([]).wrapping == scaling([])[1] == Wrapping()
    assert want.wrap_kwargs() == {"reduce_dtype": torch.bfloat16, "bucket_mb": 7, "static_graph": True,
                                  "reshard_after_forward": False}
