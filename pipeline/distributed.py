"""Several training processes (torchrun): who this process is, the few collectives the
training loop needs, and how the processes share the student: DistributedDataParallel (every
process holds all of it) or FSDP2 (each holds a 1/N shard of its weights, gradients and AdamW
state; docs/fsdp.md). Without torchrun's environment every helper here is a no-op for the one
process, so single-process training does not change at all.

    torchrun --nproc_per_node=8 --no-python alignkd train-student --job jobs/mobilevlm_v2/student_pretrain.toml
    torchrun --nproc_per_node=8 --no-python alignkd train-student --job jobs/mobilevlm_v2/student_pretrain.toml \
        --set parallel.strategy=fsdp

    procs = Procs.from_env()                 # RANK, WORLD_SIZE, LOCAL_RANK set by torchrun
    with procs.group("cuda"):                # nccl on GPU, gloo on CPU; torn down on exit
        sums = procs.mean({"loss": 0.7})     # the same dict on every process
        path = procs.from_main(path)         # rank 0's value everywhere

    model = shard_model(objective, student.language_model.layers, bf16=True)   # FSDP2, in place
    whole = full_state_dict(model)           # every process calls; rank 0 gets the tensors

The training loop (alignkd.train) uses it; nothing else needs to.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

__all__ = ["ParallelArgs", "Procs", "process_seed", "shard_model", "full_state_dict"]

T = TypeVar("T")


@dataclass
class ParallelArgs:
    """How several torchrun processes share the student ("ddp" is also plain one-process
    training; "fsdp" in one process is refused, there is nothing to shard it over).

    strategy  "ddp": DistributedDataParallel, every process holds the whole student, its
              gradients and AdamW moments (16 bytes a parameter in fp32); "fsdp": FSDP2
              (`torch.distributed.fsdp.fully_shard` on each decoder layer and on the rest),
              each process holds 1/N of them and gathers one layer's weights at a time, for
              students that do not fit one GPU with AdamW. Checkpoints are then sharded
              (alignkd.checkpoint) and resume only under "fsdp"; docs/fsdp.md says when to
              pick which.
    """

    strategy: Literal["ddp", "fsdp"] = "ddp"


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
            # No rank tears the group down while another still has a collective in flight (a
            # gloo rank whose peers closed mid-exchange can abort at exit: seen once in a full test run).
            dist.barrier()
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


def shard_model(model: torch.nn.Module, layers: torch.nn.ModuleList, *, bf16: bool) -> torch.nn.Module:
    """FSDP2 on `model` in place: one shard group per decoder layer (its weights are gathered
    for its forward and backward only), then the root, which holds everything else (the
    embeddings, head, vision tower, projector and the Align-KD adapters, gathered for the
    whole step). Build the optimiser afterwards: it must hold the sharded parameters.

    bf16: gather the weights in bf16 and reduce the gradients in fp32 (the master weights and
    AdamW state stay in the parameters' own dtype). The root does not cast its inputs: the
    teacher's cached log-probabilities and features keep their precision in the losses, and
    autocast (which the caller keeps) runs the losses in fp32 as without FSDP.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mixed = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else {}
    for layer in layers:
        fully_shard(layer, mp_policy=MixedPrecisionPolicy(**mixed))
    fully_shard(model, mp_policy=MixedPrecisionPolicy(**mixed, cast_forward_inputs=False))
    # A micro-batch without images leaves the projector (and vision adapter) without a
    # gradient in one process and not in another: reduce zeros for it, or the processes'
    # reduce-scatters would not match (DDP's find_unused_parameters).
    model.set_reduce_scatter_unused_params(True)
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, gathered onto rank 0's CPU (an empty dict in
    the other processes). Every process must call it: each gathers its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def process_seed(seed: int, rank: int, step: int) -> int:
    """A seed for one process's random draws (dropout and the like), derived from the run's
    seed, the process's rank and the step it starts at: processes draw differently, and a
    resumed run does not replay the draws it made before its checkpoint."""
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63
