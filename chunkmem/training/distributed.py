"""Process-group setup and the few collectives the training code needs.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`init_distributed` creates the
default process group (``gloo`` on CPU, ``nccl`` on CUDA, one GPU per local rank); without it the
same code runs as one process and every collective here is the identity. :func:`wrap_model`
makes the model data-parallel: DDP (gradients all-reduced and averaged) or FSDP2
(``fully_shard`` on every block and on the root: parameters, gradients and optimizer state
sharded, gradients reduce-scattered and averaged).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "shutdown", "wrap_model", "unwrap_model", "PARALLEL_MODES"]

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its device, and whether it created
    the process group (then :meth:`close` destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on the process that logs, plots and writes single-file checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the processes (in place, also returned). Identity on one process."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_tensor(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``t`` of every process, in rank order (same shape and dtype on every process)."""
        if not self.active:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return out

    def all_gather_object(self, obj) -> list:
        """A small picklable object of every process, in rank order (sent between the processes
        of this run only; never read from disk)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            shutdown()
            self.owns_group = False


def shutdown() -> None:
    """Destroy the default process group (if any) once every process has reached this point.

    The pause between the barrier and the destruction releases the GIL so that gloo's worker
    threads can free the finished collectives' tensors (which needs the GIL) before the group's
    destructor, run while holding the GIL, waits for those threads (pytorch/pytorch#56297): without
    it the process hung at exit about one time in three on this machine."""
    if not dist.is_initialized():
        return
    dist.barrier()  # no process tears the group down while another still uses it
    time.sleep(0.2)
    dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistContext:
    """The process group of a ``torchrun`` launch, or a one-process context.

    device: "auto" (CUDA when available), "cpu" or "cuda". On CUDA each process uses GPU
    ``LOCAL_RANK``; the backend is ``nccl`` on CUDA and ``gloo`` on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        if world > 1:
            index = local_rank
        else:
            index = 0 if device == "auto" else (torch.device(device).index or 0)
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world <= 1:
        return DistContext(device=dev)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=False)
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistContext(rank, world, local_rank, dev, owns_group=True)


def wrap_model(model: torch.nn.Module, ctx: DistContext, parallel: str = "ddp",
               compile: bool | str = False) -> torch.nn.Module:
    """``model`` made data-parallel over ``ctx`` (unchanged on one process), optionally compiled.

    parallel: "ddp" (DistributedDataParallel; every process holds the whole model) or "fsdp"
    (FSDP2: ``fully_shard`` on each block, then on the root; the module is sharded in place).
    compile: False, True (inductor) or a ``torch.compile`` backend name. The model's forward is
    compiled as one graph (``fullgraph=True``: the chunkmem ops are custom ops, nothing breaks the
    graph); under DDP the compiled module is wrapped (DDP's bucketing still splits the backward
    graph for communication overlap); under FSDP2 the sharded module is compiled without
    ``fullgraph``, its hooks being traced by Dynamo."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    kw = {} if compile in (False, True) else {"backend": compile}
    if not ctx.active or parallel == "ddp":
        if compile:
            model = torch.compile(model, fullgraph=True, **kw)
        if not ctx.active:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard
    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)
    return torch.compile(model, **kw) if compile else model


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP and torch.compile wrappers (an FSDP2 module is its own)."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
