"""Run under torchrun: the tiny decoder compiled with context parallelism (the all-to-alls inside
the graph) against the same slices eager in float64; rank 0 writes "ok" to OUT, or raises."""

import copy
import sys

import torch
import torch.distributed as dist

from varlen.data import PackCollator, PackedBatch, SyntheticDataset
from varlen.models import DECODER, DecoderConfig
from varlen.parallel import ContextShard, shard_batch

dist.init_process_group("gloo")
rank, n = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = DECODER.build(DecoderConfig.from_name("tiny"), "reference")
truth_model = copy.deepcopy(model).double()
compiled = torch.compile(model)
ds = SyntheticDataset(40, max_len=100, seed=1)
for step in range(3):  # rows of different lengths: the compiled graph must follow without recompiling each
    b = PackCollator(pad_to_multiple_of=n)([ds[i] for i in range(step * 10, step * 10 + 10)])
    batch = shard_batch(PackedBatch(b.input_ids, b.labels, b.info), ContextShard(rank, n))
    batch = batch.mark_dynamic()
    with torch.no_grad():
        truth = DECODER.logits(truth_model, batch)
        eager = DECODER.logits(model, batch)
        got = DECODER.logits(compiled, batch)
    base = (eager.double() - truth).abs().max().item()
    err = (got.double() - truth).abs().max().item()
    bound = 4 * base + 8 * torch.finfo(torch.float32).eps * max(truth.abs().max().item(), 1.0)
    assert err <= bound, (step, err, bound)
if rank == 0:
    open(sys.argv[1], "w").write("ok")
dist.destroy_process_group()
