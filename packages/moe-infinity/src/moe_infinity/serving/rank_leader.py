"""Rank 0 of an expert-parallel server: it starts the other ranks, orders their passes and stops
them (decision 0013).

One process per device: rank 0 is the server process itself (HTTP, scheduling, sampling,
tracing, its own shard of the experts); ranks 1..R-1 are started here (`python -m
moe_infinity.serving.rank_worker`, their arguments pickled on stdin: a fresh interpreter, as
CUDA needs, without re-running the parent's main module as multiprocessing's spawn would), meet
rank 0 on a free port of 127.0.0.1, load the same model with their own shard, and then follow
rank 0's passes (`followers.follow`). They run in a session of their own and ignore SIGINT and
SIGTERM: the server's shutdown (grace period, cancelled streams, saved traces) keeps them
running until rank 0 tells them to stop; a rank whose leader is gone exits by itself.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from moe_core import (
    ExpertId,
    ExpertShardPlan,
    ModelSpec,
    RankGroup,
    free_port,
    install_expert_parallel,
    join_ranks,
)

from moe_infinity.collection import TraceCollection
from moe_infinity.errors import MoEInfinityError
from moe_infinity.policies import ActivationAwarePolicy
from moe_infinity.serving.followers import PassOrder, PoolShape
from moe_infinity.serving.kv_pool import KVPool
from moe_infinity.serving.ragged_pass import PassRow
from moe_infinity.serving.serving_model import ServingModel

if TYPE_CHECKING:
    from moe_infinity.serving.engine_setup import EngineSettings

__all__ = ["STARTUP_TIMEOUT_S", "RankLeader", "shard_plan", "while_ranks_run"]

STARTUP_TIMEOUT_S = 600.0
"""How long rank 0, its own shard loaded, waits for the other ranks to load theirs."""
_EXIT_WAIT_S = 30.0
_POLL_S = 0.2
_T = TypeVar("_T")


def shard_plan(spec: ModelSpec, collection: TraceCollection, num_ranks: int
               ) -> ExpertShardPlan:
    """Who owns which expert: balanced by the trace collection's activation counts when it has
    traces (hot experts spread over the ranks' links), else round robin."""
    layers = list(spec.moe_layers)
    if len(collection):
        return ExpertShardPlan.balanced(layers, collection.counts.sum(axis=0), num_ranks)
    return ExpertShardPlan.round_robin(layers, spec.moe.num_experts, num_ranks)


class RankLeader:
    """Rank 0's handle on the other ranks (the engine's `PassFollowers`).

    Attributes:
        plan: Who owns which expert.
        group: Rank 0's membership of the ranks.
    """

    def __init__(self, plan: ExpertShardPlan, group: RankGroup,
                 processes: list[subprocess.Popen[bytes]]) -> None:
        self.plan = plan
        self.group = group
        self._processes = processes  # rank r is _processes[r - 1]
        self._policy: ActivationAwarePolicy | None = None
        self._need_sent: np.ndarray | None = None
        self._broken: str | None = None
        self._closed = False

    @classmethod
    def start(cls, settings: EngineSettings, plan: ExpertShardPlan) -> RankLeader:
        """Start ranks 1.. on `settings.rank_devices[1:]` and join them as rank 0.

        Raises:
            MoEInfinityError: a rank exited before it joined (its own error is on stderr), or
                the ranks could not meet.
        """
        port = free_port()
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}  # never NVLink multicast
        processes: list[subprocess.Popen[bytes]] = []
        try:
            for rank in range(1, plan.num_ranks):
                process = subprocess.Popen(
                    [sys.executable, "-m", "moe_infinity.serving.rank_worker"],
                    stdin=subprocess.PIPE, env=env, start_new_session=True)
                processes.append(process)
                assert process.stdin is not None
                with process.stdin as arguments:
                    pickle.dump((rank, settings, plan, port, os.getpid()), arguments)
            group = while_ranks_run(processes, lambda: join_ranks(
                0, plan.num_ranks, port, settings.rank_devices[0]), "joined")
        except RuntimeError as exc:  # torch.distributed's (a port taken meanwhile, a timeout)
            _stop(processes, wait_s=0)
            raise MoEInfinityError(f"the {plan.num_ranks} ranks could not meet on "
                                   f"127.0.0.1:{port}: {exc}") from None
        except BaseException:
            _stop(processes, wait_s=0)
            raise
        return cls(plan, group, processes)

    @property
    def owned(self) -> list[ExpertId]:
        """Rank 0's experts."""
        return self.plan.owned(0)

    def attach(self, served: ServingModel) -> None:
        """Rank 0's model is loaded with its shard: sum its MoE outputs with the other ranks'."""
        install_expert_parallel(served.model, self.plan, self.group)
        policy = served.policy
        self._policy = policy if isinstance(policy, ActivationAwarePolicy) else None

    def ready(self, pool: KVPool) -> None:
        """Hand the other ranks rank 0's KV pool shape and wait until each has loaded its
        shard and built its pool.

        Raises:
            MoEInfinityError: a rank exited while loading, or did not finish in time.
        """
        shape = PoolShape(pool.num_blocks, pool.block_tokens)
        while_ranks_run(self._processes, lambda: self.group.broadcast(shape), "loaded")
        try:
            while_ranks_run(self._processes, lambda: self.group.barrier(STARTUP_TIMEOUT_S),
                           "loaded")
        except RuntimeError as exc:  # the barrier names the late rank
            raise MoEInfinityError(f"the ranks did not all load the model within "
                                   f"{STARTUP_TIMEOUT_S:.0f} s: {exc}") from None

    @property
    def pids(self) -> list[int]:
        """The process ids of ranks 1.."""
        return [p.pid for p in self._processes]

    @property
    def exit_codes(self) -> list[int | None]:
        """The exit status of ranks 1.. (None while one runs)."""
        return [p.poll() for p in self._processes]

    @property
    def is_alive(self) -> bool:
        """Every rank runs and they are in step."""
        return (self._broken is None and not self._closed
                and all(p.poll() is None for p in self._processes))

    def run(self, rows: list[PassRow], local: Callable[[], torch.Tensor]) -> torch.Tensor:
        """See `PassFollowers.run`.

        Raises:
            MoEInfinityError: a rank has exited, or an earlier pass failed part-way (the ranks'
                all-reduces no longer pair up; the server must be restarted).
        """
        if self._broken is not None:
            raise MoEInfinityError(self._broken)
        for rank, process in enumerate(self._processes, start=1):
            if process.poll() is not None:
                self._broken = (f"rank {rank} exited (status {process.returncode}); restart "
                                "the server")
                raise MoEInfinityError(self._broken)
        need = None
        if self._policy is not None and self._policy.need is not self._need_sent:
            need = self._need_sent = self._policy.need
        self.group.broadcast(PassOrder(tuple(rows), need))
        try:
            return local()
        except BaseException:
            self._broken = "a pass failed part-way on rank 0; the ranks are out of step"
            raise

    def close(self) -> None:
        """Tell the other ranks to stop, wait for them (killing any that hang), leave the
        group. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._broken is None and all(p.poll() is None for p in self._processes):
            with contextlib.suppress(RuntimeError):  # a rank went away meanwhile: see below
                self.group.broadcast(None)
        _stop(self._processes, _EXIT_WAIT_S)
        self.group.close()


def while_ranks_run(processes: list[subprocess.Popen[bytes]], work: Callable[[], _T],
                    doing: str) -> _T:
    """Run `work` (a blocking collective) on a helper thread; if a rank exits meanwhile, fail at
    once instead of waiting for torch.distributed's timeout."""
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="moe-infinity-rank-wait", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(_POLL_S)
        for rank, process in enumerate(processes, start=1):
            if thread.is_alive() and process.poll() is not None:
                raise MoEInfinityError(f"rank {rank} exited (status {process.returncode}) "
                                       f"before it {doing}; its error is above")
    if error:
        raise error[0]
    return result[0]


def _stop(processes: list[subprocess.Popen[bytes]], wait_s: float) -> None:
    """Wait for the ranks to exit; kill those still running after `wait_s`."""
    for process in processes:
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
