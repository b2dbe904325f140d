"""The rank-pool harness itself: collectives work, results come back by rank, failures surface."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from helpers.multirank import RankError, RankPool, RankTimeout

pytestmark = pytest.mark.slow  # real processes (tests/conftest.py: full tier)


def _all_reduce_rank_squares(offset: int) -> dict:
    rank = dist.get_rank()
    value = torch.tensor([float(rank * rank + offset)])
    dist.all_reduce(value)
    return {
        "rank": rank,
        "env_rank": int(os.environ["RANK"]),
        "sum": value.item(),
        "threads": torch.get_num_threads(),
        "accelerator": os.environ["DS_ACCELERATOR"],
    }


def _fail_on_rank_one_then_collective() -> int:
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 now waits for rank 1, which never arrives
    return dist.get_rank()


def _hang_in_collective() -> None:
    if dist.get_rank() == 0:
        dist.barrier()


@pytest.fixture(scope="module")
def scratch_pool():
    """A pool of its own for the failure tests: each failure restarts the workers, and the
    session pool should keep its warm workers (modules already imported) for everyone else."""
    with RankPool(2) as pool:
        yield pool


def test_all_reduce_results_ordered_by_rank(rank_pool2):
    results = rank_pool2.run(_all_reduce_rank_squares, 1)
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["env_rank"] for r in results] == [0, 1]
    assert all(r["sum"] == (0 + 1) + (1 + 1) for r in results)
    assert all(r["threads"] == 1 and r["accelerator"] == "cpu" for r in results)


def test_exception_carries_rank_traceback_and_pool_recovers(scratch_pool):
    with pytest.raises(RankError) as info:
        scratch_pool.run(_fail_on_rank_one_then_collective)
    message = str(info.value)
    assert "rank 1 (error)" in message and "deliberate failure on rank 1" in message
    assert "_fail_on_rank_one_then_collective" in message  # the rank's own traceback
    # The pool restarted its workers: collectives work again.
    assert [r["sum"] for r in scratch_pool.run(_all_reduce_rank_squares, 0)] == [1.0, 1.0]


def test_hung_collective_times_out(scratch_pool):
    with pytest.raises(RankTimeout, match="rank 0 did not finish"):
        scratch_pool.run(_hang_in_collective, timeout_s=2)
    assert len(scratch_pool.run(_all_reduce_rank_squares, 0)) == 2


def test_lambda_is_rejected_with_a_clear_error(scratch_pool):
    with pytest.raises(TypeError, match="module-level function"):
        scratch_pool.run(lambda: 0)
