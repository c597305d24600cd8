"""A tensor-parallel group: N processes on one host, a TCP store on 127.0.0.1, gloo (CPU) or NCCL (CUDA) for the
partial sums and gloo for the control messages (pickled objects, rank 0 to the others). Its own process-group
objects: the torch.distributed default group stays the user's."""

from __future__ import annotations

import pickle
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TPGroup:
    def __init__(self, rank: int, size: int, port: int, device: torch.device, timeout_s: float = 600):
        self.rank, self.size = rank, size
        store = dist.TCPStore("127.0.0.1", port, size, rank == 0, timedelta(seconds=timeout_s))
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size,
                                             timedelta(seconds=timeout_s))
        if device.type == "cuda":
            self.sums = dist.ProcessGroupNCCL(dist.PrefixStore("sums", store), rank, size)
        else:
            self.sums = self.control

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the group, in place (every rank gets the same sum)."""
        self.sums.allreduce([x]).wait()
        return x

    def broadcast_object(self, obj=None):
        """Rank 0's obj on every rank (rank 0 passes it, the others receive it)."""
        return broadcast_object(self.control, self.rank, obj)


def broadcast_object(control, rank: int, obj=None):
    """obj pickled from rank 0 to every rank of the gloo group `control`."""
    if rank == 0:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    control.broadcast(size, 0).wait()
    if rank != 0:
        data = torch.empty(int(size), dtype=torch.uint8)
    control.broadcast(data, 0).wait()
    return obj if rank == 0 else pickle.loads(data.numpy().tobytes())
