"""Which guard recompiles the compiled train step on a short row? (run on the GPU machine:
PYTHONPATH=src python3 recompile_probe.py flash). A 2-layer study decoder, compiled as `varlen train
--compile` (row length marked dynamic) and as `--cuda-graphs` (reduce-overhead, 40 sequences a row,
8 sizes an octave); rows of 6,144, 6,141, 517, 3,119 and 1,500 tokens."""
import sys, time, torch
from varlen import Decoder, DecoderConfig
from varlen.data import mark_dynamic, move_batch
from varlen.models.families import family
from varlen.train.data import TrainCollator
from varlen.train.step import train_step

torch._logging.set_logs(recompiles=True)
BACKEND, DEV = (sys.argv[1:] + ["flash"])[0], "cuda" if torch.cuda.is_available() else "cpu"
cfg = DecoderConfig.from_name("study", n_layers=2)
fam = family("decoder")


def samples(lengths):
    g = torch.Generator().manual_seed(sum(lengths))
    return [(torch.randint(0, cfg.vocab_size, (n,), generator=g),) * 2 for n in lengths]


def run(mode, col, rows):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = Decoder(cfg, backend=BACKEND).to(DEV)
    cm = torch.compile(m, mode=mode)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, fused=DEV == "cuda")
    for lens in rows:
        b = move_batch(col(samples(lens)), DEV, non_blocking=True)
        mark_dynamic(b)
        t = time.perf_counter()
        train_step(cm, [b], opt, fam.logits, autocast=torch.autocast(DEV, dtype=torch.bfloat16))
        torch.cuda.synchronize() if DEV == "cuda" else None
        print(mode, "T", b.input_ids.shape[0], "seqs", b.info.num_seqs, f"{time.perf_counter() - t:.2f} s", flush=True)


rows = [[1023] * 6 + [6], [1000, 1023, 900, 800, 700, 600, 500, 618], [300, 217], [1023, 1023, 1023, 50], [1500 // 3] * 3]
run(None, TrainCollator(max_seqlen=1023), rows)
if DEV == "cuda":
    run("reduce-overhead", TrainCollator(max_seqlen=1023, num_seqs=40, pad_to_bucket=8), rows)
