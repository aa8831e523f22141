"""`varlen train`'s settings as one typed `TrainConfig`: its flags come from its fields, every check of
flags against each other is one line from `problems()`, and what the command line says is what the run
reads."""

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from varlen.levers import Levers
from varlen.train.cli import parse_args
from varlen.train.config import CONFIG_FIELDS, GROUPS, TrainConfig, names


def test_every_field_is_one_flag_and_no_two_groups_share_a_name():
    total = sum(len(fields(g)) for g in GROUPS.values())
    assert len(names()) == total
    p = argparse.ArgumentParser()
    TrainConfig.add_flags(p)
    flags = {o for a in p._actions for o in a.option_strings}
    assert {"--" + n.replace("_", "-") for n in names()} <= flags


def test_the_command_line_reaches_each_group():
    conf = parse_args(["--device", "cpu", "--lr", "0.02", "--optimizer", "adamw", "--steps", "7", "--cp", "1",
                       "--gelu", "tanh", "--reduce-dtype", "bf16", "--out", "somewhere", "--allow-change", "lr,seed",
                       "--truncate", "--no-compile"])
    assert conf.optim.lr == 0.02 and conf.optim.optimizer == "adamw" and conf.step.steps == 7
    assert conf.levers == Levers(gelu="tanh") and conf.wrapping.reduce_dtype == "bf16"
    assert conf.run.out == Path("somewhere") and conf.run.allow_change == ("lr", "seed")
    assert conf.data.too_long == "truncate" and conf.runtime.compile is False
    # defaults that depend on other settings: the study model's preset, AdamW's weight decay
    assert conf.model.preset == "tiny" and conf.optim.weight_decay == 0.01
    assert parse_args(["--device", "cpu"]).optim.weight_decay is None  # SGD takes none


@pytest.mark.parametrize("flags,says", [
    (["--resume"], "--resume and --save-every need --out"),
    (["--truncate", "--drop-long"], "--truncate and --drop-long: choose one"),
    (["--max-tokens", "8", "--max-tokens-per-rank", "8"], "not both"),
    (["--allow-change", "lr,colour"], "--allow-change: unknown field(s) colour"),
    (["--weight-decay", "0.1"], "--weight-decay is AdamW's"),
    (["--eval-every", "3"], "--eval-every needs held-out samples"),
    (["--lr-schedule", "cosine", "--warmup-steps", "20"], "--warmup-steps 20 leaves no step of the cosine decay"),
    (["--cp", "3"], "--cp 3: context parallelism splits the heads"),
])
def test_each_problem_is_one_line_before_anything_runs(capsys, flags, says):
    with pytest.raises(SystemExit) as e:
        parse_args(["--device", "cpu", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert says in err, err


def test_problems_lists_every_problem_of_the_flags():
    conf = TrainConfig.from_args(argparse.Namespace(**{
        **{f.name: f.default for g in GROUPS.values() for f in fields(g)},
        "resume": True, "overwrite": True, "truncate": True, "drop_long": True}))
    assert len(conf.problems()) == 3  # --out missing, --resume with --overwrite, --truncate with --drop-long


def test_what_a_checkpoint_is_tied_to_are_settings_of_the_config():
    derived = {"data_fingerprint", "too_long", "world_size", "schedule_steps"}  # computed from the settings
    assert set(CONFIG_FIELDS) - derived <= names()


@pytest.mark.parametrize("router_logits", [True, False])
def test_a_load_balancing_loss_the_config_asks_for_is_refused_not_dropped(tmp_path, capsys, router_logits):
    transformers = pytest.importorskip("transformers")
    transformers.MixtralConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                               num_key_value_heads=1, vocab_size=64, num_local_experts=2, num_experts_per_tok=1,
                               output_router_logits=router_logits, router_aux_loss_coef=0.02).save_pretrained(tmp_path)
    if not router_logits:  # the cross-entropy is all the model's config asks for
        assert parse_args(["--model", str(tmp_path), "--device", "cpu"]).model.model == str(tmp_path)
        return
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "router's load-balancing loss (output_router_logits=true, router_aux_loss_coef=0.02)" in err
