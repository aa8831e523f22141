"""Run under torchrun: Ulysses attention of each rank's token slice against the unsplit row in
float64, forward and gradients, for documents cut by slice edges; causal and not, GQA, windows.
Rank 0 writes "ok" to OUT, or raises."""

import sys

import torch
import torch.distributed as dist

from varlen import SeqInfo, attention
from varlen.parallel import ContextShard, ulysses_attention

dist.init_process_group("gloo")
rank, n = dist.get_rank(), dist.get_world_size()
cases = [  # (lengths, heads, kv_heads, causal, window)
    ([5, 40, 1, 18], 4, 4, True, (-1, -1)),  # a document across every slice edge
    ([64], 4, 2, True, (-1, -1)),  # one document over all ranks, GQA (kv heads divide)
    ([7, 9, 48], 4, 1, False, (-1, -1)),  # GQA with fewer kv heads than ranks: repeated
    ([30, 2, 32], 4, 2, True, (3, 0)),  # a sliding window
]
for lengths, h, hkv, causal, window in cases:
    t = sum(lengths)
    assert t % n == 0, (lengths, n)
    g = torch.Generator().manual_seed(t + h + hkv)  # the same row on every rank
    q, k, v = (torch.randn(t, x, 8, generator=g, dtype=torch.float64) for x in (h, hkv, hkv))
    grad = torch.randn(t, h, 8, generator=g, dtype=torch.float64)
    info = SeqInfo.from_lengths(lengths)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    want = attention(*full, info, causal=causal, window_size=window, backend="reference")
    want.backward(grad)
    shard = ContextShard(rank, n)
    s = shard.slice(t)
    mine = [x[s].clone().requires_grad_() for x in (q, k, v)]
    got = ulysses_attention(*mine, info, shard, causal=causal, window_size=window, backend="reference")
    got.backward(grad[s])
    torch.testing.assert_close(got, want[s], rtol=1e-12, atol=1e-12)
    for name, a, b in zip("qkv", mine, full):
        # k/v gradients of a token come from the queries of every rank: each rank's slice of them is whole
        torch.testing.assert_close(a.grad, b.grad[s], rtol=1e-12, atol=1e-12, msg=f"d{name} {lengths}")

# leakage across a slice edge: change the first document's tokens (on rank 0 only, as its k/v);
# no other document's output moves on any rank
lengths = [10, 30, 24]
info = SeqInfo.from_lengths(lengths)
g = torch.Generator().manual_seed(5)
q, k, v = (torch.randn(64, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
shard = ContextShard(rank, n)
s = shard.slice(64)
before = ulysses_attention(q[s], k[s], v[s], info, shard, causal=False, backend="reference")
k2, v2 = k.clone(), v.clone()
k2[:10], v2[:10] = torch.randn(10, 4, 8, generator=g, dtype=torch.float64), torch.randn(10, 4, 8, generator=g, dtype=torch.float64)
after = ulysses_attention(q[s], k2[s], v2[s], info, shard, causal=False, backend="reference")
others = info.document_ids[s] != 0
assert torch.equal(before[others], after[others]), "a change in document 0 moved another document"
assert not torch.equal(before[~others], after[~others]) or not (~others).any(), "document 0 must see its change"
if rank == 0:
    open(sys.argv[1], "w").write("ok")
dist.destroy_process_group()
