"""Models that cannot be packed exactly are refused in one line naming the layer, never trained
across samples; MLA and MoE models pass the check; the compatibility matrix classifies a fixed
sample of architectures as it did when docs/compatibility.md was generated."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

import varlen.hf  # noqa: E402  registers "varlen"
from varlen import matrix  # noqa: E402
from varlen.check import check  # noqa: E402
from varlen.check_cli import main  # noqa: E402
from varlen.hf import NotVarlen, PackingRefused  # noqa: E402


def _tiny(model_type, attn="varlen"):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(matrix.tiny_config(model_type), attn_implementation=attn)


def _packed(vocab, lengths=(3, 5, 2)):
    g = torch.Generator().manual_seed(1)
    return varlen.hf.VarlenCollator()([{"input_ids": torch.randint(4, vocab, (n,), generator=g)} for n in lengths])


# type -> what the one-line refusal must name
REFUSED = {
    "kimi_linear": "self_attn.conv1d (Conv1d, kernel 4)",  # a short convolution inside an attention layer
    "deepseek_v4": "'heavily_compressed_attention' layer",  # a stateful layer kind with no known mixer module
    "roberta": "padding index",  # learned positions offset from input_ids
    "bart": "place in the row",  # positions from the row's length
}


@pytest.mark.parametrize("model_type", REFUSED)
def test_use_refuses_a_model_that_mixes_samples_naming_the_layer(model_type):
    model = _tiny(model_type, attn="eager")
    with pytest.raises(PackingRefused) as e:
        varlen.hf.use("auto", model)
    message = str(e.value)
    assert "\n" not in message and REFUSED[model_type] in message and "cannot pack" in message


@pytest.mark.parametrize("model_type", ["qwen3_next", "roberta"])
def test_packed_rows_reaching_such_a_model_are_refused_before_any_kernel(model_type):
    """Without use(): the first packed batch that reaches varlen's attention is refused from the
    config alone; padded rows (one sample a row) still run."""
    model = _tiny(model_type).eval()
    vocab = model.config.get_text_config().vocab_size
    batch = _packed(vocab)
    with pytest.raises(PackingRefused, match="cannot pack this model exactly"):
        with torch.no_grad():
            model(**batch)
    with torch.no_grad():
        out = model(input_ids=torch.randint(4, vocab, (2, 6)), use_cache=False)
    assert torch.isfinite(out.logits).all()


def test_check_refuses_before_running(tmp_path, capsys):
    folder = tmp_path / "kimi_linear"
    matrix.tiny_config("kimi_linear").save_pretrained(folder)
    with pytest.raises(SystemExit) as e:
        main(["--hf-config", str(folder), "--random-init", "--device", "cpu", "--max-len", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("varlen check: FAILED before any check could run")
    assert "Conv1d, kernel 4" in err[0]


def test_a_model_that_never_calls_varlen_is_named_not_trained():
    """bloom takes the name but computes attention itself: the check says so rather than passing."""
    model = _tiny("bloom")
    with pytest.raises(NotVarlen, match="never runs"):
        check(model, max_len=16)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "mixtral"])
def test_mla_and_moe_models_pass_the_check(model_type):
    """deepseek_v3: q/k head 16, v head 8 (MLA); mixtral: experts, whose float64 reference runs
    the eager experts (grouped_mm takes no float64)."""
    model = _tiny(model_type).float()
    if model_type == "deepseek_v3":
        attn = model.model.layers[0].self_attn
        assert attn.qk_head_dim != attn.v_head_dim
    report = check(model, max_len=24)
    assert report.passed, report.table()


# one architecture of each kind the matrix names; a change of outcome is a regression (or, for a
# refusal that becomes exact, docs/compatibility.md to regenerate)
SAMPLE = {"llama": "exact", "gemma3": "exact", "deepseek_v3": "exact", "qwen2_moe": "exact", "gpt_oss": "exact",
          "mamba2": "exact", "qwen3_next": "exact", "kimi_linear": "refused", "xlm-roberta": "refused",
          "bloom": "not-varlen"}


def test_matrix_sample(tmp_path, capsys):
    out = tmp_path / "matrix.json"
    md = tmp_path / "matrix.md"
    code = main(["--all-architectures", *SAMPLE, "--jobs", "2", "--json", str(out), "--markdown", str(md)])
    printed = capsys.readouterr().out
    got = {o["model_type"]: o for o in json.loads(out.read_text())["outcomes"]}
    assert {t: got[t]["outcome"] for t in SAMPLE} == SAMPLE, printed
    assert code == 0
    for o in got.values():
        assert o["outcome"] == "exact" or (o["reason"] and "\n" not in o["reason"])
    text = md.read_text()
    assert "| exact | 7 |" in text and "| `kimi_linear` | refused |" in text


def test_matrix_rejects_unknown_types(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--all-architectures", "llama", "no_such_model"])
    assert e.value.code == 2 and "no_such_model" in capsys.readouterr().err
