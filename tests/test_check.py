"""varlen check: passes on varlen's attention for the decoder and stock HF models, reports the
leak of transformers' own sdpa with packed rows."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from varlen.check import check  # noqa: E402
from varlen.check_cli import main  # noqa: E402

SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=97, max_position_embeddings=256)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**{**SMALL, "num_key_value_heads": 1}),
    # q/k RMSNorm per head
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16),
    # a sliding window shorter than the samples (up to 40 tokens)
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=8),
    # logit soft-capping (small enough to bite on random weights) and windows on every other layer
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=8, attn_logit_softcapping=0.5),
    # five local (windowed, own rope) layers to one global by default; two layers: both local
    "gemma3": lambda: transformers.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=8),
}


def _config_dir(tmp_path, name):
    folder = tmp_path / name
    CONFIGS[name]().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", CONFIGS)
def test_check_passes_on_varlen(tmp_path, name, capsys):
    out = tmp_path / "report.json"
    code = main(["--hf-config", str(_config_dir(tmp_path, name)), "--random-init", "--device", "cpu",
                 "--max-len", "40", "--json", str(out)])
    table = capsys.readouterr().out
    assert code == 0, table
    report = json.loads(out.read_text())
    assert report["passed"] and report["attention"] == "varlen" and max(report["lengths"]) == 40
    assert min(report["lengths"]) == 1
    checks = {f["check"] for f in report["findings"]}
    assert any(c.startswith("gradients vs alone") for c in checks) and any(c.startswith("leakage") for c in checks)
    assert any("use_cache" in c for c in checks) and any("DataCollatorWithFlattening + flash" in c for c in checks)


def test_check_reports_the_leak_of_sdpa_with_packed_rows(tmp_path, capsys):
    code = main(["--hf-config", str(_config_dir(tmp_path, "llama")), "--random-init", "--attn-implementation", "sdpa",
                 "--device", "cpu", "--max-len", "40"])
    table = capsys.readouterr().out
    assert code == 1
    failed = [line for line in table.splitlines() if line.rstrip().endswith("FAILED")]
    assert any(line.startswith("leakage: other samples' logits") for line in failed), table
    assert any(line.startswith("logits vs alone: [B, L] packed rows, all-ones attention_mask") for line in failed)
    assert any(line.startswith("logits vs alone: VarlenCollator, use_cache") for line in failed)  # the KV-cache leak


def test_check_on_the_decoder_compiled(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--preset", "tiny", "--device", "cpu", "--max-len", "40", "--compile", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    graphs = [f for f in report["findings"] if f["check"].startswith("compiled: graphs")]
    assert graphs and graphs[0]["passed"] and 1 <= graphs[0]["error"] <= 3


def test_check_on_the_decoder_at_its_longest(tmp_path, capsys):
    # --max-len above the model's positions is capped to them; the packed-rows form's filler once
    # took positions past them (an index error on the CPU, a device assert on the H100)
    out = tmp_path / "r.json"
    assert main(["--preset", "tiny", "--device", "cpu", "--max-len", "100000", "--json", str(out)]) == 0
    assert max(json.loads(out.read_text())["lengths"]) == 255


def test_check_names_a_feature_the_kernel_refuses(tmp_path, capsys):
    # Gemma 2's soft-capping on SDPA: refused before any check, in one line, exit 1
    code = main(["--hf-config", str(_config_dir(tmp_path, "gemma2")), "--random-init", "--device", "cpu",
                 "--backend", "sdpa", "--max-len", "24"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "FAILED before any check" in err[0] and "soft-capping" in err[0]


def test_check_fails_where_a_feature_is_dropped(monkeypatch):
    # the check can fail: an attention that ignores Gemma 2's soft-capping is caught against eager
    import varlen.hf

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["gemma2"](), attn_implementation="varlen")
    forward = varlen.hf.varlen_attention_forward
    monkeypatch.setattr(varlen.hf, "varlen_attention_forward",
                        lambda *a, softcap=None, **kw: forward(*a, **kw))  # drops softcap
    varlen.hf.register()
    try:
        report = check(model, max_len=24)
    finally:
        monkeypatch.undo()
        varlen.hf.register()
    assert not report.passed
    assert any(f.check.startswith("logits vs alone: VarlenCollator") and not f.passed for f in report.findings)


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--hf-config", str(tmp_path / "missing"), "--random-init"])
    assert e.value.code == 2 and "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--hf-config", str(_config_dir(tmp_path, "llama"))])  # a config, no weights
    assert e.value.code == 2 and "pass --random-init" in capsys.readouterr().err


@pytest.mark.parametrize("flags,says", [
    ([], "say what to check: one of --all-architectures, --hf-config, --preset"),
    (["--preset", "tiny", "--hf-config", "x"], "(not --hf-config and --preset)"),
    (["--preset", "tiny", "--jobs", "4"], "--jobs is for --all-architectures"),
    (["--preset", "tiny", "--markdown", "m.md"], "--markdown is for --all-architectures"),
    (["--preset", "tiny", "--timeout", "5"], "--case-timeout is for --all-architectures"),
    (["--preset", "tiny", "--random-init"], "--random-init is for --hf-config"),
    (["--all-architectures", "llama", "--device", "cpu", "--backend", "flex"], "--backend would be ignored"),
    (["--all-architectures", "--compile"], "--compile would be ignored"),
    (["--preset", "tiny", "--backend", "nope"], "unknown attention backend 'nope'"),
    (["--preset", "tiny", "--device", "gpu"], "--device"),
])
def test_flags_that_cannot_go_together_or_would_be_ignored(flags, says, capsys):
    # one line (argparse's, exit 2) before any model is built: a flag never silently does nothing
    with pytest.raises(SystemExit) as e:
        main(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and says in err[-1], err


def test_check_options_spell_settings_as_train_does():
    # one definition of --backend and --device for every command: same help, same type
    from varlen.check import CheckOptions
    from varlen.train.config import ModelOptions
    from dataclasses import fields

    check_f, train_f = ({f.name: f for f in fields(g)} for g in (CheckOptions, ModelOptions))
    for name in ("backend", "device"):
        assert check_f[name].metadata["type"] is train_f[name].metadata["type"]
        assert check_f[name].default == train_f[name].default
    assert check_f["backend"].metadata["help"].endswith(train_f["backend"].metadata["help"].split(": ", 1)[1])


def test_check_catches_a_loss_normalised_per_micro_batch(monkeypatch):
    # each micro-batch's mean summed (num_items_in_batch dropped): the accumulation check fails
    import varlen.check as vc

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="varlen")
    packed_loss = vc._packed_loss
    monkeypatch.setattr(vc, "_packed_loss", lambda subject, model, batch, **kw: packed_loss(subject, model, batch))
    report = check(model, max_len=24)
    failed = [f.check for f in report.findings if not f.passed]
    assert failed and all(c.startswith("loss over 2 micro-batches") for c in failed), failed
