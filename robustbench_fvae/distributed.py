"""Data parallelism for one large run (``torchrun --nproc_per_node K -m robustbench_fvae.run``).

Every rank trains on its shard of each epoch's permutation with ``batch_size / K`` images per
step, so the global batch is the single-process one, and DDP averages gradients. Evaluation
shards the split the same way and gathers the probabilities back into dataset order, so the
metrics are exactly those a single process computes with the same weights. Only rank 0 writes
the run record. With one process every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's part of an index list (strided, so shards differ by at most one)."""
        return indices[self.rank::self.world_size]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank (e.g. SIGTERM seen)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        if dist.get_backend() == "nccl":
            value = value.cuda()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks (returned as is in one process); no gradient."""
        if not self.enabled:
            return value
        out = value.detach().clone()
        if dist.get_backend() == "nccl" and not out.is_cuda:
            out = out.cuda()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(value.device)

    def gather_objects(self, obj: object) -> list:
        """``[obj of rank 0, obj of rank 1, …]`` on every rank (``[obj]`` in one process)."""
        if not self.enabled:
            return [obj]
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, obj)
        return parts

    def gather_rows(self, indices: list[int], rows: np.ndarray, n: int) -> np.ndarray:
        """Reassemble per-rank ``rows`` (one per index of this rank's shard) into an (n, …)
        array in dataset order, on every rank."""
        if not self.enabled:
            return rows
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, (indices, rows))
        out = np.empty((n, *rows.shape[1:]), dtype=rows.dtype)
        for idx, part in parts:
            out[np.asarray(idx, dtype=np.int64)] = part
        return out


SINGLE_PROCESS = Distributed()


def init_distributed(device_name: str) -> tuple[Distributed, str]:
    """Join the process group when launched by torchrun (``WORLD_SIZE > 1``).

    Returns the rank info and the device name this rank should use (``cuda:LOCAL_RANK`` on GPUs;
    gloo on CPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), device_name
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    else:
        device_name = "cpu"
    return Distributed(rank, world, local), device_name
