"""The bench's pieces on the CPU. No test asserts a time."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from varlen.bench import Case, Workload, attention_flops, grid, linear_flops, step_flops
from varlen.bench.report import add_comparisons, save
from varlen.bench.runner import run_all
from varlen.models import Decoder, DecoderConfig

TINY = Workload(model="tiny", batch_size=4, max_len=31, steps=2, warmup=1, num_workers=0, device="cpu", dtype="float32")


def _count_matmul_flops(cfg: DecoderConfig, lengths, causal: bool) -> float:
    """Count by walking the model: every Linear is 2*in*out per token; attention by hand."""
    model = Decoder(cfg)
    linear = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = 0
    for n in lengths:
        pairs = n * (n + 1) / 2 if causal else n * n  # (query, key) pairs that are computed
        attn += cfg.n_layers * 2 * 2 * pairs * cfg.dim  # QK^T and PV, 2 flops per multiply-add
    return linear * sum(lengths) + attn


@pytest.mark.parametrize("train", [False, True])
def test_flops_formula_matches_hand_count(train):
    cfg = DecoderConfig.from_name("tiny")
    lengths = [4, 8, 12]
    got = step_flops(lengths, dim=cfg.dim, n_layers=cfg.n_layers, vocab_size=cfg.vocab_size, train=train,
                     causal=train)
    hand = _count_matmul_flops(cfg, lengths, causal=False)
    if not train:
        assert got == pytest.approx(hand)
    else:  # the formula halves causal attention (L^2 / 2, not L(L+1)/2) and triples for backward
        causal_hand = _count_matmul_flops(cfg, lengths, causal=True)
        assert 3 * causal_hand > got > 3 * (causal_hand - cfg.n_layers * 4 * cfg.dim * sum(lengths))


def test_flops_match_spec_numbers():
    # docs/study.md: linear 9.93 TFLOP for 16,384 tokens; eval attention ~1.10 TFLOP for 32 uniform lengths
    assert linear_flops(16384, 1024, 24, 1024) == pytest.approx(9.93e12, rel=1e-3)
    mean_sq = sum(n * n for n in range(1, 1024)) / 1023
    assert attention_flops([1] * 32, 1024, 24, causal=False) * mean_sq == pytest.approx(1.10e12, rel=1e-2)


def test_grid_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategies"):
        grid(["padded", "packed-nope"], ["eval"], [False], TINY)


def test_failing_case_is_reported_and_rest_go_on(tmp_path):
    cases = [
        Case("packed-nope", "eval", False, TINY),  # no such strategy (grid() refuses it; run_all reports it)
        Case("nested", "train", False, TINY),  # refused inside the worker process on a CPU
        Case("packed-sdpa", "eval", False, TINY),
    ]
    results = run_all(cases, timeout_s=300, workdir=tmp_path)
    assert "unknown strategy 'packed-nope'" in results[0].error
    assert "causal nested SDPA needs CUDA" in results[1].error
    assert results[2].error is None and results[2].steps == 2 and results[2].step_ms_mean > 0


def test_case_timeout_is_a_result(tmp_path):
    slow = Case("padded", "eval", False, Workload(**{**TINY.__dict__, "steps": 10_000}))
    (result,) = run_all([slow], timeout_s=3, workdir=tmp_path)
    assert result.error == "timed out after 3 s"


def test_bench_end_to_end_writes_results(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "varlen.bench", "--preset", "tiny", "--strategies", "padded,packed-sdpa",
           "--compile", "off", "--steps", "2", "--warmup", "1", "--batch-size", "4", "--max-len", "31",
           "--num-workers", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {"out": str(out), "cases": 4, "failed": 0, "not_applicable": 0, "fastest": summary["fastest"],
                       "unsteady": summary["unsteady"]}  # 2 CPU steps a case: which is steady is chance
    assert all(len(c["step_ms"]) == 2 for c in json.loads((out / "results.json").read_text())["cases"])
    report = json.loads((out / "results.json").read_text())
    assert {"gpu", "torch", "cuda", "date"} <= report["env"].keys()
    assert len(report["cases"]) == 4
    keys = {"strategy", "backend", "mode", "compile", "step_ms_mean", "step_ms_median", "tokens_per_s", "tflops",
            "peak_mem_gib", "recompiles", "loss", "error", "speedup", "padding_frac"}
    for c in report["cases"]:
        assert keys <= c.keys() and c["error"] is None and c["step_ms_mean"] > 0
    by = {(c["strategy"], c["mode"]): c for c in report["cases"]}
    for mode in ("eval", "train"):  # same seed, same samples: the strategies agree on the loss
        assert by[("packed-sdpa", mode)]["loss"] == pytest.approx(by[("padded", mode)]["loss"], abs=1e-4)
        assert by[("padded", mode)]["padding_frac"] > 0.3 and by[("packed-sdpa", mode)]["padding_frac"] == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and rows[0]["strategy"] == "padded"
    png = (out / "step_times.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| padded | eval |" in (out / "results.md").read_text()


def test_speedup_against_padded_of_same_mode():
    cases = [
        {"strategy": "padded", "mode": "eval", "compile": False, "step_ms_mean": 10.0, "loss": 7.0, "error": None},
        {"strategy": "packed-flash", "mode": "eval", "compile": False, "step_ms_mean": 4.0, "loss": 7.001, "error": None},
        {"strategy": "packed-flex", "mode": "train", "compile": False, "step_ms_mean": 4.0, "loss": 7.0, "error": None},
    ]
    add_comparisons(cases)
    assert cases[1]["speedup"] == pytest.approx(2.5) and cases[1]["loss_delta"] == pytest.approx(0.001)
    assert cases[2]["speedup"] is None  # no padded train baseline in this run


def test_merge_combines_split_runs(tmp_path):
    from varlen.bench.cli import main

    def part(name, cases, peak):
        d = tmp_path / name
        save({"env": {"gpu": "G", "torch": "t", "cuda": "c", "python": "p", "date": name}, "workload": {},
              "matmul_peak_tflops": peak, "cases": cases}, d)
        return d

    base = {"backend": "sdpa", "error": None, "tflops": 1.0, "loss": 7.0}
    a = part("a", [{**base, "strategy": "padded", "mode": "eval", "compile": False, "step_ms_mean": 10.0}], 100.0)
    b = part("b", [{**base, "strategy": "packed-flex", "mode": "eval", "compile": False, "step_ms_mean": 5.0}], 110.0)
    assert main(["--merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["matmul_peak_tflops"] == 110.0
    assert [c["speedup"] for c in merged["cases"]] == [1.0, 2.0]


def test_hf_gpt2_study_part_runs_and_agrees(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "varlen.bench", "--model", "hf-gpt2", "--preset", "tiny",
           "--strategies", "hf-padded,hf-packed-sdpa,hf-varlen-sdpa", "--compile", "off", "--steps", "2",
           "--warmup", "1", "--batch-size", "4", "--max-len", "31", "--num-workers", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cases = json.loads((out / "results.json").read_text())["cases"]
    assert len(cases) == 6 and all(c["error"] is None for c in cases)
    by = {(c["strategy"], c["mode"]): c for c in cases}
    for mode in ("eval", "train"):
        base = by[("hf-padded", mode)]
        assert base["speedup"] == 1.0  # HF strategies are measured against HF padding
        for s in ("hf-packed-sdpa", "hf-varlen-sdpa"):
            assert by[(s, mode)]["loss"] == pytest.approx(base["loss"], abs=1e-4)
            assert by[(s, mode)]["speedup"] is not None


def test_model_family_is_checked(capsys):
    from varlen.bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "hf-gpt2", "--strategies", "packed-sdpa", "--preset", "tiny"])
    assert e.value.code == 2 and "runs hf-padded" in capsys.readouterr().err


def test_profile_breakdown_and_floors(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "varlen.bench", "--preset", "tiny", "--strategies", "packed-sdpa", "--modes", "train",
           "--compile", "off", "--steps", "2", "--warmup", "1", "--batch-size", "4", "--max-len", "31",
           "--num-workers", "0", "--profile", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (case,) = json.loads((out / "results.json").read_text())["cases"]
    p = case["profile"]
    assert set(p["ms"]) == {"attention", "gemm", "elementwise/norm", "optimizer", "host/data gap"}
    assert p["ms"]["gemm"] > 0 and p["ms"]["attention"] > 0 and p["ms"]["optimizer"] > 0
    assert sum(p["ms"].values()) >= p["step_ms"] * 0.999  # the gap is what the parts leave of the step
    # the top kernels are the parts' ingredients: ordered, each no more than its part's total
    assert p["top"] and [k["ms"] for k in p["top"]] == sorted((k["ms"] for k in p["top"]), reverse=True)
    assert all(k["ms"] <= p["ms"][k["part"]] + 1e-9 for k in p["top"])
    assert any(k["part"] == "gemm" for k in p["top"])
    assert case["gemm_floor_ms"] > 0 and case["x_gemm_floor"] == pytest.approx(case["step_ms_mean"] / case["gemm_floor_ms"])
    # a CPU's matmul rate is not measured: no MFU or FLOP floor is claimed there (it read 108%)
    assert case["mfu"] is None and case["x_flops_floor"] is None
    assert "matmul peak: not measured on this device" in (out / "results.md").read_text()
    assert "Where the time goes" in (out / "results.md").read_text()
    assert "Top kernels of packed-sdpa/train/eager" in (out / "results.md").read_text()
    assert list(csv.DictReader((out / "results.csv").open()))[0].keys() == set(report_columns())


def report_columns():
    from varlen.bench.report import COLUMNS

    return COLUMNS


@pytest.mark.parametrize("name, part", [
    ("void flash::flash_fwd_kernel<...>", "attention"), ("sm90_xmma_gemm_bf16bf16_bf16f32", "gemm"),
    ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN", "gemm"), ("aten::addmm", "gemm"),
    ("triton_tem_fused_flex_attention_0", "attention"), ("void at::native::multi_tensor_apply_kernel<SGD>", "optimizer"),
    ("triton_poi_fused_add_native_layer_norm_3", "elementwise/norm"), ("aten::_fused_sgd_", "optimizer"),
])
def test_profile_classifies_kernel_names(name, part):
    from varlen.measure.profile import classify

    assert classify(name) == part


def test_token_budget_batches_for_length_scaling(tmp_path):
    from varlen.bench.cases import Workload
    from varlen.bench.worker import sample_batches
    from varlen.data import sample_lengths

    w = Workload(model="tiny", max_len=100, tokens_per_batch=512, device="cpu", seed=3)
    batches = sample_batches(w, 6)
    lengths = sample_lengths(max(i for b in batches for i in b) + 1, w.length_dist, w.max_len, w.seed)
    assert all(256 <= sum(lengths[i] for i in b) <= 512 for b in batches)
    assert len({i for b in batches for i in b}) == sum(len(b) for b in batches)

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "varlen.bench", "--preset", "tiny", "--strategies", "padded,packed-sdpa", "--modes",
           "eval", "--compile", "off", "--steps", "2", "--warmup", "1", "--max-len", "100", "--tokens-per-batch", "512",
           "--num-workers", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    assert report["workload"]["tokens_per_batch"] == 512
    padded, packed = sorted(report["cases"], key=lambda c: c["strategy"] != "padded")
    assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-4)  # the same samples either way


def test_failure_reason_of_an_aborted_worker():
    # a C++ exception aborts the worker (signal 6): the reason is its what() line, not a stack frame
    from varlen.bench.runner import _reason

    stderr = ("terminate called after throwing an instance of 'c10::Error'\n"
              "  what():  CUDA error: an illegal memory access was encountered\n"
              "Exception raised from c10_cuda_check_implementation at /pytorch/c10/cuda/CUDAException.cpp:44\n"
              "frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x9d (0x7f in libc10.so)\n")
    assert _reason(stderr, -6) == "killed by signal 6 (CUDA error: an illegal memory access was encountered)"
    assert _reason("Traceback\n  File x\ntorch.OutOfMemoryError: CUDA out of memory.\n", 1) == \
        "torch.OutOfMemoryError: CUDA out of memory."


@pytest.mark.parametrize("dist", ["uniform", "lognormal"])
def test_cuda_graph_batches_have_one_shape(dist):
    # --cuda-graphs: every batch of a run packs to the same token count and sequence count
    from varlen.bench.cases import Workload
    from varlen.bench.worker import sample_batches, static_shape
    from varlen.data import PackCollator, SyntheticDataset

    w = Workload(model="tiny", max_len=100, tokens_per_batch=512, length_dist=dist, device="cpu", seed=5)
    batches = sample_batches(w, 12)
    ds = SyntheticDataset(1 + max(i for b in batches for i in b), max_len=w.max_len, length_dist=dist, seed=w.seed)
    collate = PackCollator(max_seqlen=w.max_len, **static_shape(w, batches))
    shapes = set()
    for b in batches:
        out = collate([ds[i] for i in b])
        shapes.add((tuple(out.input_ids.shape), tuple(out.info.cu_seqlens.shape)))
        assert int((out.labels != -100).sum()) == sum(ds.lengths[i] for i in b)
    assert len(shapes) == 1


@pytest.mark.parametrize("dist", ["uniform", "lognormal"])
def test_cuda_graph_buckets_of_sample_batches(dist):
    # --cuda-graphs on batches of samples: one number of sequences, a few row sizes (each under 1/8
    # filler), every sample's tokens kept, and a warm-up that meets every size twice before timing
    from varlen.bench.cases import Workload
    from varlen.bench.worker import cover_shapes, graph_buckets, sample_batches
    from varlen.data import PackCollator, SyntheticDataset

    w = Workload(model="tiny", batch_size=16, max_len=100, length_dist=dist, device="cpu", seed=7)
    batches = sample_batches(w, 60)
    ds = SyntheticDataset(1 + max(i for b in batches for i in b), max_len=w.max_len, length_dist=dist, seed=w.seed)
    collate = PackCollator(max_seqlen=w.max_len, **graph_buckets(w))
    shapes = set()
    for b in batches:
        out = collate([ds[i] for i in b])
        real = sum(ds.lengths[i] for i in b)
        assert int((out.labels != -100).sum()) == real and out.input_ids.numel() - real < (real + 3) / 8 + 3
        assert out.input_ids.numel() == collate.row_tokens([ds.lengths[i] for i in b])
        shapes.add((out.input_ids.numel(), tuple(out.info.cu_seqlens.shape)))
    assert len({s[1] for s in shapes}) == 1 and len(shapes) <= 24
    row = lambda b: collate.row_tokens([ds.lengths[i] for i in b])  # noqa: E731
    warm = cover_shapes(batches[:2], batches[2:], row)
    assert warm[:2] == batches[:2]
    assert sorted(row(b) for b in warm[2:]) == sorted(2 * sorted({row(b) for b in batches[2:]}))


def test_cuda_graphs_refused_where_they_cannot_run(tmp_path):
    from varlen.bench.cases import Case, Workload
    from varlen.bench.worker import cuda_graphed

    base = [sys.executable, "-m", "varlen.bench", "--preset", "tiny", "--cuda-graphs", "--num-workers", "0"]
    w = Workload(model="tiny", max_len=100, tokens_per_batch=512, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        cuda_graphed(Case("packed-sdpa", "train", True, w))
    with pytest.raises(ValueError, match="packed strategies only"):
        cuda_graphed(Case("padded", "train", True, w))
    assert not cuda_graphed(Case("padded", "train", False, w))  # eager cases are not graphed
    out = tmp_path / "out"
    proc = subprocess.run(base + ["--strategies", "packed-sdpa", "--modes", "eval", "--compile", "on", "--steps", "1",
                                  "--warmup", "1", "--max-len", "100", "--tokens-per-batch", "512", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (case,) = json.loads((out / "results.json").read_text())["cases"]
    assert "needs a CUDA device" in case["error"]


def test_exposed_time_is_what_other_kernels_do_not_cover():
    from varlen.measure.profile import _length, _overlap, _union

    comm = _union([(5, 8), (0, 2), (1, 3), (10, 12)])  # [0,3] [5,8] [10,12]
    assert comm == [(0, 3), (5, 8), (10, 12)]
    compute = _union([(2, 6), (7, 11)])
    # covered: [2,3] + [5,6] + [7,8] + [10,11] = 4 of 8
    assert _length(comm) == 8 and _overlap(comm, compute) == 4 and _overlap(compute, comm) == 4
    assert _overlap(comm, []) == 0 and _overlap(comm, comm) == _length(comm)


def test_failure_reason_is_the_exception_not_compiler_output():
    # a C++ compile error prints compiler notes after the exception line; one mentions Exception.h
    from varlen.bench.runner import _reason

    stderr = ("Traceback (most recent call last):\n  File \"w.py\", line 3, in <module>\n"
              "torch._inductor.exc.InductorError: CppCompileError: C++ compile error\n"
              "/usr/include/c10/util/Exception.h:600:7: note: in expansion of macro 'C10_UNLIKELY'\n")
    assert _reason(stderr, 1) == "torch._inductor.exc.InductorError: CppCompileError: C++ compile error"


def test_cases_a_cpu_cannot_run_are_not_applicable():
    from varlen.bench.cases import Case, Workload
    from varlen.bench.runner import precheck

    w = Workload(model="tiny", device="cpu")
    assert "no backward on CPU" in precheck(Case("packed-flex", "train", False, w))
    assert "does not build on the CPU" in precheck(Case("packed-flex", "eval", True, w))
    assert "causal nested SDPA needs CUDA" in precheck(Case("nested", "train", False, w))
    assert "no CUDA device" in precheck(Case("packed-flash", "eval", False, w))
    for ok in (Case("packed-flex", "eval", False, w), Case("nested", "eval", True, w), Case("padded", "train", True, w)):
        assert precheck(ok) is None, ok


def test_strategies_are_objects_chosen_once_by_name():
    from varlen.bench.cases import STRATEGIES, Case, strategies_of, strategy

    assert strategy("packed-flash:fa4").backend == "flash:fa4" and strategy("packed-flash").backend == "flash"
    assert strategy("hf-varlen-flash:torch").backend == "flash:torch" and strategy("hf-varlen-flash:torch").packed
    assert Case("packed-flash:torch", "eval", False).backend == "flash:torch"
    for bad in ("padded:fa4", "packed-sdpa:torch", "packed-flash:nope", "packed-nope"):
        with pytest.raises(ValueError, match="unknown strategy"):
            strategy(bad)
    decoder, hf = strategies_of("decoder"), strategies_of("hf-gpt2")
    assert decoder[0] == "padded" and hf[0] == "hf-padded" and set(decoder) | set(hf) == set(STRATEGIES)
    assert {strategy(s).baseline for s in decoder} == {"padded"} and {strategy(s).baseline for s in hf} == {"hf-padded"}
    # HF causal LMs are causal in eval too; the study's decoder only when it trains
    assert all(strategy(s).causal_lm for s in hf) and not any(strategy(s).causal_lm for s in decoder)
    assert [s for s in decoder if strategy(s).packed] == ["packed-flash", "packed-xformers", "packed-flex", "packed-sdpa",
                                                          "packed-te"]


def test_gpu_smoke_runs_every_strategy():
    # benchmarks/run_gpu.sh smoke names its decoder strategies (packed-flash by implementation) and
    # runs the HF bench whole: a strategy added without the smoke would land untested on the GPU
    import re
    from pathlib import Path

    from varlen.bench.cases import strategies_of

    script = (Path(__file__).parent.parent / "benchmarks" / "run_gpu.sh").read_text()
    smoke = script[script.index("  smoke)"):script.index(";;", script.index("  smoke)"))]
    decoder_run = re.search(r"--strategies (\S+) \\\n", smoke)
    listed = {s.split(":")[0].removesuffix("$fa4") for s in decoder_run.group(1).split(",")}
    # packed-xformers where xFormers loads ($xf: its wheels are carried to some machines only)
    assert "$fa4$xf," in decoder_run.group(1) and "',packed-xformers'" in script
    listed.add("packed-xformers")
    # the TE peer runs eager in a run of its own where it is installed ($te)
    assert re.search(r"--compile off --strict --strategies \$te ", smoke) and "'packed-te'" in script
    assert listed | {"packed-te"} == set(strategies_of("decoder")), listed ^ set(strategies_of("decoder"))
    hf_run = next(line for line in smoke.splitlines() if "--model hf-gpt2" in line)
    assert "--strategies" not in hf_run  # every HF strategy, the default
    assert "--compile both" in hf_run and smoke.count("--compile both") == 3
    # quack's fused MLP, eager and compiled, where quack-kernels is installed ($quack)
    assert re.search(r'if \[ -n "\$quack" \]; then', smoke) and "--gelu tanh" in smoke and "--mlp-kernel quack" in smoke


def test_unsteady_cases_are_named_with_their_slow_steps():
    from varlen.bench.report import unsteady

    steady = {"strategy": "padded", "mode": "eval", "compile": False, "error": None, "step_ms": [10, 11, 10, 10],
              "step_ms_mean": 10.25, "step_ms_median": 10.0}
    # the packed SDPA eager pattern: a few batches 2.4x slower than the rest
    uneven = {"strategy": "packed-sdpa", "mode": "eval", "compile": False, "error": None,
              "step_ms": [53, 127, 120, 66, 129, 61, 52, 57], "step_ms_mean": 83.1, "step_ms_median": 63.5}
    failed = {"strategy": "nested", "mode": "eval", "compile": False, "error": "boom"}
    assert unsteady([steady, uneven, failed]) == {"packed-sdpa/eval/eager": [4, 1, 2]}
    assert unsteady([steady], bound=1.01) == {"padded/eval/eager": []}  # over the bound, no outlier step


def test_autotune_reaches_torch_compile_and_needs_compiling(monkeypatch, capsys):
    # --autotune is issue 18's epilogue lever: Inductor's max-autotune, with CUDA graphs its graphing
    # variant; eager cases stay eager, and --compile off with it is refused in one line
    from varlen.bench.cli import main
    from varlen.bench.worker import _engine
    from varlen.models import family

    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    w = Workload(**{**TINY.__dict__, "autotune": True})
    model = Decoder(DecoderConfig.from_name("tiny"))
    for graphed in (False, True):
        _engine(Case("packed-sdpa", "eval", True, w), model, family("decoder"), graphed)
    _engine(Case("packed-sdpa", "eval", False, w), model, family("decoder"), False)
    _engine(Case("packed-sdpa", "eval", True, TINY), model, family("decoder"), False)
    assert modes == ["max-autotune-no-cudagraphs", "max-autotune", None]
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--autotune", "--compile", "off"])
    assert "--compile off compiles nothing" in capsys.readouterr().err


def _table_report():
    """A CPU-like report: runs, one failure with a long error, and cases n/a here for two reasons."""
    from varlen.bench.report import add_mfu

    def case(strategy, mode, compiled, ms=None, error=None, applicable=True):
        return {"strategy": strategy, "mode": mode, "compile": compiled, "step_ms_mean": ms, "step_ms_median": ms,
                "tokens_per_s": ms and 1e6 / ms, "tflops": ms and 1.0 / ms, "peak_mem_gib": None,
                "loss": ms and 7.0123, "recompiles": 0, "kernel": "sdpa", "padding_frac": 0.4,
                "error": error, "applicable": applicable}

    no_fa = "flash backend: FlashAttention varlen needs a CUDA device and bfloat16/float16 (this run: cpu, float32)"
    cases = []
    for mode in ("eval", "train"):
        for compiled in (False, True):
            cases += [case("padded", mode, compiled, 100.0), case("packed-sdpa", mode, compiled, 60.0),
                      case("hf-padded", mode, compiled, 1000.0), case("hf-varlen-flash:torch", mode, compiled, 1234.5),
                      case("hf-varlen-flash:fa4", mode, compiled, error=no_fa, applicable=False),
                      case("packed-xformers", mode, compiled, error="xformers not installed", applicable=False)]
    cases.append(case("packed-flex", "train", True, error="RuntimeError: " + "a long compile failure " * 8))
    add_comparisons(cases)
    add_mfu(cases, None)
    return {"env": {"gpu": None, "driver": None, "torch": "2.13.0+cpu", "cuda": None, "python": "3.11.7",
                    "date": "2026-12-06 08:00 UTC"}, "workload": {}, "matmul_peak_tflops": None, "cases": cases}


def test_bench_table_fits_100_columns_and_wide_shows_every_column():
    from rich.console import Console

    from varlen.bench.report import HEADER, print_table

    report = _table_report()
    narrow = Console(record=True, width=240)
    print_table(report, narrow)
    lines = narrow.export_text().splitlines()
    table = [line for line in lines if not line.startswith(("n/a here", "failed: "))]
    assert max(len(line.rstrip()) for line in table[:-1]) <= 100, "\n".join(table)
    na = [line for line in lines if line.startswith("n/a here")]  # one line per reason, not a row per case
    assert sorted(na) == ["n/a here: hf-varlen-flash:fa4 (4 cases): " + report["cases"][4]["error"],
                          "n/a here: packed-xformers (4 cases): xformers not installed"]
    assert not any("hf-varlen-flash:fa4/" in line for line in table)
    flex = next(line for line in table if "packed-flex/train/compiled" in line)
    assert "RuntimeError:…" in flex and "0.60" not in flex
    assert "failed: packed-flex/train/compiled: " + report["cases"][-1]["error"] in lines
    assert any("packed-sdpa/train/compiled" in line and "1.67" in line for line in table)  # speed-up vs padded

    wide = Console(record=True, width=400)
    print_table(report, wide, wide=True)
    text = wide.export_text()
    assert all(h in text for h in HEADER)
    assert "hf-varlen-flash:fa4" in text and "not installed" in text


def test_bench_table_without_rich_is_plain_text(monkeypatch, capsys):
    import builtins

    from varlen.bench.report import print_table

    real = builtins.__import__

    def no_rich(name, *a, **kw):
        if name == "rich" or name.startswith("rich."):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_rich)
    print_table(_table_report())
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("case | ms | ×pad")
    assert sum(line.startswith("n/a here") for line in out) == 2


@pytest.mark.parametrize("preset", ["smoke", "small", "study"])
def test_a_gpu_preset_on_a_machine_without_cuda_is_one_line_before_any_case(preset, capsys, monkeypatch):
    from varlen.bench.cli import parse_args, workload_from

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        workload_from(parse_args(["--preset", preset]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--preset {preset} runs on CUDA and there is no CUDA device here" in err, err
    _, w = workload_from(parse_args(["--preset", preset, "--device", "cpu"]))
    assert w.device == "cpu"


def test_flags_that_cannot_go_together_are_one_line_before_any_case(capsys):
    from varlen.bench.cli import parse_args

    for argv, said in ((["--modes", "eval,tune"], "--modes eval,tune: a comma list of eval and train"),
                       (["--autotune", "--compile", "off"], "--compile off compiles nothing"),
                       (["--model", "hf-gpt2", "--strategies", "packed-flex"], "not packed-flex")):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and len([x for x in err.splitlines() if "error" in x]) == 1, err
    opts = parse_args(["--max-tokens", "4096", "--fp8", "rowwise"])  # typed: the levers are their group
    assert opts.tokens_per_batch == 4096 and opts.levers.fp8 == "rowwise"
