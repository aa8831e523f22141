"""Documents every machine has -- the Python standard library's own source files -- and a small model
folder made for them: a byte-level BPE tokenizer trained on them with ``tokenizers`` (with a chat
template) and a Llama- or Qwen2-shaped causal LM with random weights, saved as
``save_pretrained`` writes a real checkpoint. Real, long-tailed lengths to fine-tune on where no
hub can be reached (the tests, the example, the GPU measurement)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# each turn: a role token, the content, <|end|>; the generation prompt is the assistant's role token
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def stdlib_documents(limit: int | None = None, max_chars: int | None = None) -> list[str]:
    """The standard library's ``*.py`` files (sorted by path, tests excluded), each one document;
    ``max_chars`` cuts each, ``limit`` keeps the first files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if "test" in path.relative_to(root).parts[0] or "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(text[:max_chars] if max_chars else text)
        if limit and len(docs) >= limit:
            break
    return docs


def train_tokenizer(docs: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``docs``: BOS added to each text, the chat template
    above, every special token its own id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)


def model_config(kind: str, vocab_size: int, **sizes):
    """A ``llama`` or ``qwen2`` config (GQA: half the heads for k/v) of ``sizes``: ``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``, ``max_position_embeddings``."""
    from transformers import AutoConfig

    heads = sizes.get("num_attention_heads", 4)
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                intermediate_size=128, max_position_embeddings=1024)
    return AutoConfig.for_model(kind, vocab_size=vocab_size, **{**base, **sizes})


def save_model_folder(out: Path, tokenizer, kind: str = "llama", seed: int = 0, vocab_size: int | None = None,
                      **sizes) -> Path:
    """A random-init causal LM of ``kind`` with ``tokenizer``'s vocabulary (or a larger ``vocab_size``:
    the output layer of a real model's size), saved with the tokenizer in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model_config(kind, max(vocab_size or 0, len(tokenizer)), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def write_text_jsonl(docs: list[str], path: Path) -> Path:
    """``docs`` as ``{"text": ...}`` rows, one a line."""
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return Path(path)
