"""Context parallelism (Ulysses) on the CPU with gloo: each rank's slice of a packed row gives the
unsplit row's outputs and gradients in float64; bad splits are refused before any collective."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from varlen import SeqInfo
from varlen.data import PackedBatch
from varlen.parallel import ContextShard, shard_batch, ulysses_attention

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.mark.parametrize("ranks", [2, 4])
def test_ulysses_attention_equals_the_unsplit_row(tmp_path, ranks):
    out = tmp_path / "ok"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           str(SCRIPTS / "cp_attention.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and out.read_text() == "ok", proc.stdout[-3000:] + proc.stderr[-3000:]


def test_shard_batch_slices_the_row_and_keeps_positions_across_edges():
    info = SeqInfo.from_lengths([5, 7])  # the second document crosses the edge at token 6
    ids = torch.arange(12)
    batch, shard = shard_batch(PackedBatch(ids, ids + 100, info, 12), rank=1, size=2)
    assert batch.input_ids.tolist() == list(range(6, 12)) and batch.labels.tolist() == list(range(106, 112))
    assert shard.position_ids.tolist() == [1, 2, 3, 4, 5, 6] and shard.info is info
    with pytest.raises(ValueError, match="multiple of 5 tokens, got 12"):
        shard_batch(PackedBatch(ids, ids, SeqInfo.from_lengths([12]), 12), rank=0, size=5)


def test_heads_that_do_not_divide_are_refused_before_any_collective():
    info = SeqInfo.from_lengths([6])
    q = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="4 query heads do not divide by 3"):
        ulysses_attention(q, q, q, ContextShard(info, 0, 3))
