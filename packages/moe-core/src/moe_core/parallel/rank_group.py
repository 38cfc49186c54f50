"""The processes of one expert-parallel model: their torch.distributed groups.

Each rank is one process with one device. Two groups join them:

- the data group (the default process group): NCCL between GPUs, gloo on the CPU (tests). It
  carries one all-reduce of the MoE output per MoE layer (`ExpertParallelExecutor`);
- the control group: always gloo, on the host. It carries small Python objects from rank 0 to
  the others (what to run next) and the start-up barrier, without touching a GPU stream, and
  its long timeout lets the other ranks wait for rank 0's next step as long as a server idles.

NVLink multicast (NVLS) stays off on every rank (`NCCL_NVLS_ENABLE=0`): the H200 machines here
must never enable it, and an all-reduce of one hidden state per layer does not need it.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["RankGroup", "free_port", "join_ranks"]

_CONTROL_TIMEOUT = timedelta(days=365)  # a server may idle for long between requests


class RankGroup:
    """This process's place among the ranks, and the collectives the runtime needs.

    Attributes:
        rank: This process's rank (0 leads).
        world_size: Number of ranks.
        device: This rank's compute device.
        backend: The data group's backend (`nccl` or `gloo`).
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, backend: str,
                 control: dist.ProcessGroup, threads_before: int | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.backend = backend
        self._control = control
        self._threads_before = threads_before

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place (the same result on every rank)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def broadcast(self, obj: object = None) -> object:
        """Rank 0's `obj` (pickled over the control group), on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def barrier(self, timeout_s: float) -> None:
        """Wait until every rank is here.

        Raises:
            RuntimeError: a rank did not arrive within `timeout_s` (it is named).
        """
        dist.monitored_barrier(group=self._control, timeout=timedelta(seconds=timeout_s),
                               wait_all_ranks=True)

    def close(self) -> None:
        """Leave the groups (the process can join others afterwards) and give torch back the
        threads it had."""
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None


def join_ranks(rank: int, world_size: int, port: int, device: str | torch.device,
               timeout_s: float = 300.0) -> RankGroup:
    """Join the `world_size` ranks meeting at 127.0.0.1:`port` (rank 0 listens there).

    Blocks until every rank has joined. NCCL for CUDA devices (with NVLink multicast off),
    gloo for the CPU. `timeout_s` bounds the meeting and each all-reduce. CPU ranks share the
    machine's cores, so each takes its share of torch's threads until `close`: oversubscribed
    ranks wait for each other at every all-reduce (two ranks on two cores, two threads each,
    ran a serving step 13x slower than with one thread each).

    Raises:
        ValueError: a rank outside 0..world_size-1.
        RuntimeError: the ranks did not meet in time (torch.distributed's error).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    device = torch.device(device)
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast (see the module docstring)
    backend = "nccl" if device.type == "cuda" else "gloo"
    threads_before = None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, threads_before // world_size))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
    if not isinstance(control, dist.ProcessGroup):  # every rank is a member
        raise RuntimeError(f"rank {rank} is not in the control group")
    return RankGroup(rank, world_size, device, backend, control, threads_before)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for rank 0 to listen on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
