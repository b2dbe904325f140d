"""Process groups and rank discovery.

One `ParallelGroups` object is built once, after the default process group exists, and is
passed explicitly to everything that communicates. Nothing else creates process groups.

Layout (world W, expert-parallel size E): expert-parallel groups are blocks of E consecutive
ranks ([0..E-1], [E..2E-1], ...); data parallelism spans the whole world (every rank feeds its
own batch), so the student's ZeRO-3 partitioning and the teacher's EP groups both use `world`.
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ds_moekd.runtime.device import bind_device, collective_backend

# Launchers differ in how they name a process's place in the job; normalise to torch's names.
_RANK_SOURCES = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # deepspeed, torchrun
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI (hydra)
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),  # srun
)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    source: str


def discover_ranks(environ: dict[str, str] | None = None) -> RankInfo:
    """Read rank, world size and local rank from whichever launcher started this process."""
    env = os.environ if environ is None else environ
    for rank_key, size_key, local_key in _RANK_SOURCES:
        if rank_key in env and size_key in env:
            return RankInfo(
                rank=int(env[rank_key]),
                world_size=int(env[size_key]),
                local_rank=int(env.get(local_key, env.get("LOCAL_RANK", 0))),
                source=rank_key,
            )
    return RankInfo(rank=0, world_size=1, local_rank=0, source="single-process")


def export_rank_env(info: RankInfo) -> None:
    """Make an MPI/SLURM launch look like torchrun so torch.distributed's env:// init works.

    MASTER_ADDR defaults to loopback: a job spanning hosts must set it (the launch scripts do).
    """
    os.environ["RANK"] = str(info.rank)
    os.environ["WORLD_SIZE"] = str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(default_master_port(info)))


def default_master_port(info: RankInfo) -> int:
    """A single process takes any free loopback port (a fixed one collides with other jobs); ranks
    of a bigger job must agree without talking, so they fall back to 29500 (the launch scripts
    pick a free port and set MASTER_PORT; a port in use is reported by name, ds_moekd/run/errors.py)."""
    return 29500 if info.world_size > 1 else free_loopback_port()


def free_loopback_port() -> int:
    """A loopback port free right now (for a job this process launches or runs alone)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_collective_timeout_s = 600.0  # train.collective_timeout_s; DeepSpeed's own default is 30 minutes


def set_collective_timeout(seconds: float) -> None:
    """Timeout of every collective of the process group created next (a stalled peer then fails the
    others instead of blocking them); call before init_distributed."""
    global _collective_timeout_s
    _collective_timeout_s = seconds


def init_distributed(backend: str = "auto") -> RankInfo:
    """Bind this rank to its device, then start the default process group through DeepSpeed
    (idempotent; a single process works too). `backend` is `train.dist_backend`: auto talks NCCL
    between GPUs and gloo between CPU processes (ds_moekd/runtime/device.py)."""
    import deepspeed
    import deepspeed.comm

    info = discover_ranks()
    export_rank_env(info)
    device = bind_device(info.local_rank)
    if device.type == "cpu":
        # On the CPU accelerator DeepSpeed compiles a shared-memory all-reduce op at start-up
        # (1-2 minutes on a fresh machine); only DeepSpeed-inference's all-reduce uses it, so
        # training skips the build and talks gloo.
        # (`deepspeed.comm.torch` as an attribute is the torch package, hence import_module.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not deepspeed.comm.is_initialized():
        # deepspeed's own MPI discovery would overwrite MASTER_ADDR with the host's address;
        # the environment is already complete, so it is not needed.
        deepspeed.init_distributed(dist_backend=collective_backend(backend, device), auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=_collective_timeout_s))
    return info


def shutdown() -> None:
    """Tear the process group down before exit: left to interpreter exit, gloo's threads can
    abort the process ("terminate called without an active exception") after the work is done."""
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class ParallelGroups:
    """World, data-parallel and expert-parallel groups of one job."""

    rank: int
    world_size: int
    ep_size: int
    ep_rank: int
    ep_group: dist.ProcessGroup | None  # None when ep_size == 1
    world_group: dist.ProcessGroup | None  # None in a single process

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.world_group

    @property
    def dp_size(self) -> int:
        return self.world_size

    @property
    def dp_rank(self) -> int:
        return self.rank

    @classmethod
    def single(cls) -> ParallelGroups:
        return cls(rank=0, world_size=1, ep_size=1, ep_rank=0, ep_group=None, world_group=None)

    @classmethod
    def create(cls, ep_size: int = 0) -> ParallelGroups:
        """Build the groups; ep_size 0 means "the whole world". Every rank must call this."""
        if not dist.is_initialized():
            if ep_size not in (0, 1):
                raise ValueError(f"teacher.ep_size={ep_size} needs a distributed launch (world size is 1)")
            return cls.single()
        world_size, rank = dist.get_world_size(), dist.get_rank()
        ep = world_size if ep_size == 0 else ep_size
        if ep < 1 or world_size % ep != 0:
            raise ValueError(
                f"teacher.ep_size={ep_size} must divide the world size {world_size} "
                f"(choose one of {[d for d in range(1, world_size + 1) if world_size % d == 0]})"
            )
        my_ep_group = None
        for start in range(0, world_size, ep):  # new_group is collective: all ranks create all groups
            group = dist.new_group(list(range(start, start + ep))) if ep > 1 else None
            if start <= rank < start + ep:
                my_ep_group = group
        return cls(
            rank=rank,
            world_size=world_size,
            ep_size=ep,
            ep_rank=rank % ep,
            ep_group=my_ep_group,
            world_group=dist.group.WORLD,
        )


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over the group in place (no-op without a process group)."""
    if group is not None and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def reduce_scatter_sum(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`out` = this rank's block of `inp` (the group's blocks stacked along dim 0) summed over the
    group, like `reduce_scatter_tensor(op=SUM)`. Over gloo it runs as one all-to-all and a local
    sum in rank order: gloo's reduce-scatter is 2-4x slower than that (2 CPU ranks, 115k and 1M
    floats in: 1.5 ms against 0.43, 6.3 against 2.8; docs/scale-out.md). NCCL keeps its own."""
    if dist.get_backend(group) != "gloo":
        dist.reduce_scatter_tensor(out, inp, op=dist.ReduceOp.SUM, group=group)
        return out
    received = torch.empty_like(inp)
    dist.all_to_all_single(received, inp.contiguous(), group=group)
    torch.sum(received.view(-1, *out.shape), dim=0, out=out)
    return out


def any_rank(value: bool, group: dist.ProcessGroup | None) -> bool:
    """True on every rank when `value` is True on any rank of `group` (one all-reduce MAX): how
    ranks agree on stopping, skipping or failing together (docs/reliability.md)."""
    if group is None or not dist.is_initialized():
        return value
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    flag = torch.tensor([int(value)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())
