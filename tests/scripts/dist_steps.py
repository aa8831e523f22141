"""Run under torchrun: a few SGD steps of the tiny decoder on fixed global batches, each rank taking
its cost-balanced (deliberately uneven) share in two uneven micro-batches. Rank 0 saves the
losses and the full parameters. Usage: dist_steps.py PARALLEL[:static|:keep] OUT.pt (``static``: DDP's
static_graph; ``keep``: FSDP2 without resharding after forward)"""

import sys

import torch

from varlen.data import SyntheticDataset, split_across_ranks
from varlen.models import DECODER, Decoder
from varlen.engine import train_step
from varlen.data import TrainCollator
from varlen.parallel.distributed import setup, teardown, wrap

(parallel, _, variant), out = sys.argv[1].partition(":"), sys.argv[2]
d = setup("cpu")
torch.manual_seed(0)
model = Decoder("tiny").double()
wrapped = wrap(model, parallel if d.world_size > 1 or parallel == "fsdp2" else "none", d,
               static_graph=variant == "static", reshard_after_forward=variant != "keep")
opt = torch.optim.SGD(model.parameters(), lr=0.5)
ds = SyntheticDataset(60, max_len=100, seed=1)
collate = TrainCollator()
losses = []
for step in range(3):
    batch = list(range(step * 20, step * 20 + 20))
    share = split_across_ranks(batch, ds.lengths, d.world_size, "balanced", lambda n: n)[d.rank]
    cut = max(1, len(share) // 3)  # two micro-batches of different sizes (one: static_graph can't accumulate)
    micro = [collate([ds[i] for i in part]) for part in ([share] if variant == "static" else (share[:cut], share[cut:]))]
    stats = train_step(wrapped, micro, opt, DECODER.logits)
    losses.append(float(stats.loss))
params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}
if d.rank == 0:
    torch.save({"losses": losses, "params": params}, out)
del wrapped, model, opt  # the DDP reducer holds the group: free it before leaving the group
teardown()
