"""pipeline.group.Group, the one reader of torchrun's environment: rank, world, local rank, the
leader, this rank's device, and one-line errors for a launch the ranks cannot meet in.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_group.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline.errors import StageError
from pipeline.group import Group

LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    for key in LAUNCH:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_without_a_launcher_it_is_a_group_of_one(env):
    group = Group.from_env()
    assert group == Group(rank=0, world=1, local_rank=0) and group.leader
    assert group.join() is group and not dist.is_initialized()      # nothing to join
    group.barrier()
    assert group.all_sum([1, 2.5]) == [1.0, 2.5] and group.leader_says(True)


def test_torchrun_environment_is_read(env):
    env.setenv("WORLD_SIZE", "4"), env.setenv("RANK", "3"), env.setenv("LOCAL_RANK", "1")
    group = Group.from_env()
    assert group == Group(rank=3, world=4, local_rank=1) and not group.leader
    env.setenv("WORLD_SIZE", "1")                  # a launch of one: rank 0 of 1 whatever RANK says
    assert Group.from_env() == Group()


@pytest.mark.parametrize("sets, message", [
    ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK / WORLD_SIZE / LOCAL_RANK must be integers"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is outside WORLD_SIZE=2"),
])
def test_a_bad_launch_environment_is_one_line(env, sets, message):
    for key, value in sets.items():
        env.setenv(key, value)
    with pytest.raises(StageError, match=message):
        Group.from_env()


def test_joining_without_a_meeting_point_names_what_is_missing(env):
    env.setenv("WORLD_SIZE", "2"), env.setenv("RANK", "1"), env.setenv("MASTER_ADDR", "localhost")
    with pytest.raises(StageError, match="WORLD_SIZE=2 but MASTER_PORT not set"):
        Group.from_env().join()
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_device_without_cuda_is_the_cpu(env):
    env.setenv("WORLD_SIZE", "2"), env.setenv("RANK", "1"), env.setenv("LOCAL_RANK", "1")
    assert Group.from_env().device() == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_with_cuda_is_the_local_rank_made_current(env):
    env.setenv("WORLD_SIZE", "2"), env.setenv("RANK", "1"), env.setenv("LOCAL_RANK", "0")
    assert Group.from_env().device() == torch.device("cuda:0")
    assert torch.cuda.current_device() == 0
