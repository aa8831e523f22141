"""varlen train: loss normalisation, DDP / FSDP2 on CPU (gloo) against one process, resume."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from varlen.data import SyntheticDataset
from varlen.models import DECODER, Decoder
from varlen.engine import train_step
from varlen.train import checkpoint
from varlen.data import TrainCollator

SCRIPTS = Path(__file__).parent / "scripts"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(n: int, *args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _log(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "train_log.jsonl").read_text().splitlines()]


def _fwd(m, b):
    return DECODER.logits(m, b, causal=True)


def test_accumulated_micro_steps_equal_one_step_over_their_union():
    ds = SyntheticDataset(40, max_len=90, seed=3)
    parts = [[0], list(range(1, 4)), list(range(4, 20)), list(range(20, 40))]  # 1 to 20 samples
    assert len({sum(ds.lengths[i] for i in p) for p in parts}) == 4, "uneven token counts"
    collate = TrainCollator()
    grads, losses = [], []
    for groups in (parts, [sum(parts, [])]):
        torch.manual_seed(0)
        model = Decoder("tiny").double()
        stats = train_step(model, [collate([ds[i] for i in g]) for g in groups], None, _fwd)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        losses.append(float(stats.loss))
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-10, atol=1e-12, msg=k)


def test_mean_of_micro_means_would_differ():
    # the check above can fail: averaging per-micro-batch means (HF's old accumulation) differs
    ds = SyntheticDataset(10, max_len=90, seed=3)
    collate = TrainCollator()
    torch.manual_seed(0)
    model = Decoder("tiny").double()
    a = float(train_step(model, [collate([ds[0]]), collate([ds[i] for i in range(1, 10)])], None, _fwd).loss)
    means = []
    for g in ([0], list(range(1, 10))):
        means.append(float(train_step(model, [collate([ds[i] for i in g])], None, _fwd).loss))
    assert abs(a - sum(means) / 2) > 1e-4


def test_static_graph_refuses_accumulation(capsys):
    ds = SyntheticDataset(4, max_len=50, seed=3)
    collate = TrainCollator()
    model = Decoder("tiny").double()
    model.static_graph = True  # what DDP(static_graph=True) exposes
    with pytest.raises(ValueError, match="static_graph"):
        train_step(model, [collate([ds[0]]), collate([ds[1]])], None, _fwd)
    assert all(p.grad is None for p in model.parameters()), "refused before any backward"
    from varlen.train.cli import main

    with pytest.raises(SystemExit) as e:  # the CLI says so before building anything
        main(["--static-graph", "--grad-accum", "2", "--device", "cpu", "--steps", "1", "--no-progress"])
    assert e.value.code == 2 and "--static-graph with --grad-accum > 1" in capsys.readouterr().err


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2", "ddp:static", "fsdp2:keep"])
def test_two_processes_equal_one(tmp_path, parallel):
    _torchrun(1, SCRIPTS / "dist_steps.py", parallel, tmp_path / "one.pt")
    _torchrun(2, SCRIPTS / "dist_steps.py", parallel, tmp_path / "two.pt")
    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    assert one["losses"] == pytest.approx(two["losses"], abs=1e-10)
    assert one["losses"][0] != pytest.approx(one["losses"][-1], abs=1e-3), "the steps must move the weights"
    # float64, lr 0.5: summing gradients over ranks instead of in one process reorders the sums,
    # which three steps grow to ~1e-10; a wrong normalisation shows at 1e-3 and above
    for k, v in one["params"].items():
        torch.testing.assert_close(two["params"][k], v, rtol=1e-8, atol=1e-9, msg=k)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_cli_loss_column_does_not_depend_on_process_count(tmp_path, parallel):
    common = ["-m", "varlen.train", "--preset", "tiny", "--device", "cpu", "--steps", "5", "--max-tokens", "4096",
              "--seed", "0", "--lr", "0.05", "--no-progress", "--parallel", parallel]
    _torchrun(1, *common, "--out", tmp_path / "one")
    _torchrun(2, *common, "--out", tmp_path / "two")
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert a["tokens"] == b["tokens"] == sum(b["rank_tokens"]) and len(b["rank_tokens"]) == 2
    assert (tmp_path / "two" / "train.png").stat().st_size > 0
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


def test_context_parallel_cli_equals_one_process(tmp_path):
    # --cp 2 on 2 processes (each row split in two) and dp 2 x cp 2 on 4: the loss of every step and
    # the tokens as in one process
    common = ["-m", "varlen.train", "--preset", "tiny", "--device", "cpu", "--steps", "5", "--max-tokens", "4096",
              "--seed", "0", "--lr", "0.05", "--no-progress"]
    _torchrun(1, *common, "--out", tmp_path / "one")
    one = _log(tmp_path / "one")
    for n, cp in ((2, 2), (4, 2)):
        _torchrun(n, *common, "--cp", str(cp), "--out", tmp_path / f"{n}x{cp}")
        got = _log(tmp_path / f"{n}x{cp}")
        assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
        for a, b in zip(one, got):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-4) and b["tokens"] == a["tokens"]
    assert one[0]["loss"] != pytest.approx(one[-1]["loss"], abs=1e-3), "the steps must move the weights"


def test_scaling_sweep_with_context_parallelism(tmp_path):
    from varlen.bench.sweep import report

    common = ["-m", "varlen.bench.scaling", "--preset", "tiny", "--device", "cpu", "--no-compile", "--steps", "2",
              "--warmup", "1", "--tokens-per-rank", "512", "--dists", "fixed", "--splits", "balanced", "--max-len", "1023"]
    _torchrun(1, *common, "--tokens-per-rank", "1024", "--out", tmp_path / "one")
    _torchrun(2, *common, "--cp", "2", "--out", tmp_path / "cp2")
    runs = report([tmp_path / "one", tmp_path / "cp2"], tmp_path / "rep")["runs"]
    cp2 = [r for r in runs if r["cp"] == 2][0]
    # one 1023-token document a row, longer than the 512 tokens each rank holds
    assert cp2["max_doc_tokens"] == 1023 and cp2["world_size"] == 2 and cp2["tflops_per_gpu"] > 0
    assert cp2["tflops_vs_one_gpu"] > 0 and cp2["step_ms_alone_mean"] is None
    # the one-GPU run trained the same 1023-token documents: the cost of splitting the row alone
    one = [r for r in runs if r["cp"] == 1][0]
    assert cp2["tflops_vs_same_document"] == pytest.approx(cp2["tflops_per_gpu"] / one["tflops_per_gpu"])
    assert cp2["speedup_vs_same_document"] == pytest.approx(one["step_ms_mean"] / cp2["step_ms_mean"])
    table = (tmp_path / "rep" / "scaling.md").read_text()
    assert "| - | 2 | 2 | fixed | 1,023 |" in table and f"{100 * cp2['tflops_vs_same_document']:.1f}%" in table


def test_context_parallel_cli_refusals(capsys):
    from varlen.train.cli import main

    for argv, message in ((["--cp", "3"], "splits the heads, and preset tiny has 4"),
                          (["--cp", "8", "--model", "hf-llama"], "splits the heads, and preset tiny has 4")):
        with pytest.raises(SystemExit) as e:
            main(["--preset", "tiny", "--device", "cpu", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_empty_share_on_a_rank_still_steps(tmp_path):
    # 3 samples a global batch on 4 ranks: one rank gets nothing and must still join the collectives
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(list(range(1, 40))) + "\n" for _ in range(6)))
    _torchrun(4, "-m", "varlen.train", "--preset", "tiny", "--device", "cpu", "--steps", "2", "--max-tokens", "120",
              "--data", data, "--no-progress", "--out", tmp_path / "o")
    log = _log(tmp_path / "o")
    assert [sorted(r["rank_tokens"]) for r in log] == [[0, 38, 38, 38]] * 2


def test_killed_run_resumes_to_the_same_losses(tmp_path):
    common = [sys.executable, "-m", "varlen.train", "--preset", "tiny", "--device", "cpu", "--max-tokens", "2048",
              "--seed", "1", "--lr", "0.05", "--optimizer", "adamw", "--no-progress"]
    subprocess.run([*common, "--steps", "8", "--out", str(tmp_path / "full")], check=True, env=ENV, capture_output=True)
    want = [r["loss"] for r in _log(tmp_path / "full")]

    out = tmp_path / "killed"
    proc = subprocess.Popen([*common, "--steps", "100000", "--save-every", "3", "--out", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if checkpoint.latest(out / "checkpoint") is not None and len(_log(out)) >= 4:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = len(_log(out))
    assert killed_at >= 4, "the run must have gone past its checkpoint before the kill"
    subprocess.run([*common, "--steps", "8", "--resume", "--out", str(out)], check=True, env=ENV, capture_output=True)
    got = _log(out)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss"] for r in got] == pytest.approx(want, abs=1e-6)


def test_scaling_sweep_and_report(tmp_path):
    from varlen.bench.sweep import report

    for n in (1, 2):
        _torchrun(n, "-m", "varlen.bench.scaling", "--preset", "tiny", "--device", "cpu", "--no-compile", "--steps", "3",
                  "--warmup", "1", "--tokens-per-rank", "1024", "--dists", "lognormal", "--out", tmp_path / f"w{n}",
                  "--profile-steps", "1", "--cost", "measure", "--label", "m")
    result = report([tmp_path / "w1", tmp_path / "w2"], tmp_path / "rep")
    assert all(r["label"] == "m" and r["cost"] == "measure" and r["profile"]["steps"] == 1 for r in result["runs"])
    assert all(r["efficiency_vs_alone"] > 0 and r["step_ms_alone_mean"] > 0 for r in result["runs"])  # ddp
    assert all(r["steps_dropped_for_compiling"] == 0 and len(r["step_ms"]) == 3 for r in result["runs"])
    for r in result["runs"]:  # per step, every rank's time alone; the spread is max / mean of them
        assert len(r["alone_ms_by_rank"]) == 3 and {len(a) for a in r["alone_ms_by_rank"]} == {r["world_size"]}
        assert r["alone_rank_spread"] >= 1.0
        assert 0 <= r["cost_check"]["error"] and r["cost_check"]["predicted_spread"] >= 1.0
        assert "per_seq" in r["cost_fit"] or "failed" in r["cost_fit"]
    keys = {"world_size", "parallel", "split", "length_dist", "tokens_per_s", "step_ms_mean", "efficiency", "peak_mem_gib"}
    assert len(result["runs"]) == 4 and all(keys <= set(r) for r in result["runs"])
    assert {r["efficiency"] for r in result["runs"] if r["world_size"] == 1} == {1.0}
    assert "gpu" in result["env"] and (tmp_path / "rep" / "scaling.md").exists()
    two = {r["split"]: r for r in result["runs"] if r["world_size"] == 2}
    assert two["balanced"]["rank_token_spread"] <= two["naive"]["rank_token_spread"]


def test_hf_model_trains_through_varlen(tmp_path):
    pytest.importorskip("transformers")
    for n in (1, 2):
        _torchrun(n, "-m", "varlen.train", "--model", "hf-llama", "--preset", "tiny", "--device", "cpu", "--steps", "3",
                  "--max-tokens", "2048", "--lr", "0.05", "--backend", "sdpa", "--no-progress", "--out", tmp_path / f"o{n}")
    one, two = _log(tmp_path / "o1"), _log(tmp_path / "o2")
    assert len(two) == 3
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-4)


def test_measured_cost_and_static_shapes(tmp_path):
    # --cost measure times the model once (rank 0's weights are broadcast so both ranks split alike);
    # --static pads every rank's row to one token count
    _torchrun(2, "-m", "varlen.train", "--preset", "tiny", "--device", "cpu", "--steps", "3", "--max-tokens", "4096",
              "--cost", "measure", "--static", "--no-progress", "--out", tmp_path / "o")
    log = _log(tmp_path / "o")
    assert len(log) == 3 and all(r["tokens"] == sum(r["rank_tokens"]) > 0 for r in log)


def test_fsdp2_resume_with_accumulation_equals_one_process(tmp_path):
    # sharded checkpoint (DCP) of a 2-process FSDP2 run with 2 micro-steps a step, resumed, against
    # one uninterrupted process over the same global batches
    common = ["-m", "varlen.train", "--preset", "tiny", "--device", "cpu", "--max-tokens", "4096", "--grad-accum", "2",
              "--lr", "0.05", "--optimizer", "adamw", "--no-progress"]
    _torchrun(2, *common, "--parallel", "fsdp2", "--steps", "2", "--save-every", "2", "--out", tmp_path / "two")
    _torchrun(2, *common, "--parallel", "fsdp2", "--steps", "4", "--resume", "--out", tmp_path / "two")
    _torchrun(1, *common, "--steps", "4", "--out", tmp_path / "one")
    two, one = _log(tmp_path / "two"), _log(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-4)


def test_hf_dataset_on_disk_trains_like_the_same_jsonl(tmp_path):
    # --data hf:DIR (a datasets folder with an input_ids column, here saved locally: no hub) gives
    # the same samples, and so the same losses, as the same rows in a JSONL file; a split is chosen
    # from a DatasetDict; a dataset without input_ids is a clear error
    datasets = pytest.importorskip("datasets")
    from varlen.train.data import DataError, load

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 200, (int(n),), generator=g).tolist() for n in torch.randint(2, 60, (40,), generator=g)]
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"input_ids": rows[:5]})}).save_to_disk(
        str(tmp_path / "dd"))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    kw = dict(num_samples=0, max_len=50, vocab_size=256, seed=0, too_long="truncate")
    a, b = load(f"hf:{tmp_path / 'ds'}", **kw), load(str(tmp_path / "rows.jsonl"), **kw)
    assert a.rows == b.rows and a.lengths == b.lengths and max(a.lengths) == 50
    assert load(f"hf:{tmp_path / 'dd'}:validation", **kw).rows == [(r[:51], None) for r in rows[:5]]
    with pytest.raises(DataError, match="splits \\['validation'\\]; name one"):
        load(f"hf:{tmp_path / 'dd'}", **kw)
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(DataError, match="text row 0: a 'text' row needs the model's tokenizer"):
        load(f"hf:{tmp_path / 'text'}", **kw)
    datasets.Dataset.from_dict({"body": ["a"]}).save_to_disk(str(tmp_path / "body"))
    with pytest.raises(DataError, match=r"columns \['body'\]: none of input_ids, text, messages"):
        load(f"hf:{tmp_path / 'body'}", **kw)
    with pytest.raises(DataError, match=r"ds row 3: a sample of 55 tokens, longer than"):  # the default: an error
        load(f"hf:{tmp_path / 'ds'}", **{**kw, "too_long": "error"})
    common = [sys.executable, "-m", "varlen.train", "--preset", "tiny", "--device", "cpu", "--steps", "3",
              "--max-tokens", "256", "--seed", "0", "--no-progress"]
    for name, data in (("hf", f"hf:{tmp_path / 'ds'}"), ("jsonl", tmp_path / "rows.jsonl")):
        subprocess.run([*common, "--data", str(data), "--out", str(tmp_path / name)], check=True, env=ENV,
                       capture_output=True, timeout=240)
    assert [r["loss"] for r in _log(tmp_path / "hf")] == [r["loss"] for r in _log(tmp_path / "jsonl")]


def test_garbage_collection_runs_on_its_own_cadence(monkeypatch):
    import gc

    from varlen.measure import GarbageCollection

    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation))
    collector = GarbageCollection(3)
    assert not gc.isenabled() and calls == [2]  # one full collection at the start, then only ours
    for _ in range(7):
        collector.step()
    assert calls == [2, 1, 1]  # steps 3 and 6
    collector.close()
    assert gc.isenabled()
    GarbageCollection(0).step()  # 0: Python's own collector, untouched
    assert gc.isenabled() and calls == [2, 1, 1]


def test_efficiency_vs_alone_is_parallel_rate_over_the_ranks_alone():
    from varlen.bench.sweep import _vs_alone

    shares = [[[100], [100]], [[50], [150]]]  # [step][rank]: lengths
    ms = [[10.0, 10.0], [5.0, 15.0]]  # each rank alone: 150 tokens in 15 ms, 250 in 25 ms: 10k tokens/s each
    assert _vs_alone(20_000.0, shares, ms) == pytest.approx(1.0)
    assert _vs_alone(15_000.0, shares, ms) == pytest.approx(0.75)
    assert _vs_alone(1.0, [], []) is None


def test_measured_cost_fits_three_weights_or_says_why(monkeypatch):
    from varlen.data import CostModel
    from varlen.models import DecoderConfig
    from varlen.engine.cost import measure_cost
    from varlen.parallel.distributed import Dist

    from varlen.engine import cost as cost_module

    cfg = DecoderConfig.from_name("tiny")
    d = Dist(0, 1, 0, torch.device("cpu"))
    model = Decoder(cfg)
    # a fake clock: the real forward+backward runs, the times come from a known cost model (real
    # CPU timings made this test fail on a busy machine)
    truth = CostModel(1.0, 2e-3, 40.0)
    times = [1e-5 * truth.share(s) for s in cost_module.cost_shares(cfg, d.device)]
    calls = []

    def fake_time_calls(fn, device, repeat, warmup=0):
        fn()
        calls.append(1)
        return [times[(len(calls) - 1) % len(times)]] * repeat

    monkeypatch.setattr(cost_module, "time_calls", fake_time_calls)
    cost = measure_cost(model, DECODER, cfg, d, None)
    assert len(calls) == len(cost_module.cost_shares(cfg, d.device))
    assert cost.per_token == 1.0
    assert cost.per_token_sq == pytest.approx(truth.per_token_sq, rel=1e-6)
    assert cost.per_seq == pytest.approx(truth.per_seq, rel=1e-6)
    assert all(p.grad is None for p in model.parameters()), "measuring leaves no gradients behind"

    def refuse(shares, times):
        raise ValueError("fit: made up")

    monkeypatch.setattr(CostModel, "fit", staticmethod(refuse))
    with pytest.raises(SystemExit, match="could not fit.*made up.*--cost flops"):
        measure_cost(model, DECODER, cfg, d, None)


def test_cost_check_scores_the_model_against_the_times():
    from varlen.data import CostModel
    from varlen.bench.sweep import _cost_check

    true = CostModel(1.0, 1e-3, 5.0)
    shares = [[[10] * 30, [300]], [[50, 60], [200, 20, 20]], [[500], [5] * 40]]  # [step][rank]
    ms = [[2e-3 * true.share(s) for s in step] for step in shares]
    out = _cost_check(true, shares, ms)
    assert out["cost_check"]["error"] == pytest.approx(0.0, abs=1e-12)  # right up to the time unit
    assert out["cost_fit"]["per_seq"] == pytest.approx(5.0) and out["cost_fit"]["per_token_sq"] == pytest.approx(1e-3)
    spread = sum(max(true.share(s) for s in step) / (sum(true.share(s) for s in step) / 2) for step in shares) / 3
    assert out["cost_check"]["predicted_spread"] == pytest.approx(spread)
    assert _cost_check(CostModel(), shares, ms)["cost_check"]["error"] > 0.05  # tokens alone miss the times
    assert _cost_check(true, shares[:1], [[1.0]]) == {}  # fewer than 3 times: nothing to say


@pytest.mark.parametrize("flags,says", [
    (["--cuda-graphs"], "add --compile"),
    (["--cuda-graphs", "--compile", "--grad-accum", "2"], "one micro-batch a step"),
    (["--cuda-graphs", "--compile", "--static"], "drop --static"),
    (["--cuda-graphs", "--compile", "--device", "cpu"], "needs a CUDA device"),
])
def test_cuda_graphs_refused_in_one_line(capsys, flags, says):
    from varlen.train.cli import main

    with pytest.raises(SystemExit) as e:
        main(flags + ["--steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and says in err[-1], err


def test_cuda_graphs_rows_take_few_shapes_and_keep_every_token():
    # --cuda-graphs: every row has one number of sequences and one of 8 sizes an octave (a CUDA graph
    # each), filler sequences within max_len, real tokens and labels as without it
    from varlen.data import TokenBudgetSampler
    from varlen.train.cli import make_collator, parse_args

    args = parse_args(["--compile", "--cuda-graphs", "--device", "cuda", "--max-tokens", "2048"])
    ds = SyntheticDataset(600, max_len=255, length_dist="lognormal", seed=5)
    sampler = TokenBudgetSampler(ds.lengths, 2048, seed=0)
    collate = make_collator(args, sampler, ds, 255)
    plain = TrainCollator(max_seqlen=255)
    rows, seqs = set(), set()
    for b in list(sampler)[:40]:
        samples = [ds[i] for i in b]
        got, ref = collate(samples), plain(samples)
        rows.add(got.input_ids.numel())
        seqs.add(got.info.num_seqs)
        n = ref.input_ids.numel()
        assert torch.equal(got.input_ids[:n], ref.input_ids) and torch.equal(got.labels[:n], ref.labels)
        assert (got.labels[n:] == -100).all() and got.tokens == ref.tokens
        assert max(got.info.lengths) <= 255 and got.input_ids.numel() - n < n / 8 + got.info.num_seqs
    assert len(seqs) == 1 and len(rows) <= 8 * 2, (seqs, rows)


def test_a_later_epochs_larger_row_gets_a_shape_of_its_own():
    # --cuda-graphs plans one sequence count from the first epoch's rows; on the study's long-tailed
    # data epoch 5 packs 200 samples into one row where 198 were planned, which stopped the run
    from varlen.data import TokenBudgetSampler
    from varlen.train.cli import make_collator, parse_args

    args = parse_args(["--compile", "--cuda-graphs", "--device", "cuda", "--max-tokens", "6144"])
    ds = SyntheticDataset(100_000, max_len=1023, length_dist="lognormal", seed=0)
    sampler = TokenBudgetSampler(ds.lengths, 6144, seed=0)
    collate = make_collator(args, sampler, ds, 1023)
    big = max(sampler.global_batches(5), key=len)
    assert len(big) > collate.pack.num_seqs, "the case this test is about"
    samples = [ds[i] for i in big]
    got, ref = collate(samples), TrainCollator(max_seqlen=1023)(samples)
    n = ref.input_ids.numel()
    assert got.info.num_seqs % 8 == 0 and got.info.num_seqs > len(big)
    assert torch.equal(got.input_ids[:n], ref.input_ids) and torch.equal(got.labels[:n], ref.labels)
    assert (got.labels[n:] == -100).all() and max(got.info.lengths) <= 1023
    # the planned rows keep the planned count
    assert collate([ds[i] for i in sampler.global_batches(0)[0]]).info.num_seqs == collate.pack.num_seqs


def test_static_rows_grow_past_the_planned_size_in_whole_tiles():
    # --static plans the busiest share of one epoch; a larger one later is padded to the next 128 tokens
    collate = TrainCollator(pad_to=200, max_seqlen=64)
    assert collate.pad_to == 256
    small = [(torch.arange(1, 41), torch.arange(2, 42))] * 3   # 120 tokens -> the planned 256
    large = [(torch.arange(1, 61), torch.arange(2, 62))] * 5   # 300 tokens -> 384, not an error
    assert collate(small).input_ids.numel() == 256 and collate(large).input_ids.numel() == 384
    assert collate(large).tokens == 300 and (collate(large).labels[300:] == -100).all()


def test_wrap_passes_the_compile_mode(monkeypatch):
    from varlen.parallel.distributed import Dist, wrap

    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = Decoder("tiny")
    wrap(model, "none", d, compile=True, compile_mode="reduce-overhead")
    wrap(model, "none", d, compile=True)
    wrap(model, "none", d, compile=False, compile_mode="reduce-overhead")
    assert modes == ["reduce-overhead", None]


def test_summary_counts_graphs_compiled_after_the_warmup(tmp_path, capsys):
    # a recompile is a one-off step of seconds (on the H100 a short row recompiled the study model:
    # 39 s in an 80-step run): the summary counts such graphs and gives a median that leaves them out
    from varlen.train.cli import main

    data = tmp_path / "same.jsonl"  # every step the same shape: compiled once, in the first step
    data.write_text("".join(json.dumps(list(range(1, 31))) + "\n" for _ in range(40)))
    common = ["--preset", "tiny", "--device", "cpu", "--compile", "--steps", "3", "--max-tokens", "120",
              "--data", str(data), "--no-progress"]
    for warmup, counted in ((0, lambda n: n >= 1), (1, lambda n: n == 0)):
        out = tmp_path / f"w{warmup}"
        assert main([*common, "--timing-warmup", str(warmup), "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert counted(summary["compiled_after_warmup"]), (warmup, summary["compiled_after_warmup"])
        assert summary["step_ms_median"] == pytest.approx(statistics.median(r["step_ms"] for r in _log(out)[warmup:]))
    assert main([a for a in common if a != "--compile"] + ["--out", str(tmp_path / "eager")]) == 0
    assert json.loads((tmp_path / "eager" / "summary.json").read_text())["compiled_after_warmup"] is None
