"""TRL's SFTTrainer, padding-free (and with its best-fit packing), through attn_implementation="varlen":
its first step's loss and gradients equal the same samples run one at a time through eager; and
transformers' Trainer with DataCollatorWithFlattening likewise."""

import copy
import tempfile

import pytest
import torch

trl = pytest.importorskip("trl", reason="the trl extra is not installed")
datasets = pytest.importorskip("datasets")
import transformers  # noqa: E402
import varlen.hf  # noqa: E402,F401  registers "varlen"


def _tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(97)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                                pad_token="t0", eos_token="t2", unk_token="t1")


def _model():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=97, max_position_embeddings=256, pad_token_id=0,
                                   eos_token_id=2, bos_token_id=None)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="varlen").double()


def _rows(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (int(m),), generator=g).tolist() for m in torch.randint(2, 30, (n,), generator=g)]


def _eager_copy(model):
    """The same weights through eager, copied before a trainer wraps the model's forward (a copy
    made after it would send its gradients to the original)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref


def _alone(ref, samples):
    """Loss and gradients of the samples one at a time through eager: the token-weighted mean."""
    ref.zero_grad(set_to_none=True)
    total = sum(len(s) - 1 for s in samples)
    loss = 0.0
    for s in samples:
        ids = torch.tensor(s)[None]
        logits = ref(input_ids=ids, use_cache=False).logits[0]
        part = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[0, 1:], reduction="sum") / total
        part.backward()
        loss += part.item()
    return loss, {n: p.grad for n, p in ref.named_parameters()}


def _samples_of(batch) -> list[list[int]]:
    """The samples of a padding-free row, cut where position_ids restart."""
    ids, pos = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [ids[a:b] for a, b in zip(starts, starts[1:])]


def _first_step(trainer, model):
    batch = next(iter(trainer.get_train_dataloader()))
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return batch, loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("packing", [False, True], ids=["padding_free", "bfd_packing"])
def test_sft_trainer_padding_free_equals_samples_alone(packing):
    model = _model()
    ref = _eager_copy(model)
    kw = dict(packing=True, packing_strategy="bfd", max_length=64) if packing else dict(max_length=None)
    args = trl.SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=1, padding_free=True,
                         report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0, **kw)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": _rows()}),
                             processing_class=_tokenizer())
    batch, loss, grads = _first_step(trainer, model)
    samples = _samples_of(batch)
    assert len(samples) >= 3 and batch["input_ids"].shape[0] == 1
    want, want_grads = _alone(ref, samples)
    assert loss == pytest.approx(want, rel=1e-6)  # HF's loss runs in float32
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_trainer_with_data_collator_with_flattening_equals_samples_alone():
    model = _model()
    ref = _eager_copy(model)
    rows = _rows(4, seed=1)
    args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=1,
                                          report_to=[], use_cpu=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args,
                                   train_dataset=datasets.Dataset.from_dict({"input_ids": rows}),
                                   data_collator=transformers.DataCollatorWithFlattening())
    batch, loss, grads = _first_step(trainer, model)
    assert sorted(map(len, _samples_of(batch))) == sorted(map(len, rows))
    want, want_grads = _alone(ref, _samples_of(batch))
    assert loss == pytest.approx(want, rel=1e-6)
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("packing", [[], ["--packing"]], ids=["padding_free", "bfd_packing"])
def test_trl_example_runs(packing):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / "trl_sft.py"
    proc = subprocess.run([sys.executable, str(example), "--steps", "6", *packing], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trained 6 steps padding-free through varlen" in proc.stdout
