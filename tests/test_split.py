"""Solves shared out among processes by row blocks (``tlq_hf.solvers.split``): the same bits as one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tlq_hf.qtypes import QuantScheme
from tlq_hf.solvers import gptq_factor, gptq_quantize
from tlq_hf.solvers.gptq import _cholesky_lower_
from tlq_hf.solvers.split import RowSplit, current_split, sharing


def _problem(n: int = 640, out: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 50, n, generator=gen) * torch.linspace(0.2, 3.0, n)
    hessian = x.T @ x / x.shape[0]
    hessian[:, 7] = hessian[7, :] = 0  # a dead input channel
    return hessian, torch.randn(out, n, generator=gen).to(torch.bfloat16)


@pytest.mark.parametrize("n", [5, 256, 700])
def test_blocked_cholesky_is_the_cholesky_factor_with_zeros_above(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n + 10, n, generator=gen, dtype=torch.float64)
    a = x.T @ x + torch.eye(n, dtype=torch.float64)
    m = a.clone()
    _cholesky_lower_(m, block=128)
    torch.testing.assert_close(m, torch.linalg.cholesky(a), rtol=1e-10, atol=1e-10)
    assert torch.equal(m, m.tril())


def test_a_split_is_only_in_force_inside_sharing():
    split = RowSplit(1, 3, lambda t, src: None)
    assert current_split().world == 1
    with sharing(split):
        assert current_split() is split and [split.owner(k) for k in range(4)] == [0, 1, 2, 0]
        assert split.mine(4) and not split.mine(5)
    assert current_split().world == 1
    with pytest.raises(ValueError, match="broadcast"):
        RowSplit(0, 2).share([(torch.zeros(2), 1)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        hessian, weight = _problem()
        scheme = QuantScheme(bits=4, group_size=128)

        def solve() -> tuple[torch.Tensor, ...]:
            factor = gptq_factor(hessian, damp=0.01, act_order=True)
            codes, qp = gptq_quantize(weight, factor, scheme, scale_dtype=torch.bfloat16)
            return factor.hinv, codes, qp.scale, qp.zero

        def broadcast(t: torch.Tensor, src: int) -> None:
            dist.broadcast(t, src)

        alone = solve()
        with sharing(RowSplit(rank, world, broadcast)):
            shared = solve()
        results[rank] = (alone, shared)
    finally:
        dist.destroy_process_group()


def test_a_factorisation_and_sweep_shared_by_two_processes_equal_one_process_bit_for_bit():
    """Two gloo ranks, each computing its own row blocks of the blocked Cholesky, the triangular inverse and the
    GPTQ sweep, end with the one-process factor and codes exactly (every block computed by one rank as one process
    computes it)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(2, _free_port(), results), nprocs=2, join=True)
        (alone0, shared0), (alone1, shared1) = results[0], results[1]
        assert all(torch.equal(a, b) for a, b in zip(alone0, alone1))  # the same inputs give the same one-process run
    for a, s0, s1 in zip(alone0, shared0, shared1):
        assert torch.equal(a, s0) and torch.equal(a, s1)


def test_the_scheduler_shares_a_group_costing_more_than_an_equal_share_and_bounds_what_a_rank_holds(monkeypatch):
    from torch import nn

    from tlq_hf.calibration import schedule
    from tlq_hf.calibration.distributed import Comm
    from tlq_hf.calibration.schedule import EVERY_RANK, SolveScheduler

    two, one = SolveScheduler(Comm(0, 2)), SolveScheduler(Comm())
    costs = [1.0, 1.0, 10.0, 1.0]
    assert two.owners(costs, [True] * 4)[2] == EVERY_RANK
    assert EVERY_RANK not in two.owners(costs, [True, True, False, True])  # its solver cannot share rows
    assert EVERY_RANK not in one.owners(costs, [True] * 4)  # alone there is nobody to share with
    assert sorted(two.owners([1.0, 1.0, 1.0, 1.0], [True] * 4)) == [0, 0, 1, 1]
    linears = [[nn.Linear(8, 4)], [nn.Linear(8, 4), nn.Linear(8, 4)], [nn.Linear(8, 8)], [nn.Linear(8, 2)]]
    monkeypatch.setattr(schedule, "AHEAD_BYTES", 80)
    assert one.windows(linears) == [[0], [1], [2], [3]]
    assert two.windows(linears) == [[0], [1], [2, 3]]  # codes of 32, 64, 64 and 16 bytes; at most 80 per window
