"""Process-group setup from torchrun's environment, and the few collectives the
trainer and methods need.

One code path for `python train/pretrain.py` (no RANK/WORLD_SIZE: single process,
no process group) and `torchrun ...` (env:// rendezvous; gloo on CPU, nccl on CUDA)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Read torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) and join the group.
    `device`: auto (CUDA if available), cpu or cuda."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but CUDA is not available; use train.device=cpu")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # torchrun keeps its agent's store across restarts, and the previous attempt's
        # keys (peer addresses of killed workers) are still there: plain env:// init then
        # connects to dead ports and hangs. A per-attempt prefix isolates each attempt.
        store = dist.PrefixStore(f"regionssl/attempt_{restarts}", store)
        dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank,
                                world_size=world, timeout=timeout,
                                **({"device_id": dev} if use_cuda else {}))
    return DistInfo(rank, world, local, dev, restarts)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def convert_sync_bn(model: nn.Module, info: DistInfo) -> nn.Module:
    """SyncBN only on CUDA with more than one process: PyTorch's SyncBatchNorm has no
    CPU kernel (pipeline.md 7), so CPU/gloo runs keep per-rank BN statistics."""
    if info.distributed and info.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / (dist.get_world_size() if dist.is_initialized() else 1)


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every rank along dim 0, gradients flowing back to each
    rank's own slice (for methods with cross-batch negatives)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(t), dim=0)


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
