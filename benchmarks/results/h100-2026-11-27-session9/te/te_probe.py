"""The probe that ran on the H100 (2026-11-27, session 9) before TEDecoder took one max_seqlen: TE eager
step time with max_seqlen per batch vs one upper bound, and with rows padded to a few sizes.
Prints ms per step (mean of 10 after 3 warm-up). Run from the repository root with PYTHONPATH=src."""
import time, torch
from varlen.data import PackCollator, SyntheticDataset, move_batch
from varlen.models import DecoderConfig, lm_loss
from varlen.models.te_decoder import TEDecoder

cfg = DecoderConfig.from_name("study")
model = TEDecoder(cfg).cuda()
ds = SyntheticDataset(32 * 13, max_len=1023, vocab_size=cfg.vocab_size, seed=0)

def run(name, collate, fixed_m, train):
    batches = [move_batch(collate([ds[j] for j in range(i * 32, i * 32 + 32)]), "cuda") for i in range(13)]
    model.train(train)
    times = []
    for i, b in enumerate(batches):
        info = b["info"]
        m = cfg.max_len if fixed_m else info.max_seqlen
        torch.cuda.synchronize(); t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(train):
            x = model.tok_emb(b["input_ids"].flatten()) + model.pos_emb(info.position_ids)
            mask = "padding_causal" if train else "padding"
            for blk in model.blocks:
                x = blk(x, self_attn_mask_type=mask, cu_seqlens_q=info.cu_seqlens, cu_seqlens_kv=info.cu_seqlens,
                        max_seqlen_q=m, max_seqlen_kv=m)
            loss = lm_loss(model.head(model.ln_f(x))[None], b["labels"])
        if train:
            loss.backward(); model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    print(f"{name} {'train' if train else 'eval'}: {sum(times) / len(times):.1f} ms/step (min {min(times):.1f})", flush=True)

for train in (False, True):
    run("max_seqlen per batch", PackCollator(), False, train)
    run("max_seqlen = max_len", PackCollator(), True, train)
    run("max_len + 8 row sizes an octave", PackCollator(max_seqlen=1023, pad_to_bucket=8, num_seqs=38), True, train)
