"""Every causal LM that the installed transformers registers, packed through
``attn_implementation="varlen"`` and checked: the compatibility matrix.

``tiny_config(model_type)`` shrinks the architecture's default configuration to a few layers of
width 64 (every size field it has, under any of the names transformers' configs use, and the
layer-type lists cut so that each kind of layer still occurs); :func:`classify` builds it with
random weights and runs :func:`varlen.check.check` on it, and names the outcome:

- ``exact``: every check passes;
- ``refused``: varlen refused it before running, in one line naming the feature;
- ``not-varlen``: transformers does not let it take ``attn_implementation`` (named);
- ``wrong``: accepted, and some check failed (samples leak into each other) -- must not happen;
- ``crash``: an error that is neither (a bug to fix);
- ``not-buildable``: no tiny configuration of it could be built here (a missing package).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass

import torch

WIDTH, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 4, 2, 16, 256

# field -> tiny value, under every name transformers' configs use for it
TINY = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers"), 2),
    **dict.fromkeys(("encoder_layers", "num_encoder_layers"), 1),
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embed_dim", "dim", "hidden_dim", "model_dim", "d_embed",
                     "word_embed_proj_dim", "attention_hidden_size", "embedding_size"), WIDTH),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
                     "encoder_attention_heads", "swa_num_attention_heads", "num_attention_heads_per_layer"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "swa_num_key_value_heads",
                     "n_kv_heads", "num_key_value_groups"), KV_HEADS),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "d_ff",
                     "ffn_hidden_size", "inner_hidden_size", "feed_forward_size", "ffn_inner_hidden_size"), 128),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
                     "expert_intermediate_size", "moe_ffn_hidden_size"), 32),
    **dict.fromkeys(("head_dim", "swa_head_dim", "kv_channels", "attention_head_dim", "d_head", "d_kv",
                     "qk_head_dim", "index_head_dim", "linear_head_dim"), HEAD_DIM),
    **dict.fromkeys(("vocab_size",), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length",
                     "model_max_length", "max_seq_len"), 512),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                     "n_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "moe_k", "topk"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group", "first_k_dense_replace", "num_dense_layers",
                     "num_nextn_predict_layers"), 1),
    # MLA: q/k head 8 + 8, v head 8 (unlike q/k's, as in DeepSeek)
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "index_n_heads": 2, "index_topk": 16,
    # linear attention and state-space layers
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_num_heads": 4, "linear_conv_kernel_dim": 4,
    "mamba_d_state": 16, "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_n_groups": 1, "mamba_expand": 2,
    "mamba_d_conv": 4, "mamba_chunk_size": 16, "state_size": 16, "ssm_state_size": 16, "time_step_rank": 8,
    "n_groups": 1, "chunk_size": 16, "conv_L_cache": 3,
    "sliding_window": 16, "sliding_window_size": 16, "attention_window_size": 16, "rotary_dim": 8,
    "num_kv_shared_layers": 0, "block_size": 16, "num_random_blocks": 1,
}
FILL_NONE = ("head_dim", "num_key_value_heads", "n_routed_experts", "num_experts", "moe_intermediate_size",
             "num_experts_per_tok", "intermediate_size", "n_shared_experts")
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "sep_token_id": 3, "decoder_start_token_id": 1}
# What a generic shrink gets wrong for one architecture (its config's own consistency rules)
OVERRIDES = {
    "falcon_h1": {"mamba_d_ssm": 128},
    "mamba2": {"head_dim": 32},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "attention_layers": ["global", "local"]},
    "zaya": {"num_experts_per_tok": 1},
    "kolibri1_1": {"index_num_heads": 1},
    "dots3_note_text": {"num_key_value_heads": HEADS},
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # hybrids whose default puts no attention layer among the first few (transformers' cache then fails
    # on a model of mamba layers alone): one of each kind
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    # Gemma 3n's activation sparsity cuts the MLP at a per-token Gaussian quantile (a ReLU kink) that
    # packed and alone cross differently at float32 rounding: gradients then differ by more than any
    # rounding tolerance without a sample mixing (the leakage check sees none); the matrix checks packing
    "gemma3n_text": {"activation_sparsity_pattern": [0.0, 0.0]},
    "reformer": {"is_decoder": True, "axial_pos_shape": [16, 32], "axial_pos_embds_dim": [32, 32],
                 "attn_layers": ["local", "lsh"], "local_attn_chunk_length": 16, "lsh_attn_chunk_length": 16},
}
LAYER_LISTS = ("layer_types", "layers_block_type", "block_types", "hybrid_override_pattern", "layers_type")


def _shrink_layer_list(value, layers: int):
    """A per-layer list cut to ``layers`` entries that still holds each kind of layer once (the
    kinds first, in their order of appearance); a pattern string likewise."""
    if isinstance(value, str):
        kinds = list(dict.fromkeys(value))
        return "".join((kinds * layers)[:max(layers, len(kinds))])
    kinds = list(dict.fromkeys(value))
    return (kinds * layers)[:max(layers, len(kinds))]


def tiny_kwargs(default: dict) -> dict:
    """What to pass to a config class to shrink its ``default`` (``to_dict()``) form."""
    kw = {k: v for k, v in TINY.items() if k in default and isinstance(default[k], int) and not isinstance(default[k], bool)}
    # sizes a default leaves None for a real checkpoint to set, which the model then needs
    kw.update({k: TINY[k] for k in FILL_NONE if k in default and default[k] is None})
    if "kv_lora_rank" in kw:  # MLA: a key per query head; head_dim names the rotary part
        kw.update({k: HEADS for k in ("num_key_value_heads",) if k in default})
        kw.update({k: kw["qk_rope_head_dim"] for k in ("head_dim",) if k in kw and "qk_rope_head_dim" in kw})
    kw.update({k: v for k, v in TOKEN_IDS.items() if k in default and default[k] is not None})
    layers = kw.get("num_hidden_layers", 2)
    for name in LAYER_LISTS:
        if isinstance(default.get(name), (list, str)) and default[name]:
            kw[name] = _shrink_layer_list(default[name], layers)
            layers = max(layers, len(kw[name]))
            for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
                if k in kw:
                    kw[k] = layers
    deep = next((default[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in default), None)
    for name, value in default.items():  # per-layer values: layer indices, sizes a layer, configs a layer
        if name in kw:
            continue
        if isinstance(value, list) and len(value) == deep and deep not in (None, layers):
            kw[name] = (value * layers)[:layers]  # one value a layer (e.g. a sparsity pattern)
        elif isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            if name in TINY:  # a size per layer
                kw[name] = [TINY[name]] * layers
            elif name.endswith(("layers", "indices", "idxs", "_layer_ids")):
                kw[name] = [i for i in value if i < layers] or [0]
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            kw[name] = {k: v for k, v in value.items() if int(k) < layers}
    for k, v in default.items():  # sub-configurations (text_config, ...): shrunk alike
        if isinstance(v, dict) and "model_type" in v:
            kw[k] = {**v, **tiny_kwargs(v)}
    return kw


def tiny_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    return cls(**{**tiny_kwargs(cls().to_dict()), **OVERRIDES.get(model_type, {})})


@dataclass
class Outcome:
    model_type: str
    outcome: str  # exact | refused | not-varlen | wrong | crash | not-buildable
    reason: str  # the refusal, the failed checks, the error's last line
    seconds: float


def _last_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def build(model_type: str):
    """A random-weight tiny model of this type with attn_implementation="varlen", or an Outcome
    that says why not."""
    from transformers import AutoModelForCausalLM

    try:
        cfg = tiny_config(model_type)
    except Exception as e:
        return Outcome(model_type, "not-buildable", f"config: {_last_line(e)}", 0.0)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="varlen").float()
        model.set_attn_implementation("eager")  # it must run as transformers itself runs it
        with torch.no_grad():
            model(input_ids=torch.tensor([[2, 3, 4, 5]]), use_cache=False)
        model.set_attn_implementation("varlen")
        return model
    except KeyError as e:  # modeling files that pick attention classes from a fixed table (no registry)
        if str(e).strip("'\"") == "varlen":
            return Outcome(model_type, "not-varlen", "its modeling file picks attention classes from a fixed table, "
                                                     "not transformers' attention registry", 0.0)
        return Outcome(model_type, "not-buildable", _last_line(e), 0.0)
    except (ValueError, TypeError) as e:
        if "attn_implementation" in str(e) or "attention" in str(e).lower():
            return Outcome(model_type, "not-varlen", _last_line(e), 0.0)
        return Outcome(model_type, "not-buildable", _last_line(e), 0.0)
    except Exception as e:
        return Outcome(model_type, "not-buildable", _last_line(e), 0.0)


def classify(model_type: str, max_len: int = 64) -> Outcome:
    from .attention import BackendUnavailable
    from .check import check
    from .hf import NotVarlen, PackingRefused, use

    t0 = time.time()
    model = build(model_type)
    if isinstance(model, Outcome):
        return model
    try:
        use("auto", model)  # as varlen's tools take a model: stateful mixers run sample by sample
        report = check(model, max_len=max_len)
    except NotVarlen as e:
        return Outcome(model_type, "not-varlen", str(e), time.time() - t0)
    except (PackingRefused, BackendUnavailable) as e:
        return Outcome(model_type, "refused", str(e), time.time() - t0)
    except Exception as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        return Outcome(model_type, "crash", f"{_last_line(e)} ({where.filename.rsplit('/', 2)[-1]}:{where.lineno})",
                       time.time() - t0)
    if report.passed:
        return Outcome(model_type, "exact", "", time.time() - t0)
    failed = [f.check for f in report.findings if not f.passed]
    return Outcome(model_type, "wrong", f"{len(failed)} checks failed: {'; '.join(failed[:3])}", time.time() - t0)


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def to_dicts(outcomes: list[Outcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]

# ---------------------------------------------------------------------------------- the whole matrix
KINDS = ("exact", "refused", "not-varlen", "not-buildable", "wrong", "crash")


def run_one(model_type: str, timeout: float) -> Outcome:
    """``classify`` in a process of its own: one architecture's crash, hang or global state does not
    reach the others."""
    import json
    import subprocess
    import sys

    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "varlen.matrix", model_type], capture_output=True, text=True,
                              timeout=timeout, env=_quiet_env())
    except subprocess.TimeoutExpired:
        return Outcome(model_type, "crash", f"the check ran past {timeout:.0f} s", time.time() - t0)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return Outcome(model_type, "crash", f"the check's process ended with {proc.returncode}: {tail}",
                       time.time() - t0)
    return Outcome(**json.loads(lines[-1]))


def _quiet_env() -> dict:
    import os

    return {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_matrix(types: list[str], jobs: int = 1, timeout: float = 600.0, progress=None) -> list[Outcome]:
    from concurrent.futures import ThreadPoolExecutor

    out = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for o in pool.map(lambda t: run_one(t, timeout), types):
            out.append(o)
            if progress:
                progress(o)
    return out


def markdown(outcomes: list[Outcome], versions: dict) -> str:
    """docs/compatibility.md: the counts, then one row per architecture."""
    count = {k: sum(o.outcome == k for o in outcomes) for k in KINDS}
    lines = ["# Compatibility: every causal LM in transformers, packed", "",
             "Generated by `varlen check --all-architectures --markdown docs/compatibility.md`; do not edit by hand.",
             "", f"transformers {versions.get('transformers')}, torch {versions.get('torch')}, {versions.get('date')}; "
             f"each architecture as a tiny random-weight configuration (2-3 layers, width {WIDTH}) on the CPU in "
             f"float32, `attn_implementation=\"varlen\"`, checked by `varlen.check.check(model, max_len=64)`.", "",
             "| outcome | architectures | what it means |", "|---|---|---|"]
    means = {"exact": "every check passes: packed rows give each sample what it gets alone",
             "refused": "varlen refuses it in one line naming the feature it cannot honour",
             "not-varlen": "transformers' modeling file does not take `attn_implementation=\"varlen\"`",
             "not-buildable": "no tiny configuration could be built here (the reason is in its row)",
             "wrong": "accepted, and a check failed: samples mix (a bug)",
             "crash": "an unexpected error (a bug)"}
    lines += [f"| {k} | {count[k]} | {means[k]} |" for k in KINDS]
    lines += ["", "| architecture | outcome | reason |", "|---|---|---|"]
    for o in sorted(outcomes, key=lambda o: (KINDS.index(o.outcome), o.model_type)):
        reason = o.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{o.model_type}` | {o.outcome} | {reason} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m varlen.matrix TYPE: one architecture, its Outcome as one JSON line
    import json
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    from . import hf  # noqa: F401  (registers attn_implementation="varlen")

    print(json.dumps(asdict(classify(sys.argv[1]))))
