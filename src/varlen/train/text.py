"""Text and chat rows, tokenised with the model's own tokenizer.

A text row ``{"text": ...}`` is one document: its tokens and the tokenizer's EOS after them, so
the model learns where a document ends. A chat row ``{"messages": [{"role", "content"}, ...]}``
goes through the tokenizer's chat template; only the assistant's turns are trained. Which tokens
are the assistant's is read off the template itself: the conversation up to a turn, rendered with
the generation prompt, must be a prefix of the conversation including it, and the tokens in
between are the turn's (the end-of-turn token included). A template for which that fails is
refused, naming the row, rather than guessed at.
"""

from __future__ import annotations

from pathlib import Path


class TextError(ValueError):
    """A row or a tokenizer that cannot make samples: the message names where."""


def load_tokenizer(model_dir: Path):
    """The tokenizer saved beside the model (no code runs: ``trust_remote_code`` stays off)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a folder without a usable tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TextError(f"{model_dir}: no tokenizer could be loaded from it ({first}); text and chat rows are "
                        "tokenised with the model's tokenizer (save it there: tokenizer.save_pretrained)") from None


def text_ids(tokenizer, text, where: str) -> list[int]:
    """One document's token ids, EOS appended."""
    if not isinstance(text, str):
        raise TextError(f"{where}: 'text' is {type(text).__name__}, not a string")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TextError(f"{where}: the tokenizer has no EOS token to end a document with; set eos_token")
    ids = list(tokenizer(text)["input_ids"])
    return ids if ids and ids[-1] == eos else ids + [eos]


def chat_ids(tokenizer, messages, where: str) -> tuple[list[int], list[bool]]:
    """A conversation's token ids and, for each, whether it is the assistant's (trained)."""
    _check_messages(messages, where)
    if getattr(tokenizer, "chat_template", None) is None:
        raise TextError(f"{where}: a chat row, but the tokenizer has no chat template to render it with")

    def render(msgs, prompt: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=prompt,
                                                  return_dict=True)["input_ids"])

    full = render(messages, False)
    trained = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if upto[: len(before)] != before or full[: len(upto)] != upto:
            raise TextError(f"{where}: the chat template does not render turn {i} as an extension of the turns "
                            "before it, so the assistant's tokens cannot be told apart")
        trained[len(before):len(upto)] = [True] * (len(upto) - len(before))
    if not any(trained):
        raise TextError(f"{where}: a conversation without an assistant turn has nothing to train on")
    return full, trained


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise TextError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TextError(f"{where}: message {i} is not an object with string 'role' and 'content'")
