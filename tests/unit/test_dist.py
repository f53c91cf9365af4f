"""Distributed environment from torchrun / SLURM variables, and single-process collectives."""

import pytest

from pipeline import dist
from pipeline.dist import DistEnv, DistEnvError, expand_nodelist, read_dist_env


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[8-10],cpu5", ["gpu8", "gpu9", "gpu10", "cpu5"]),
    ("a[1-2]-b[01-02]", ["a1-b01", "a1-b02", "a2-b01", "a2-b02"]),
    ("x[098-101]", ["x098", "x099", "x100", "x101"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-", "node[3-1]", "node[a-b]", ""])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(DistEnvError):
        expand_nodelist(bad)


def test_torchrun_variables():
    env = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                         "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert env == DistEnv(rank=3, world_size=8, local_rank=1, master_addr="h0", master_port=1234)
    assert env.is_distributed


def test_slurm_variables_pick_first_node_as_master(monkeypatch):
    monkeypatch.setattr(dist.shutil, "which", lambda name: None)  # no scontrol: parse here
    env = read_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                         "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert env.master_addr == "gpu07"
    assert env.master_port == 20000 + 4242


def test_torchrun_wins_over_slurm():
    env = read_dist_env({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"})
    assert env.world_size == 2


def test_no_variables_is_one_process():
    assert read_dist_env({}) == DistEnv()


@pytest.mark.parametrize("variables, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "outside 0..1"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "not an integer"),
])
def test_bad_variables_are_clear_errors(variables, message):
    with pytest.raises(DistEnvError, match=message):
        read_dist_env(variables)


def test_single_process_collectives_are_identities():
    assert not dist.is_initialized()
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.is_main()
    assert dist.all_reduce_sum(2.5) == 2.5
    assert dist.all_reduce_mean_dict({"a": 1.0}) == {"a": 1.0}
    assert dist.any_rank(True) and not dist.any_rank(False)
    assert dist.broadcast_object({"x": 1}) == {"x": 1}
    assert dist.all_gather_object(7) == [7]
    dist.barrier()
    dist.shutdown()


def _two_rank_worker(rank: int, port: int, results) -> None:
    env = DistEnv(rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port)
    dist.init_distributed(env, backend="gloo")
    try:
        results.put((rank, {
            "any": dist.any_rank(rank == 1),
            "none": dist.any_rank(False),
            "mean": dist.all_reduce_mean_dict({"loss": float(rank), "acc": 2.0 * rank}),
            "broadcast": dist.broadcast_object({"from": rank}),
            "gathered": dist.all_gather_object(rank * 10),
            "main": dist.is_main(),
        }))
    finally:
        dist.shutdown()


@pytest.mark.dist
def test_collectives_agree_across_two_real_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_two_rank_worker, args=(r, port, results)) for r in (0, 1)]
    for process in processes:
        process.start()
    got = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for rank in (0, 1):
        assert got[rank]["any"] is True and got[rank]["none"] is False
        assert got[rank]["mean"] == {"loss": 0.5, "acc": 1.0}
        assert got[rank]["broadcast"] == {"from": 0}
        assert got[rank]["gathered"] == [0, 10]
        assert got[rank]["main"] is (rank == 0)
