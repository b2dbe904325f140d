import pytest
import torch.distributed as dist

from ds_moekd.runtime.dist import ParallelGroups, discover_ranks


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1, "RANK")),
        ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
         (2, 4, 0, "OMPI_COMM_WORLD_RANK")),
        ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, (1, 2, 1, "PMI_RANK")),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}, (5, 16, 5, "SLURM_PROCID")),
        ({}, (0, 1, 0, "single-process")),
    ],
)
def test_rank_discovery_for_each_launcher(env, expected):
    info = discover_ranks(env)
    assert (info.rank, info.world_size, info.local_rank, info.source) == expected


def test_launcher_variables_win_over_scheduler_ones():
    # torchrun inside a SLURM allocation: the launcher's own RANK is the truth
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert discover_ranks(env).rank == 1


def _groups_on_rank(ep_size):
    g = ParallelGroups.create(ep_size=ep_size)
    members = None
    if g.ep_group is not None:
        members = dist.get_process_group_ranks(g.ep_group)
    return g.rank, g.world_size, g.ep_size, g.ep_rank, members


def test_groups_on_two_ranks(rank_pool2):
    assert rank_pool2.run(_groups_on_rank, 0) == [(0, 2, 2, 0, [0, 1]), (1, 2, 2, 1, [0, 1])]
    assert rank_pool2.run(_groups_on_rank, 1) == [(0, 2, 1, 0, None), (1, 2, 1, 0, None)]


def _bad_ep_size(ep_size):
    try:
        ParallelGroups.create(ep_size=ep_size)
    except ValueError as exc:
        return str(exc)
    return None


def test_ep_size_must_divide_world(rank_pool2):
    messages = rank_pool2.run(_bad_ep_size, 3)
    assert all("teacher.ep_size=3 must divide the world size 2" in m for m in messages)


def test_single_process_rejects_expert_parallelism():
    with pytest.raises(ValueError, match="needs a distributed launch"):
        ParallelGroups.create(ep_size=2)
