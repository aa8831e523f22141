"""``varlen check``: does packing give every sample what it would get alone?

Points at a model (a stock HF causal LM, or varlen's decoder), packs random samples (lengths 1 up
to the longest the check allows) in every form users send, and compares each sample's logits,
the loss and every parameter's gradient against the same samples run one at a time in float64
through an attention that needs no packing (HF's ``eager``, varlen's ``reference``). Tolerances
come from the data: twice the error of the same one-at-a-time computation at the model's own
precision against float64, plus a few units of rounding of the values' magnitude (as the tests do).

It also perturbs one sample and checks that no other sample's logits or gradients move (leakage),
that no target crosses a sample boundary, that the loss is the token-weighted mean of the samples'
losses also over micro-batches of gradient accumulation, and (``compile=True``) that a compiled
model settles on a bounded number of graphs. Pointed at transformers' ``sdpa`` with packed rows
and an all-ones attention mask, it reports the leak.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .argtypes import backend_option, device_option, dtype_name, positive_int
from .loss import IGNORE_INDEX, Labels, ignore_starts
from .models.decoder import PRESETS
from .options import changed, flag_of, option
from .seqinfo import SeqInfo


@dataclass
class Finding:
    check: str  # what was compared
    error: float  # the measured difference (or count)
    tolerance: float  # the largest difference that passes
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance  # NaN fails


@dataclass
class Report:
    model: str
    attention: str
    device: str
    dtype: str
    lengths: list[int]
    findings: list[Finding] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.findings)

    def add(self, check: str, error: float, tolerance: float, note: str = "") -> None:
        self.findings.append(Finding(check, float(error), float(tolerance), note))

    def to_dict(self) -> dict:
        out = asdict(self)
        for f, d in zip(self.findings, out["findings"]):
            d["passed"] = f.passed
        out["passed"] = self.passed
        return out

    def table(self) -> str:
        width = max(len(f.check) for f in self.findings)
        lines = [f"varlen check: {self.model}, attention {self.attention}, {self.device}, {self.dtype}, "
                 f"{len(self.lengths)} samples of {min(self.lengths)}..{max(self.lengths)} tokens",
                 f"{'check':<{width}}  {'error':>10}  {'tolerance':>10}  result"]
        for f in self.findings:
            lines.append(f"{f.check:<{width}}  {f.error:>10.3g}  {f.tolerance:>10.3g}  "
                         f"{'ok' if f.passed else 'FAILED'}{'  ' + f.note if f.note else ''}")
        bad = [f.check for f in self.findings if not f.passed]
        lines.append("passed" if not bad else f"FAILED: {len(bad)} of {len(self.findings)} checks: " + "; ".join(bad))
        return "\n".join(lines)


def bound(baseline_err: float, dtype: torch.dtype, magnitude: float) -> float:
    """2x the error of the same computation at the model's precision, plus 8 ulps of the values'
    magnitude (where that baseline happens to be exact)."""
    return 2 * baseline_err + 8 * torch.finfo(dtype).eps * max(magnitude, 1.0)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------------------------- model kinds
class Subject:
    """How the check drives one kind of model: its forms of packed input, and its runs alone."""

    name: str
    hf: bool  # labels are the inputs (the model shifts them) rather than next tokens

    def forms(self, samples: list[Tensor]) -> dict[str, tuple[object, list[Tensor]]]:
        """name -> (a batch: HF keyword arguments or a typed batch, each sample's flat logit positions)."""
        raise NotImplementedError

    def logits(self, model, batch, use_cache: bool) -> Tensor:  # [N, V] flat
        raise NotImplementedError

    def labels(self, batch) -> Tensor:
        raise NotImplementedError

    def with_labels(self, batch, labels: Tensor):
        """The batch with other labels (the leakage check drops one sample's)."""
        raise NotImplementedError

    def mark_dynamic(self, batch):
        raise NotImplementedError

    def alone(self, model, ids: Tensor) -> Tensor:  # [L, V], through the attention that needs no packing
        raise NotImplementedError

    def reference(self, model, dtype: torch.dtype):
        """A copy of ``model`` in ``dtype`` whose attention needs no packing."""
        raise NotImplementedError


class HFSubject(Subject):
    hf = True

    def __init__(self, model):
        self.name = type(model).__name__
        self.impl = model.config._attn_implementation

    def reference(self, model, dtype):
        ref = copy.deepcopy(model).to(dtype)
        ref.set_attn_implementation("eager")
        if dtype == torch.float64 and hasattr(ref, "set_experts_implementation"):
            ref.set_experts_implementation("eager")  # MoE's grouped_mm takes no float64
        return ref

    def alone(self, model, ids):
        return model(input_ids=ids[None], use_cache=False).logits[0]

    # the HF boundary: HF's collators give dicts of keyword arguments, varlen's typed batches give
    # theirs (hf_kwargs), so the forms are dicts here
    def logits(self, model, batch, use_cache):
        kw = {k: v for k, v in batch.items() if k != "labels"}
        return model(**kw, use_cache=use_cache).logits.flatten(0, 1)

    def labels(self, batch):
        return batch["labels"]

    def with_labels(self, batch, labels):
        return {**batch, "labels": labels}

    def mark_dynamic(self, batch):
        for key in ("input_ids", "labels", "position_ids"):  # an HF packed row [1, T]
            torch._dynamo.maybe_mark_dynamic(batch[key], 1)
        return batch

    def forms(self, samples):
        from transformers import DataCollatorWithFlattening

        from .data import PackRowsCollator
        from .hf import VarlenCollator

        feats = [{"input_ids": s.tolist()} for s in samples]
        flat = _spans(samples, 0)
        out = {"VarlenCollator": (VarlenCollator()([{"input_ids": s} for s in samples]), flat)}
        for flash in (False, True):
            b = DataCollatorWithFlattening(return_flash_attn_kwargs=flash)(feats)
            out[f"DataCollatorWithFlattening{' + flash kwargs' if flash else ''}"] = (b, flat)
        collate = PackRowsCollator(row_len=_row_len(samples), labels=Labels.UNSHIFTED)
        out["PackRowsCollator(labels=UNSHIFTED)"] = (collate([(s, s) for s in samples]).hf_kwargs(labels=True),
                                                     _row_layout(collate, samples))
        rows, where = _rows(samples)
        out["[B, L] packed rows, all-ones attention_mask"] = (rows, where)
        out["padded rows + attention_mask"] = _padded(samples)
        return out


class DecoderSubject(Subject):
    hf = False

    def __init__(self, model):
        self.name = f"varlen Decoder ({model.cfg.n_layers} x {model.cfg.dim})"
        self.impl = f"varlen {model.backend}"

    def reference(self, model, dtype):
        ref = copy.deepcopy(model).to(dtype)
        ref.backend = "reference"
        return ref

    def alone(self, model, ids):
        return model(ids, info=SeqInfo.from_lengths([len(ids)], device=ids.device), causal=True)

    def logits(self, model, batch, use_cache):
        return model(**batch.model_kwargs(), causal=True).flatten(0, -2)

    def labels(self, batch):
        return batch.labels

    def with_labels(self, batch, labels):
        return replace(batch, labels=labels)

    def mark_dynamic(self, batch):
        return batch.mark_dynamic()

    def forms(self, samples):
        from .data import PackCollator, PackRowsCollator, PadCollator

        pairs = [(s, _next_tokens(s)) for s in samples]
        out = {"PackCollator": (PackCollator()(pairs), _spans(samples, 0))}
        collate = PackRowsCollator(row_len=_row_len(samples))
        out["PackRowsCollator"] = (collate(pairs), _row_layout(collate, samples))
        width = max(len(s) for s in samples)
        out["PadCollator"] = (PadCollator(length=width)(pairs), [torch.arange(len(s)) + i * width
                                                                for i, s in enumerate(samples)])
        return out


def _next_tokens(s: Tensor) -> Tensor:
    """The decoder's targets: the next token, and none after the last."""
    return torch.cat([s[1:], torch.tensor([IGNORE_INDEX])])


def _spans(samples, start: int) -> list[Tensor]:
    out = []
    for s in samples:
        out.append(torch.arange(start, start + len(s)))
        start += len(s)
    return out


def _row_len(samples) -> int:
    return 2 * max(len(s) for s in samples)


def _row_layout(collate, samples) -> list[Tensor]:
    """Where PackRowsCollator puts each sample: it fills rows best-fit decreasing, as here."""
    from .data import best_fit_decreasing

    rows = best_fit_decreasing([len(s) for s in samples], range(len(samples)), collate.row_len)
    where = [None] * len(samples)
    for r, row in enumerate(rows):
        start = r * collate.row_len
        for i in row:
            where[i] = torch.arange(start, start + len(samples[i]))
            start += len(samples[i])
    return where


def _rows(samples) -> tuple[dict, list[Tensor]]:
    """TRL-style rows: two samples a row, positions restarting, the tail filler; mask all ones."""
    groups = [samples[i:i + 2] for i in range(0, len(samples), 2)]
    width = max(sum(len(s) for s in g) for g in groups) + 1
    ids, pos, labels, where = [], [], [], []
    for r, g in enumerate(groups):
        row_ids, row_pos, row_lab = [], [], []
        for s in g:
            where.append(torch.arange(len(s)) + r * width + sum(len(x) for x in row_ids))
            row_ids.append(s)
            row_pos.append(torch.arange(len(s)))
            row_lab.append(ignore_starts(s, torch.zeros(1)))
        pad = width - sum(len(x) for x in row_ids)
        row_ids.append(torch.zeros(pad, dtype=torch.long))
        row_pos.append(torch.arange(pad))
        row_lab.append(torch.full((pad,), IGNORE_INDEX))
        ids.append(torch.cat(row_ids)), pos.append(torch.cat(row_pos)), labels.append(torch.cat(row_lab))
    batch = {"input_ids": torch.stack(ids), "position_ids": torch.stack(pos), "labels": torch.stack(labels)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch, where


def _padded(samples) -> tuple[dict, list[Tensor]]:
    width = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)},
            [torch.arange(len(s)) + i * width for i, s in enumerate(samples)])


# ---------------------------------------------------------------------------------- the check
def check(model, *, lengths: list[int] | None = None, max_len: int = 256, vocab_size: int | None = None,
          seed: int = 0, micro_batches: int = 2, compile: bool = False, compile_batches: int = 6) -> Report:
    """Run every check on ``model`` (an HF causal LM or a :class:`varlen.Decoder`, on its device and
    in its dtype) and return the :class:`Report`."""
    from .models import Decoder

    subject = DecoderSubject(model) if isinstance(model, Decoder) else HFSubject(model)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    if subject.hf:
        from .hf import PackingRefused
        from .packable import refusal
        from .samplewise import sample_wise_paths

        why = refusal(model, sample_wise_paths(model))
        if why:  # refused before any check runs: the model cannot be packed exactly
            raise PackingRefused(why)
        _reaches_varlen(model)
    vocab = vocab_size or (model.cfg.vocab_size if not subject.hf else model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [1, max_len] + torch.randint(1, max_len + 1, (5,), generator=g).tolist()
    samples = [torch.randint(2, vocab, (n,), generator=g) for n in lengths]
    report = Report(subject.name, subject.impl, str(device), str(dtype).removeprefix("torch."), list(lengths))
    truth_model, base_model = subject.reference(model, torch.float64), subject.reference(model, dtype)
    model.train(False), truth_model.train(False), base_model.train(False)

    forms = subject.forms(samples)  # name -> (batch, each sample's positions); the first: the library's own
    tol = _logits_against_alone(report, subject, model, truth_model, base_model, samples, forms, device)
    target_err = _loss_and_grads(report, subject, model, truth_model, base_model, samples, forms, device)
    _leakage(report, subject, model, samples, device, vocab, tol, g)
    _labels(report, subject, samples, forms)
    if len(samples) >= micro_batches:
        _accumulation(report, subject, model, samples, forms, device, micro_batches, target_err)
    if compile:
        _compiled(report, subject, model, truth_model, device, vocab, max_len, compile_batches, g, tol)
    return report


def _mixers_only(model) -> bool:
    """A model whose only sequence layers are mixers that run sample by sample (Mamba, RWKV): no
    module named as attention outside them."""
    from .packable import under
    from .samplewise import sample_wise_paths

    paths = sample_wise_paths(model)
    return bool(paths) and not any(re.search("Attention|Attn", type(m).__name__) and not under(p, paths)
                                   for p, m in model.named_modules())


def _reaches_varlen(model) -> None:
    """A model that was given ``attn_implementation="varlen"`` but never calls it: NotVarlen."""
    from .hf import NAME, NotVarlen, reaches_varlen

    if model.config._attn_implementation != NAME:
        return
    reached, error = reaches_varlen(model)
    if not reached and not error and _mixers_only(model):
        return  # no attention to reach: every layer that sees the sequence runs one sample at a time
    if not reached:
        raise NotVarlen(f"{type(model).__name__} computes attention itself, not through transformers' attention "
                        f"registry, so attn_implementation='varlen' never runs{f' ({error})' if error else ''}")
    if error:
        raise RuntimeError(f"{type(model).__name__} fails on one plain row through varlen: {error}")


def _to(batch, device):
    from .data import move_batch

    return move_batch(batch, device, non_blocking=False)


def _logits_against_alone(report, subject, model, truth_model, base_model, samples, forms, device) -> float:
    """Every form, with and without a KV cache: each sample's logits against it alone in float64.
    Returns the logits' tolerance (reused by the leakage check)."""
    with torch.no_grad():
        truth = [subject.alone(truth_model, s.to(device)) for s in samples]
        base = [subject.alone(base_model, s.to(device)) for s in samples]
    magnitude = max(t.abs().max().item() for t in truth)
    tol = bound(max(max_err(b, t) for b, t in zip(base, truth)), next(model.parameters()).dtype, magnitude)
    caches = (False, True) if subject.hf else (False,)
    for name, (batch, where) in forms.items():
        batch = _to(batch, device)
        for use_cache in caches:
            with torch.no_grad():
                flat = subject.logits(model, batch, use_cache)
            err = max(max_err(flat[w.to(device)], t) for w, t in zip(where, truth))
            report.add(f"logits vs alone: {name}{', use_cache' if use_cache else ''}", err, tol)
    return tol


def _token_losses(logits: Tensor, ids: Tensor) -> Tensor:
    """Next-token cross-entropy of each position of one sample's logits [L, V] -> [L - 1]
    (float32 at least)."""
    return F.cross_entropy(logits[:-1].to(torch.promote_types(logits.dtype, torch.float32)), ids[1:],
                           reduction="none")


def _alone_loss_and_grads(subject, model, samples, device) -> tuple[Tensor, dict]:
    """Each sample run alone: every target's loss (float64, [targets]) and the gradients of their
    token-weighted mean."""
    model.zero_grad(set_to_none=True)
    total = sum(len(s) - 1 for s in samples)
    losses = []
    for s in samples:
        part = _token_losses(subject.alone(model, s.to(device)), s.to(device))
        (part.sum() / total).backward()
        losses.append(part.detach().double().cpu())
    return torch.cat(losses), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _packed_loss(subject, model, batch, **kw) -> Tensor:
    if subject.hf:
        return model(**batch, use_cache=False, **kw).loss
    from .loss import lm_loss

    return lm_loss(subject.logits(model, batch, False), batch.labels)


def _loss_and_grads(report, subject, model, truth_model, base_model, samples, forms, device) -> Tensor:
    """The loss of the first form (the library's own collator) and every parameter's gradient.
    Returns each target's loss error at the model's precision (float64, [targets])."""
    want, g_truth = _alone_loss_and_grads(subject, truth_model, samples, device)
    base, g_base = _alone_loss_and_grads(subject, base_model, samples, device)
    name, (batch, _) = next(iter(forms.items()))
    model.zero_grad(set_to_none=True)
    loss = _packed_loss(subject, model, _to(batch, device))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    dtype = next(model.parameters()).dtype
    # the mean's error is at most the mean of the targets' errors: twice that of the same losses
    # at the model's precision bounds it (the mean's own baseline error can cancel to ~0 by chance)
    tol = bound((base - want).abs().mean().item(), torch.float32, want.mean().abs().item())
    report.add(f"loss vs alone: {name}", abs(loss.item() - want.mean().item()), tol)
    worst, worst_name, missing = 0.0, "", sorted(set(g_truth) - set(grads))
    for n, gt in g_truth.items():
        if n not in grads:
            continue
        tol = bound(max_err(g_base[n], gt), dtype, gt.abs().max().item())
        ratio = max_err(grads[n], gt) / tol
        if ratio > worst:
            worst, worst_name = ratio, n
    report.add(f"gradients vs alone: {name} ({len(grads)} parameters, error / tolerance)",
               worst if not missing else float("inf"), 1.0,
               f"worst: {worst_name}" if not missing else f"no gradient for {missing[0]}")
    model.zero_grad(set_to_none=True)
    return base - want


def _leakage(report, subject, model, samples, device, vocab, tol, g) -> None:
    """Perturb one sample's tokens: no other sample's logits or gradients may move."""
    j = 0  # the first sample of a row: under a leak, the sample after it sees the change
    changed = list(samples)
    changed[j] = torch.randint(2, vocab, (len(samples[j]),), generator=g)
    outs, grads = [], []
    for group in (samples, changed):
        name, (batch, where) = _leak_form(subject, group)
        batch = _to(batch, device)
        with torch.no_grad():
            flat = subject.logits(model, batch, False)
        outs.append([flat[w.to(device)] for i, w in enumerate(where) if i != j])
        # the loss of the other samples only
        batch = subject.with_labels(batch, _drop_labels(subject.labels(batch), where[j].to(device)))
        model.zero_grad(set_to_none=True)
        _packed_loss(subject, model, batch).backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    err = max(max_err(a, b) for a, b in zip(*outs))
    report.add(f"leakage: other samples' logits after changing sample {j} ({name})", err, tol)
    dtype = next(model.parameters()).dtype
    worst = max(max_err(grads[0][n], grads[1][n]) / bound(0.0, dtype, grads[0][n].abs().max().item())
                for n in grads[0])
    report.add(f"leakage: other samples' gradients after changing sample {j} (error / tolerance)", worst, 1.0)


def _leak_form(subject, samples):
    """The form leakage is checked in: packed rows with an all-ones mask for HF models (where
    attention implementations leak), the library collator for the decoder."""
    forms = subject.forms(samples)
    name = "[B, L] packed rows, all-ones attention_mask" if subject.hf else next(iter(forms))
    return name, forms[name]


def _drop_labels(labels: Tensor, positions: Tensor) -> Tensor:
    """Labels without one sample's targets (for the HF convention too: its first label is already
    ignored, and the token after its last begins the next sample, ignored as well)."""
    flat = labels.flatten().clone()
    flat[positions] = IGNORE_INDEX
    return flat.view_as(labels)


def _labels(report, subject, samples, forms) -> None:
    """No target crosses a sample boundary, and every in-sample target is there, in every form."""
    want = sum(len(s) - 1 for s in samples)
    for name, (batch, where) in forms.items():
        labels = subject.labels(batch)
        rows = labels if labels.dim() == 2 else labels[None]  # [B, L]: HF models shift inside each row
        shift = 1 if subject.hf else 0  # HF models train position t to predict labels[t + 1]
        width = rows.shape[1]
        live = {b * width + t for b in range(rows.shape[0]) for t in range(width - shift)
                if rows[b, t + shift] != IGNORE_INDEX}
        targets = {int(w[i]) for w in where for i in range(len(w) - 1)}  # each token but a sample's last
        report.add(f"labels: targets across a sample boundary ({name})", len(live - targets), 0)
        report.add(f"labels: in-sample targets missing ({name})", want - len(live & targets), 0)


def _accumulation(report, subject, model, samples, forms, device, k: int, target_err: Tensor) -> None:
    """The loss over k micro-batches, each normalised by the whole step's targets, equals the
    token-weighted mean over all samples (HF: ``num_items_in_batch``; decoder: varlen's train_step).
    Batched differently, each target's loss moves by about its error at the model's precision
    (``target_err``): the means then differ by ~sqrt(2 * sum(err^2)) / targets; 4 of those."""
    parts = [samples[i::k] for i in range(k)]
    first = lambda group: _to(next(iter(subject.forms(group).values()))[0], device)  # noqa: E731
    name, (whole, _) = next(iter(forms.items()))
    with torch.no_grad():
        want = _packed_loss(subject, model, _to(whole, device)).item()
        if subject.hf:
            total = sum(len(s) - 1 for s in samples)
            got = sum(_packed_loss(subject, model, first(p), num_items_in_batch=total).item() for p in parts)
    if not subject.hf:
        from .engine import train_step

        got = float(train_step(model, [first(p) for p in parts], None, lambda m, b: subject.logits(m, b, False)).loss)
        model.zero_grad(set_to_none=True)
    noise = 4 * (2 * target_err.square().sum()).sqrt().item() / max(target_err.numel(), 1)
    report.add(f"loss over {k} micro-batches vs one batch ({name})", abs(got - want),
               bound(0.0, torch.float32, abs(want)) * len(samples) + noise)


def _compiled(report, subject, model, truth_model, device, vocab, max_len, n, g, tol) -> None:
    """torch.compile over n random batches: a bounded number of graphs, and the right logits."""
    from torch._dynamo.utils import counters

    from .samplewise import sample_wise_paths

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    # each sample-wise mixer runs eager between compiled pieces (a graph break each side)
    pieces = 1 + len(sample_wise_paths(model))
    err = 0.0
    for _ in range(n):
        lengths = torch.randint(1, max_len + 1, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        samples = [torch.randint(2, vocab, (m,), generator=g) for m in lengths]
        name, (batch, where) = next(iter(subject.forms(samples).items()))
        batch = subject.mark_dynamic(_to(batch, device))
        with torch.no_grad():
            flat = subject.logits(compiled, batch, False)
            truth = [subject.alone(truth_model, s.to(device)) for s in samples]
        err = max(err, max(max_err(flat[w.to(device)], t) for w, t in zip(where, truth)))
    graphs = counters["stats"]["unique_graphs"]
    # 3 graphs a piece at most (the first, then dynamic sizes); a recompile per batch makes more
    report.add(f"compiled: graphs over {n} random batches ({name})", graphs, 3 * pieces,
               f"3 a compiled piece, {pieces} pieces" if pieces > 1 else "")
    report.add("compiled: logits vs alone", err, tol * 4, "the compiler reorders arithmetic: 4x the tolerance")


def to_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=1)


# the flags --all-architectures leaves to each architecture's own process (tiny, random, on the CPU)
MATRIX_FIXES = ("random_init", "attn_implementation", "backend", "device", "dtype", "max_len", "seed", "compile")
MATRIX_ONLY = ("markdown", "jobs", "case_timeout")


@dataclass(frozen=True)
class CheckOptions:
    """What ``varlen check`` checks (every architecture, an HF model, or varlen's decoder: one of them),
    on which kernel and device; flags generated from the fields (:mod:`varlen.options`), spelt as
    ``varlen train`` and ``varlen bench`` spell the same settings."""
    all_architectures: list[str] | None = option(
        None, "the compatibility matrix: every causal LM type the installed transformers registers (or these), each "
        "tiny and random, checked on the CPU in its own process", nargs="*", metavar="TYPE")
    hf_config: Path | None = option(None, "an HF causal LM: a model folder, or a folder / config.json (with "
                                    "--random-init)", type=Path, metavar="PATH")
    preset: str | None = option(None, "varlen's decoder of this preset", choices=sorted(PRESETS))
    random_init: bool = option(False, "random weights from the config (no weights needed)", action="store_true")
    attn_implementation: str = option("varlen", "for --hf-config: varlen, sdpa, eager, ...")
    backend: str = backend_option("varlen's kernel")
    device: str = device_option()
    dtype: str | None = option(None, "the model's dtype (default: fp32 on a CPU, bf16 on CUDA)",
                               type=dtype_name("fp32", "bf16", "fp16"), metavar="{fp32,bf16,fp16}")
    max_len: int = option(256, "the longest sample checked (capped at the model's positions)", type=positive_int)
    seed: int = option(0, "the seed of weights and samples", type=int)
    compile: bool = option(False, "also check a compiled model over random batches",
                           action=argparse.BooleanOptionalAction)
    json: Path | None = option(None, "write the report here", type=Path)
    markdown: Path | None = option(None, "--all-architectures: write the matrix as Markdown", type=Path)
    jobs: int = option(1, "--all-architectures: architectures at once", type=positive_int)
    case_timeout: int = option(900, "--all-architectures: seconds an architecture (as varlen bench's --case-timeout "
                               "a case)", type=positive_int, metavar="S", aliases=("--timeout",))

    def problems(self) -> list[str]:
        """Flags that cannot go together, or that would be ignored, one line each; empty when fine."""
        chosen = [flag_of(f) for f in ("all_architectures", "hf_config", "preset") if getattr(self, f) is not None]
        if len(chosen) != 1:
            return ["say what to check: one of --all-architectures, --hf-config, --preset" +
                    (f" (not {' and '.join(chosen)})" if chosen else "")]
        set_ = changed(self)
        if self.all_architectures is not None:
            return [f"--all-architectures checks each type tiny, random and on the CPU in its own process: "
                    f"{flag_of(f)} would be ignored" for f in MATRIX_FIXES if f in set_]
        out = [f"{flag_of(f)} is for --all-architectures" for f in MATRIX_ONLY if f in set_]
        if self.preset is not None:
            out += [f"{flag_of(f)} is for --hf-config" for f in ("random_init", "attn_implementation") if f in set_]
        return out
