"""Calibration over several processes: windows sharded by rank, statistics summed with collectives.

Launched with ``accelerate launch [--num_processes N] -m kvquant calibrate …`` (or ``torchrun``):
``accelerate.PartialState`` sets up ``torch.distributed`` (gloo on the CPU, NCCL on GPUs). Every
statistic calibration keeps is a sum over windows — the pair sums of :class:`~kvquant.core.stats.PairStats`,
the histograms and Fisher weights of :class:`~kvquant.core.groupnorm.GroupHistogram` — except the
running absolute maxima, so process r captures windows r, r+N, r+2N, … and an ``all_reduce``
(SUM, MAX for the maxima) gives every process the statistics of all windows; each then builds the
same codebooks and only the main process writes the file. Without a process group (one process)
everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import fields

import torch
import torch.distributed as dist

from kvquant.core.groupnorm import GroupHistogram
from kvquant.core.stats import PairStats

#: Statistics reduced with MAX instead of SUM.
_MAXIMA = {"absmax_q", "absmax_k"}


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(ids: torch.Tensor) -> torch.Tensor:
    """This process's windows of ``ids`` (n, seqlen): rows rank, rank + N, … (all rows in one
    process). Raises when there are fewer windows than processes."""
    rank, size = world()
    if size > 1 and len(ids) < size:
        raise ValueError(f"{len(ids)} calibration windows cannot be shared by {size} processes: give --samples >= {size}")
    return ids[rank::size]


def init(device: str = "cpu") -> str:
    """Join the process group a launcher (``accelerate launch``, ``torchrun``) describes in the
    environment (``WORLD_SIZE`` > 1), through ``accelerate.PartialState``: gloo for ``cpu``, NCCL
    for CUDA. Returns the device this process computes on (``cuda`` → ``cuda:<local rank>``);
    without a launcher nothing happens and ``device`` is returned as is."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return f"cuda:{state.local_process_index}" if device == "cuda" else device


def _all_reduce(t: torch.Tensor, op) -> None:
    if dist.get_backend() == "nccl" and not t.is_cuda:  # NCCL reduces CUDA tensors only
        x = t.cuda()
        dist.all_reduce(x, op=op)
        t.copy_(x.cpu())
    else:
        dist.all_reduce(t, op=op)


def reduce_statistics(stats: PairStats, hists: dict[tuple, GroupHistogram]) -> None:
    """In place: every process's ``stats`` and ``hists`` become the sums (maxima) over all
    processes (float64, so the order of the sum changes them by rounding only)."""
    if world()[1] == 1:
        return
    for name, t in stats.to_dict().items():
        _all_reduce(t, dist.ReduceOp.MAX if name in _MAXIMA else dist.ReduceOp.SUM)
    for hist in hists.values():
        for f in fields(hist):
            t = getattr(hist, f.name)
            if torch.is_tensor(t):
                _all_reduce(t, dist.ReduceOp.SUM)


def is_main() -> bool:
    """True in the process that writes files and prints (rank 0, or the only process)."""
    return world()[0] == 0


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if world()[1] > 1:
        dist.barrier()
