"""Several training processes (torchrun, DistributedDataParallel): who this process is, and
the few collectives the training loop needs. Without torchrun's environment every helper
here is a no-op for the one process, so single-process training does not change at all.

    torchrun --nproc_per_node=8 --no-python alignkd train-student --job jobs/mobilevlm_v2/student_pretrain.toml

    procs = Procs.from_env()                 # RANK, WORLD_SIZE, LOCAL_RANK set by torchrun
    with procs.group("cuda"):                # nccl on GPU, gloo on CPU; torn down on exit
        sums = procs.mean({"loss": 0.7})     # the same dict on every process
        path = procs.from_main(path)         # rank 0's value everywhere

The training loop (alignkd.train) uses it; nothing else needs to.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Procs", "process_seed"]

T = TypeVar("T")


@dataclass(frozen=True)
class Procs:
    """This process's place among the training processes (one of one by default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU index on this node

    @classmethod
    def from_env(cls) -> Procs:
        return cls(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        """More than one process: gradients, logged losses and decisions must be shared."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0 alone writes the run directory, logs, evaluates and shows progress."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """The device this process trains on: under several processes each takes the GPU of
        its local rank (a job's "cuda" or "cuda:0" would put every process on one GPU)."""
        if self.enabled and device.startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return device

    @contextmanager
    def group(self, device: str) -> Iterator[None]:
        """The default process group for the duration: nccl when training on GPU, gloo on CPU.
        A group some caller already set up is used as is and left alone."""
        if not self.enabled or dist.is_initialized():
            yield
            return
        if device.startswith("cuda"):
            torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", self.local_rank))
        else:
            dist.init_process_group(backend="gloo")
        try:
            yield
        finally:
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over processes of each value (every process passes the same keys)."""
        if not self.enabled:
            return values
        names = list(values)  # the same order everywhere: the loss terms come in a fixed order
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        packed = torch.tensor([values[n] for n in names], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        return {n: v / self.world_size for n, v in zip(names, packed.tolist())}

    def from_main(self, value: T) -> T:
        """Rank 0's value on every process (a decision all processes must share)."""
        if not self.enabled:
            return value
        box: list[Any] = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def process_seed(seed: int, rank: int, step: int) -> int:
    """A seed for one process's random draws (dropout and the like), derived from the run's
    seed, the process's rank and the step it starts at: processes draw differently, and a
    resumed run does not replay the draws it made before its checkpoint."""
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63
