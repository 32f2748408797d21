"""Calibration across processes: which samples a rank owns, reducing statistics, who solves what.

Under ``torchrun`` / ``accelerate launch`` every rank loads the same model and data. Samples are sharded
in whole batches of the plan :mod:`.batching` makes over all samples (so a sample's batch does not depend
on the number of ranks), each rank runs forward / backward / statistics on its shard, statistics are
reduced, each statistic group is solved once by its owner rank and the result is broadcast, so every rank
ends with the same quantized model. A single process is the world of size 1 and every collective is a no-op.
gloo collectives run on CPU tensors, NCCL ones on the rank's GPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Comm", "init_from_env"]

logger = logging.getLogger(__name__)


def init_from_env() -> None:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1) if the script has not already."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        logger.info("tlq_hf: joined a %s process group of %d ranks", backend, dist.get_world_size())


@dataclass(frozen=True)
class Comm:
    """The process group calibration runs in."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Comm:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place sum / max over ranks."""
        if self.world == 1:
            return tensor
        buf = tensor.to(self._device())
        dist.all_reduce(buf, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        tensor.copy_(buf)
        return tensor

    def sum(self, *values: float) -> list[float]:
        """Sum Python floats over ranks (float64)."""
        t = self.all_reduce_(torch.tensor(values, dtype=torch.float64))
        return [float(v) for v in t]

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """In place: every rank gets ``src``'s ``tensor`` (same shape and dtype on every rank)."""
        if self.world == 1:
            return tensor
        buf = tensor.to(self._device())
        dist.broadcast(buf, src)
        tensor.copy_(buf)
        return tensor

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (first dimension may differ between ranks), in rank order, on CPU."""
        if self.world == 1:
            return [tensor]
        device = self._device()
        sizes = torch.zeros(self.world, dtype=torch.int64, device=device)
        sizes[self.rank] = tensor.shape[0]
        dist.all_reduce(sizes)
        longest = int(sizes.max())
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
        padded[: tensor.shape[0]] = tensor.to(device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return [p[: int(n)].cpu() for p, n in zip(parts, sizes)]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
