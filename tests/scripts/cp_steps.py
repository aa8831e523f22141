"""Run under torchrun: a few SGD steps of the tiny decoder on two packed rows a step, with context
parallelism of size CP (the rest of the ranks data-parallel: 4 ranks and CP 2 is 2 x 2). One
process runs both rows whole. Rank 0 saves the losses and the parameters.
Usage: cp_steps.py CP OUT.pt [ddp|fsdp2] [decoder|hf-llama] (fsdp2: parameters sharded over all ranks,
data x context; hf-llama: a stock HF Llama with grouped-query attention through varlen.hf)"""

import sys

import torch
import torch.distributed as dist

from varlen.data import PackCollator, PackedBatch, SyntheticDataset
from varlen.models import DecoderConfig, family
from varlen.parallel import ContextShard, shard_batch
from varlen.engine import train_step
from varlen.parallel.distributed import setup, teardown, wrap

cp, out = int(sys.argv[1]), sys.argv[2]
parallel = sys.argv[3] if len(sys.argv) > 3 else "ddp"
fam = family(sys.argv[4] if len(sys.argv) > 4 else "decoder")
d = setup("cpu")
dp = d.world_size // cp
group = dist.new_subgroups(cp)[0] if d.world_size > 1 else None  # ranks 0..cp-1, cp..2cp-1, ...
shard = ContextShard(d.rank % cp, cp, group)
torch.manual_seed(0)
model = fam.build(DecoderConfig.from_name("tiny"), "reference").double()
wrapped = wrap(model, parallel if d.world_size > 1 else "none", d)
opt = torch.optim.SGD(model.parameters(), lr=0.5)
ds = SyntheticDataset(60, max_len=100, seed=1)
collate = PackCollator(pad_to_multiple_of=4)  # rows that split over 1, 2 or 4 ranks


def row(indices):
    b = collate([ds[i] for i in indices])
    return PackedBatch(b.input_ids, b.labels, b.info)


losses = []
for step in range(3):
    rows = [row(range(step * 20 + r * 10, step * 20 + r * 10 + 10)) for r in range(2)]  # documents of 1..100
    mine = rows if dp == 1 else [rows[d.rank // cp]]  # dp 2: a row each context group
    micro = [shard_batch(r, shard) if cp > 1 else r for r in mine]
    stats = train_step(wrapped, micro, opt, fam.logits)
    losses.append(float(stats.loss))
params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}
if d.rank == 0:
    torch.save({"losses": losses, "params": params}, out)
del wrapped, model, opt
teardown()
