"""Process groups and model wrapping for training, applied from outside the model definition.

`torchrun --nproc-per-node N -m afm train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; afm then joins a
process group (NCCL on GPUs, gloo on CPUs) and shards the model with FSDP2 (`fully_shard` on every
decoder layer, then on the whole model), in bf16 with fp32 reductions on GPUs. Activation
checkpointing and torch.compile wrap the decoder layers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from afm.model.transformer import AFMForCausalLM


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if there is one; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
        value /= info.world_size
    return value


def parallelize(model: AFMForCausalLM, info: DistInfo, *, bf16: bool, activation_checkpointing: bool,
                compile: bool) -> nn.Module:
    """Wrap the model for training: activation checkpointing and compile per decoder layer, FSDP2 across
    ranks (bf16 parameters for compute, fp32 gradient reduction, fp32 master weights kept sharded)."""
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(model.model.layers):
            model.model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
    if compile:
        for layer in model.model.layers:
            layer.compile()
    if info.distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model
