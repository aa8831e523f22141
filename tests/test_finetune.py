"""varlen train --model DIR: a saved HF causal LM fine-tuned on text and chat rows (the standard
library's sources, a BPE tokenizer trained on them), evaluated, exported and reloaded; the
optimizer's groups, the schedule, resume, and the one-line refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from varlen.corpus import CHAT_TEMPLATE, save_model_folder, stdlib_documents, train_tokenizer, write_text_jsonl
from varlen.loss import IGNORE_INDEX
from varlen.train.data import DataError, load
from varlen.train.evaluate import hold_out
from varlen.train.optim import Schedule, decay_split
from varlen.train.text import chat_ids

VOCAB = 384
COMMON = ["--device", "cpu", "--max-tokens", "2048", "--max-len", "512", "--truncate", "--seed", "3",
          "--optimizer", "adamw", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = stdlib_documents(limit=48, max_chars=2500)
    tok = train_tokenizer(docs, VOCAB)
    folders = {kind: save_model_folder(root / kind, tok, kind) for kind in ("llama", "qwen2")}
    return {"docs": write_text_jsonl(docs, root / "docs.jsonl"), "tok": tok, **folders, "root": root}


def _train(args, capsys) -> tuple[int, str]:
    from varlen.train.cli import main

    try:
        code = main([*COMMON, *map(str, args)])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _held_out_loss(folder: Path, data: Path, fraction: float, seed: int) -> tuple[float, int]:
    """The exported model, loaded by transformers alone (its own sdpa), on each held-out sample alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ds = load(str(data), num_samples=0, max_len=512, vocab_size=len(tok), seed=seed, too_long="truncate", tokenizer=tok)
    _, held = hold_out(ds, fraction, seed)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(held)):
            x, y = held[i]
            logits = model(input_ids=x[None]).logits[0].double()
            total += torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum").item()
            n += int((y != IGNORE_INDEX).sum())
    return total / n, n


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fine_tune_evaluate_export_reload(corpus, tmp_path, capsys, kind):
    out, export = tmp_path / "run", tmp_path / "export"
    code, err = _train(["--model", corpus[kind], "--data", corpus["docs"], "--steps", 20, "--lr", 3e-3,
                        "--lr-schedule", "cosine", "--warmup-steps", 3, "--max-grad-norm", 1.0,
                        "--eval-split", 0.1, "--eval-every", 10, "--out", out, "--export", export], capsys)
    assert code == 0, err
    log = _log(out)
    losses = [r["loss"] for r in log]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses  # it learns
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    assert all(r["grad_norm"] > 0 for r in log) and log[0]["lr"] == pytest.approx(1e-3)
    # the exported folder is the trained model: transformers alone gives the logged held-out loss
    loss, n = _held_out_loss(export, corpus["docs"], 0.1, 3)
    assert n == evals[-1]["eval_targets"]
    # float32 logits summed over n targets in another order: a few float32 ulps of the mean
    assert loss == pytest.approx(evals[-1]["eval_loss"], rel=64 * torch.finfo(torch.float32).eps)
    assert "varlen" not in (export / "config.json").read_text()  # loads where varlen is not installed
    assert (export / "tokenizer.json").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in board.Scalars("eval_loss")] == [10, 20]
    assert [e.value for e in board.Scalars("loss")] == pytest.approx(losses, rel=1e-6)


def test_resume_mid_epoch_keeps_the_schedule_and_the_stream(corpus, tmp_path, capsys):
    args = ["--model", corpus["llama"], "--data", corpus["docs"], "--steps", 8, "--lr", 3e-3, "--lr-schedule", "cosine",
            "--warmup-steps", 2, "--save-every", 4, "--keep", 2, "--max-tokens", 1024]
    assert _train([*args, "--out", tmp_path / "full"], capsys)[0] == 0
    want = _log(tmp_path / "full")
    out = tmp_path / "cut"
    assert _train([*args, "--out", out], capsys)[0] == 0
    shutil.rmtree(out / "checkpoint" / "step-00000008")  # as if it crashed after step 4's checkpoint
    code, err = _train([*args, "--out", out, "--resume"], capsys)
    assert code == 0, err
    got = _log(out)
    assert [r["step"] for r in got] == list(range(1, 9))
    for key in ("loss", "lr", "tokens", "targets"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], abs=1e-6), key


def test_chat_mask_equals_a_hand_built_one(corpus):
    tok = corpus["tok"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"},
                {"role": "assistant", "content": "return x"}, {"role": "user", "content": "and g?"},
                {"role": "assistant", "content": "pass"}]
    ids, trained = chat_ids(tok, messages, "row 1")
    want_ids, want_mask = [], []
    for m in messages:  # a role token, the content, <|end|>; the assistant's content and <|end|> trained
        content = tok(m["content"], add_special_tokens=False)["input_ids"]
        turn = [tok.convert_tokens_to_ids(f"<|{m['role']}|>"), *content, tok.convert_tokens_to_ids("<|end|>")]
        want_ids += turn
        want_mask += [False] + [m["role"] == "assistant"] * (len(turn) - 1)
    assert ids == want_ids and trained == want_mask


def test_chat_rows_train_on_assistant_tokens_only(corpus, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "import os"}, {"role": "assistant", "content": "os.path"}]},
            {"text": "x = 1"}, [5, 6, 7]]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load(str(path), num_samples=0, max_len=512, vocab_size=VOCAB, seed=0, tokenizer=corpus["tok"])
    ids, trained = chat_ids(corpus["tok"], rows[0]["messages"], "x")
    x, y = ds[0]
    assert torch.equal(x, torch.tensor(ids[:-1]))
    assert [t != IGNORE_INDEX for t in y.tolist()] == trained[1:]
    x, y = ds[1]  # text: BOS, the tokens, EOS; every target trained
    assert x[0] == corpus["tok"].bos_token_id and y[-1] == corpus["tok"].eos_token_id and (y != IGNORE_INDEX).all()


def test_bad_rows_and_tokenizers_are_one_line_naming_the_row(corpus, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: an object without 'input_ids', 'text' or 'messages' \(keys: prompt\)"):
        load(str(path), num_samples=0, max_len=64, vocab_size=VOCAB, seed=0, tokenizer=corpus["tok"])
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    plain = train_tokenizer(["abc def"] * 4, 300)
    plain.chat_template = None
    with pytest.raises(DataError, match=r"bad.jsonl:1: a chat row, but the tokenizer has no chat template"):
        load(str(path), num_samples=0, max_len=64, vocab_size=VOCAB, seed=0, tokenizer=plain)
    with pytest.raises(DataError, match=r"bad.jsonl:1: a 'messages' row needs the model's tokenizer"):
        load(str(path), num_samples=0, max_len=64, vocab_size=VOCAB, seed=0)
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: a conversation without an assistant turn"):
        load(str(path), num_samples=0, max_len=64, vocab_size=VOCAB, seed=0, tokenizer=corpus["tok"])
    path.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: message 0 is not an object with string 'role' and 'content'"):
        load(str(path), num_samples=0, max_len=64, vocab_size=VOCAB, seed=0, tokenizer=corpus["tok"])
    small = train_tokenizer(["abc def"] * 4, 300)
    path.write_text('{"text": "abc"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: the tokenizer gave id \d+, outside the model's vocabulary 0..9"):
        load(str(path), num_samples=0, max_len=64, vocab_size=10, seed=0, tokenizer=small)


def test_bad_model_folders_are_one_line(corpus, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bin_only = tmp_path / "bin-only"  # pickled weights are never loaded
    shutil.copytree(corpus["llama"], bin_only)
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(corpus["llama"], no_tok, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    cases = [(["--model", empty, "--data", corpus["docs"]], r"empty: no model config could be read"),
             (["--model", bin_only, "--data", corpus["docs"]], r"bin-only: transformers could not load it as a causal "
                                                                r"LM from safetensors weights"),
             (["--model", no_tok, "--data", corpus["docs"]], r"docs.jsonl:1: a 'text' row needs the model's tokenizer"),
             (["--model", "nonsense", "--data", corpus["docs"]], r"unknown model 'nonsense': neither one of"),
             (["--model", corpus["llama"], "--preset", "tiny"], r"--preset sizes the study's models"),
             (["--preset", "tiny", "--data", corpus["docs"], "--max-len", 200],
              r"docs.jsonl:1: a 'text' row needs the model's tokenizer")]
    for args, msg in cases:
        code, err = _train([*args, "--steps", 1], capsys)
        lines = [x for x in err.splitlines() if x.strip() and not x.startswith(("usage", " ", "Loading", "W1"))]
        assert code == 2 and len(lines) == 1, err
        assert __import__("re").search(msg, lines[0]), lines[0]


def test_flags_that_cannot_work_are_refused(corpus, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases = [(["--warmup", 3], "renamed: --timing-warmup N"),
             (["--eval-every", 5], "--eval-every needs held-out samples"),
             (["--optimizer", "sgd", "--weight-decay", 0.1], "--weight-decay is AdamW's"),
             (["--export", tmp_path / "x"], "--model decoder is varlen's own decoder"),
             (["--model", corpus["llama"], "--export", tmp_path / "full"], "is a folder that is not empty"),
             (["--lr-schedule", "cosine", "--warmup-steps", 5], "leaves no step of the cosine decay"),
             (["--eval-split", 1.5], "not a fraction below 1")]
    for args, msg in cases:
        code, err = _train([*args, "--steps", 5, "--max-len", 200], capsys)
        assert code == 2 and msg in err, err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_weight_decay_spares_biases_norms_and_embeddings(corpus):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(corpus["qwen2"])  # qwen2: q/k/v projections have biases
    decay, keep = decay_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay}
    kept = {names[id(p)] for p in keep}
    assert decayed and all(n.endswith("proj.weight") or n == "lm_head.weight" for n in decayed), decayed
    assert "model.embed_tokens.weight" in kept and any("norm" in n for n in kept) and any("bias" in n for n in kept)
    assert len(decay) + len(keep) == len(list(model.parameters()))


def test_schedule_rates():
    s = Schedule("cosine", lr=1.0, warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [s.rate(i) for i in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert s.rate(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert s.rate(14) == pytest.approx(0.1) and s.rate(20) == pytest.approx(0.1)
    lin = Schedule("linear", lr=2.0, total_steps=10)
    assert lin.rate(5) == pytest.approx(1.0) and lin.rate(10) == pytest.approx(0.0)
    assert Schedule(lr=0.3, warmup_steps=2).rate(7) == 0.3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5.0)
    assert s.apply(opt, 2) == 0.5 and opt.param_groups[0]["lr"] == 0.5


SCRIPT = Path(__file__).parent / "scripts" / "trainer_plugin.py"


def _run(n: int, *args) -> None:
    import os
    import subprocess
    import sys

    launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              f"--nproc-per-node={n}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*launch, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("n, kind", [(1, "trainer"), (2, "trainer"), (1, "sft")])
def test_hf_trainer_with_varlens_batches_equals_varlen_train(corpus, tmp_path, n, kind):
    # same samples each step (varlen's token-budget sampler in both), same normalisation over the
    # step's targets on every rank: the weights after 3 SGD steps agree to float32 rounding
    common = ["--steps", 3, "--max-tokens", 1024, "--lr", 0.05, "--seed", 5]
    run = ["-m", "varlen.train", "--model", corpus["llama"], "--data", corpus["docs"], "--device", "cpu", "--max-len", 512,
           "--truncate", *common, "--no-progress", "--out", tmp_path / "varlen", "--export", tmp_path / "export"]
    _run(n, *run)
    _run(n, SCRIPT, corpus["llama"], corpus["docs"], tmp_path / "hf", 3, 0.05, 1024, 5, kind)
    from safetensors.torch import load_file

    assert (tmp_path / "hf" / "world.txt").read_text() == str(n)
    hf, ours = load_file(tmp_path / "hf" / "weights.safetensors"), load_file(tmp_path / "export" / "model.safetensors")
    start = load_file(corpus["llama"] / "model.safetensors")
    for k in ours:
        moved = (ours[k] - start[k]).abs().max()
        assert moved > 0, k
        torch.testing.assert_close(hf[k], ours[k], rtol=0, atol=16 * torch.finfo(torch.float32).eps * ours[k].abs().max())


def test_shifted_row_collator_drops_last_tokens_and_honours_masks():
    from varlen.trainer import ShiftedRowCollator

    b = ShiftedRowCollator()([{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5, 6, 7], "assistant_masks": [0, 0, 1]},
                              {"input_ids": [8, 9], "labels": [-100, 9]}])
    assert b["input_ids"].tolist() == [[1, 2, 3, 5, 6, 8]]
    assert b["shift_labels"].tolist() == [[2, 3, 4, IGNORE_INDEX, 7, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]] and tuple(b["varlen_info"].lengths) == (3, 2, 1)
    empty = ShiftedRowCollator()([])  # a rank whose share is empty still runs a step, learning nothing
    assert empty["input_ids"].shape == (1, 1) and empty["shift_labels"].tolist() == [[IGNORE_INDEX]]
    with pytest.raises(ValueError, match="sample 0 has 1 token"):
        ShiftedRowCollator()([{"input_ids": [3]}])


def test_loss_chunk_trains_as_the_full_logits_do(corpus, tmp_path, capsys):
    args = ["--model", corpus["qwen2"], "--data", corpus["docs"], "--steps", 4, "--lr", 3e-3, "--eval-split", 0.1]
    assert _train([*args, "--out", tmp_path / "full"], capsys)[0] == 0
    code, err = _train([*args, "--loss-chunk", 100, "--out", tmp_path / "chunked"], capsys)
    assert code == 0, err
    want, got = _log(tmp_path / "full"), _log(tmp_path / "chunked")
    # float32 sums of the same logits in chunks: rounding only
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    assert got[-1]["eval_loss"] == pytest.approx(want[-1]["eval_loss"], rel=1e-5)


def test_loss_chunk_is_refused_where_the_head_is_more_than_a_matrix(corpus, tmp_path, capsys):
    from varlen.corpus import save_model_folder

    gemma2 = save_model_folder(tmp_path / "gemma2", corpus["tok"], "gemma2", head_dim=16)
    for args, msg in (([], "--loss-chunk: varlen's decoder keeps its head"),
                      (["--model", gemma2, "--data", corpus["docs"]], "--loss-chunk: model type gemma2's logits are not "
                                                                      "known to be its head alone")):
        code, err = _train([*args, "--loss-chunk", 64, "--steps", 1, "--max-len", 200], capsys)
        assert code == 2 and msg in err, err


def test_token_rows_live_in_a_mapped_file_that_is_gone_from_disk():
    import tempfile

    from varlen.train.data import TokenDataset

    before = set(Path(tempfile.gettempdir()).glob("varlen-tokens-*"))
    ds = TokenDataset(iter([([1, 2, 3], None), ([4, 5, 6, 7], [False, False, True, True])]))
    assert set(Path(tempfile.gettempdir()).glob("varlen-tokens-*")) == before  # unlinked once mapped
    assert ds.ids.dtype == torch.int32 and ds.ids.numel() == 7 and ds.lengths == [2, 3]
    assert ds.rows == [([1, 2, 3], [True] * 3), ([4, 5, 6, 7], [False, False, True, True])]
    x, y = ds[1]
    assert x.tolist() == [4, 5, 6] and y.tolist() == [IGNORE_INDEX, 6, 7] and x.dtype == torch.int64


def test_hf_trainer_with_varlens_batches_resumes_on_the_next_samples(corpus, tmp_path):
    # the Trainer's own resume (skipping the batches of its epoch) walks varlen's sampler to the
    # same place: resumed from step 2 of 4, the weights equal the uninterrupted run's
    _run(1, SCRIPT, corpus["llama"], corpus["docs"], tmp_path / "full", 4, 0.05, 1024, 5, "trainer", "save")
    _run(1, SCRIPT, corpus["llama"], corpus["docs"], tmp_path / "resumed", 4, 0.05, 1024, 5, "trainer",
         tmp_path / "full" / "checkpoint-2")
    from safetensors.torch import load_file

    full, resumed = (load_file(tmp_path / p / "weights.safetensors") for p in ("full", "resumed"))
    two = load_file(tmp_path / "full" / "checkpoint-2" / "model.safetensors")
    for k in full:
        assert (full[k] - two[k]).abs().max() > 0, k  # steps 3 and 4 moved it
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_fine_tuning_on_two_processes_equals_one(corpus, tmp_path, parallel):
    # the same samples each step split over two ranks, the held-out loss summed over both:
    # the logged train and held-out losses equal one process's
    common = ["-m", "varlen.train", "--model", corpus["llama"], "--data", corpus["docs"], "--device", "cpu",
              "--max-len", 512, "--truncate", "--steps", 4, "--max-tokens", 1024, "--optimizer", "adamw",
              "--lr", 3e-3, "--lr-schedule", "cosine", "--warmup-steps", 1, "--eval-split", 0.1, "--eval-every", 2,
              "--no-progress"]
    _run(1, *common, "--out", tmp_path / "one")
    _run(2, *common, "--parallel", parallel, "--out", tmp_path / "two")
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    for key in ("loss", "lr", "targets"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key
    evals = [(r["step"], r["eval_loss"], r["eval_targets"]) for r in one if "eval_loss" in r]
    assert [(s, t) for s, _, t in evals] == [(r["step"], r["eval_targets"]) for r in two if "eval_loss" in r]
    assert [r["eval_loss"] for r in two if "eval_loss" in r] == pytest.approx([e for _, e, _ in evals], rel=1e-5)
