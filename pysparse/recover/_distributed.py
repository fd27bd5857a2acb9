"""recover under torch.distributed: DistributedDataParallel and sharded data.

How the data is sharded (as PyTorch Lightning does it, so a script written for one process
runs unchanged under torchrun):
- a DataLoader whose sampler is a DistributedSampler is used as given (recover calls its
  ``set_epoch`` every epoch);
- a DataLoader over a map-style dataset with the default sampler (sequential, or random
  with shuffle=True) is rebuilt with a DistributedSampler (shuffle as before, seed 0,
  drop_last as before) and the same per-process batch_size, collate_fn and workers: each
  process sees 1/world of every epoch, the global batch is world * batch_size;
- any other iterable (a list of batches, an IterableDataset) is taken as this process's
  own shard: the user splits it (every process must give the same number of batches).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shard(data: Iterable[Any]) -> Iterable[Any]:
    """``data`` as this process's shard (see the module doc)."""
    if not is_distributed() or not isinstance(data, DataLoader):
        return data
    if isinstance(data.sampler, DistributedSampler):
        return data
    if not isinstance(data.sampler, (SequentialSampler, RandomSampler)) or data.batch_size is None:
        raise ValueError("data: under torch.distributed, recover shards a DataLoader with the default sampler "
                         "(shuffle=True/False) and a batch_size; this one has a custom sampler or batch_sampler: "
                         "give it a torch.utils.data.DistributedSampler yourself")
    sampler = DistributedSampler(data.dataset, shuffle=isinstance(data.sampler, RandomSampler), seed=0,
                                 drop_last=data.drop_last)
    return DataLoader(data.dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.num_workers,
                      collate_fn=data.collate_fn, pin_memory=data.pin_memory, drop_last=data.drop_last,
                      timeout=data.timeout, worker_init_fn=data.worker_init_fn,
                      persistent_workers=data.persistent_workers if data.num_workers else False)


def set_epoch(data: Iterable[Any], epoch: int) -> None:
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def wrap(module: nn.Module, device: torch.device, like: Any = None) -> nn.Module:
    """``module`` in DistributedDataParallel (the settings of ``like``, the user's DDP, if any)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    kw = {}
    if isinstance(like, DDP):
        kw = {"find_unused_parameters": like.find_unused_parameters, "broadcast_buffers": like.broadcast_buffers}
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DDP(module, device_ids=ids, **kw)


def check_same_length(n: int) -> None:
    """Every process must step alike (DDP's all-reduce waits for all): compare batch counts."""
    if not is_distributed():
        return
    t = torch.tensor([n, -n], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    if int(t[0]) != n or int(-t[1]) != n:
        raise ValueError(f"data: the processes have different numbers of batches (this one {n}, between "
                         f"{int(-t[1])} and {int(t[0])}): shard the data evenly (a DistributedSampler does)")
