"""Rank, world size and local rank from torchrun/deepspeed's variables, else SLURM's."""

from __future__ import annotations

import os

import pytest

from offline_kd.runtime.launcher import export_slurm_env, first_host, launcher_env

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST",
              "SLURM_STEP_NODELIST")  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; whatever a test sets (export_slurm_env too) is undone afterwards."""
    for var in LAUNCH_VARS + SLURM_VARS:
        monkeypatch.setenv(var, "")  # records the original value (or its absence) for teardown
        monkeypatch.delenv(var)
    return monkeypatch


def _srun_task(monkeypatch, rank: int, ntasks: int, local: int, job: str = "4242") -> None:
    for var, value in dict(
        SLURM_PROCID=rank, SLURM_NTASKS=ntasks, SLURM_LOCALID=local, SLURM_JOB_ID=job,
        SLURM_JOB_NODELIST="gpu[07-08]", SLURM_STEP_NODELIST="gpu[07-08]",
    ).items():  # fmt: skip
        monkeypatch.setenv(var, str(value))


def test_no_launcher_is_rank_0_of_1(clean_env):
    assert launcher_env().rank == 0 and launcher_env().world_size == 1 and launcher_env().source == "none"
    assert not export_slurm_env() and "RANK" not in os.environ


def test_slurm_task(clean_env):
    _srun_task(clean_env, rank=11, ntasks=16, local=3)
    env = launcher_env()
    assert (env.rank, env.world_size, env.local_rank, env.source) == (11, 16, 3, "slurm")


def test_torch_variables_win_over_slurm(clean_env):
    """torchrun started inside an srun task: its own variables describe the process group."""
    _srun_task(clean_env, rank=1, ntasks=2, local=1)
    for var, value in dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="5").items():
        clean_env.setenv(var, value)
    env = launcher_env()
    assert (env.rank, env.world_size, env.local_rank, env.source) == (5, 8, 5, "torch")
    assert not export_slurm_env()


def test_export_slurm_env_for_training(clean_env):
    _srun_task(clean_env, rank=9, ntasks=16, local=1, job="123456")
    assert export_slurm_env()
    assert [os.environ[v] for v in LAUNCH_VARS] == ["9", "16", "1", "gpu07", str(20000 + 123456 % 20000)]


def test_export_keeps_a_chosen_rendezvous(clean_env):
    _srun_task(clean_env, rank=0, ntasks=2, local=0)
    clean_env.setenv("MASTER_ADDR", "10.0.0.5")
    clean_env.setenv("MASTER_PORT", "29501")
    export_slurm_env()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.5", "29501")


@pytest.mark.parametrize(
    "nodelist, host",
    [("node1", "node1"), ("gpu[03-05,9],cpu1", "gpu03"), ("a-b[1,4]", "a-b1"), ("x1,x2", "x1"),
     ("n[0012-0020]", "n0012")],
)  # fmt: skip
def test_first_host_of_a_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_precompute_rank_from_slurm(clean_env):
    from offline_kd.runtime.distributed import rank_and_world

    _srun_task(clean_env, rank=1, ntasks=2, local=1)
    assert rank_and_world(None, None) == (1, 2)
    assert rank_and_world(0, 4) == (0, 4)  # explicit --rank/--world-size win
