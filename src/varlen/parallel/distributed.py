"""Data parallelism: the process group torchrun describes, this rank's device, and DDP / FSDP2 wrapping."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..argtypes import dtype_name, positive_int
from ..options import option


@dataclass(frozen=True)
class Wrapping:
    """How DDP / FSDP2 wrap the model: ``varlen train`` and the scaling sweep take these flags alike."""
    reduce_dtype: str = option("fp32", "gradient reduction dtype (DDP's all-reduce, FSDP2's reduce-scatter)",
                               type=dtype_name("fp32", "bf16"), metavar="{fp32,bf16}")
    bucket_mb: int = option(25, "DDP gradient bucket size", type=positive_int)
    static_graph: bool = option(False, "DDP's static_graph (not with several micro-batches a step)", action="store_true")
    reshard_after_forward: bool = option(True, "FSDP2: free gathered block parameters after forward (--no-...: ZeRO-2)",
                                         action=argparse.BooleanOptionalAction)

    def wrap_kwargs(self) -> dict:
        """:func:`wrap`'s keywords for these options."""
        return {"reduce_dtype": torch.bfloat16 if self.reduce_dtype == "bf16" else torch.float32,
                "bucket_mb": self.bucket_mb, "static_graph": self.static_graph,
                "reshard_after_forward": self.reshard_after_forward}


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def alone(cls, device: str | torch.device) -> Dist:
        """One process on ``device``, no process group."""
        return cls(0, 1, 0, torch.device(device))


def setup(device: str, timeout: timedelta | None = None) -> Dist:
    """Join the process group that torchrun describes (gloo on CPU, NCCL on CUDA); one process
    without torchrun. ``timeout``: how long a collective may wait before it fails (a backstop
    behind ``--stall-timeout``'s watchdog)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = gpu_of(device, world, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if (world > 1 or "MASTER_ADDR" in os.environ) and not dist.is_initialized():  # torchrun, even of 1
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None,
                                timeout=timeout)
    return Dist(rank, world, local, dev)


def gpu_of(device: str, world: int, local_rank: int) -> torch.device:
    """This process's device for ``--device`` (``cpu``, ``cuda``, ``cuda:N``): under torchrun each
    rank takes the GPU of its local rank, so a chosen index there is refused."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return torch.device("cpu")
    if index and world > 1:
        raise ValueError(f"--device {device} with {world} processes: each rank takes the GPU of its LOCAL_RANK; "
                         "pass --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    return torch.device("cuda", int(index) if index else local_rank)


def from_rank0(value: int, d: Dist) -> int:
    """Rank 0's ``value`` on every rank (a decision rank 0 made alone, e.g. which checkpoint passed)."""
    if d.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=d.device)
    dist.broadcast(t, 0)
    return int(t.item())


def all_agree(ok: bool, d: Dist) -> bool:
    """Whether ``ok`` holds on every rank (so that all ranks stop together, none left waiting)."""
    if d.world_size == 1:
        return ok
    t = torch.tensor([int(ok)], dtype=torch.int64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def per_rank(value: float, d: Dist, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``value`` of every rank, in rank order (one all-gather; no collective on one process)."""
    mine = torch.tensor([value], device=d.device, dtype=dtype)
    if d.world_size == 1:
        return mine
    out = [torch.zeros_like(mine) for _ in range(d.world_size)]
    dist.all_gather(out, mine)
    return torch.cat(out)


def teardown(barrier: bool = True) -> None:
    """Leave the process group. Call it after the DDP module is gone: a gloo group freed from a
    DDP reducer's destructor, with a collective's work still being released on gloo's thread,
    deadlocked on the GIL (seen at exit of a CPU run). The barrier lets that thread go idle first."""
    if dist.is_initialized():
        if barrier:  # not after an error: the other ranks may never arrive
            dist.barrier()
        dist.destroy_process_group()


def run_then_teardown(fn, *args):
    """``fn(*args)``, then leave the process group: behind a barrier once ``fn`` returned (its DDP /
    FSDP module freed), at once after an error (the other ranks may never reach a barrier)."""
    try:
        out = fn(*args)
    except BaseException:
        teardown(barrier=False)
        raise
    teardown()
    return out


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: varlen's Decoder.blocks, or an HF model's layer list."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} to shard")
    return found


def wrap(model: torch.nn.Module, parallel: str, d: Dist, *, reduce_dtype: torch.dtype = torch.float32,
         param_dtype: torch.dtype | None = None, bucket_mb: int = 25, compile: bool = False,
         static_graph: bool = False, reshard_after_forward: bool = True, compile_mode: str | None = None
         ) -> torch.nn.Module:
    """Data-parallel wrapping; compiled inside-out the way each wrapper wants it.

    ``param_dtype`` (FSDP2): the dtype parameters are all-gathered and computed in (bf16 halves
    the all-gather); gradients are reduced in ``reduce_dtype`` into float32 shards.
    ``reshard_after_forward=False`` (FSDP2) keeps each block's gathered parameters from forward to
    backward (ZeRO-2: one all-gather a step instead of two, for the memory of unsharded blocks).
    The last block is never resharded: backward needs it first (torchtitan does the same).
    ``static_graph`` (DDP): the same parameters get gradients in the same order every step, so DDP
    skips searching for unused ones and keeps its buckets in the order gradients arrive.
    ``compile_mode`` (one process only): torch.compile's mode, e.g. ``"reduce-overhead"`` (CUDA graphs)."""
    match parallel:
        case "none":
            if d.world_size > 1:
                raise ValueError("--parallel none with several processes: choose ddp or fsdp2")
            return torch.compile(model, mode=compile_mode) if compile else model
        case "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            if compile:  # per block, as torchtitan: each block's gradients are ready (and all-reduced)
                for block in blocks_of(model):  # while the blocks below it still run backward
                    block.compile()
            ddp = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                      bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True, static_graph=static_graph)
            if reduce_dtype == torch.bfloat16:
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
            return ddp
        case "fsdp2":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
            blocks = blocks_of(model)
            for i, block in enumerate(blocks):
                if compile:  # as torchtitan: compile each block, then shard it
                    block.compile()
                fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
            fully_shard(model, mp_policy=mp)
            return model
        case _:
            raise ValueError(f"--parallel must be none, ddp or fsdp2, got {parallel!r}")
