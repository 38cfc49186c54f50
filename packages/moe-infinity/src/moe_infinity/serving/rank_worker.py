"""A rank other than 0 of an expert-parallel server: the body of the process rank 0 starts
(`python -m moe_infinity.serving.rank_worker`, its arguments pickled on stdin).

It joins the ranks, loads the model with its own shard of the experts on its own device (the
same settings as rank 0, so the same dense weights, dtype and cache policy), copies rank 0's KV
pool shape, and follows rank 0's passes until told to stop. A user mistake is one `error:` line
on stderr and exit status 1; rank 0 then reports that this rank exited.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import replace

from moe_core import (
    ExpertShardPlan,
    ModelSpec,
    MoEError,
    cache_plan,
    install_expert_parallel,
    join_ranks,
    resolve_model_path,
)

from moe_infinity.serving.engine_setup import EngineSettings, load_rank_model
from moe_infinity.serving.followers import PoolShape, follow
from moe_infinity.serving.kv_pool import KVPool
from moe_infinity.serving.rank_leader import STARTUP_TIMEOUT_S

__all__ = ["follower_main"]

_LEADER_POLL_S = 1.0


def follower_main(rank: int, settings: EngineSettings, plan: ExpertShardPlan, port: int,
                  leader_pid: int) -> None:
    """Rank `rank`'s process: join, load, follow, exit (status 1 on an error)."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0's shutdown decides when to stop
        signal.signal(sig, signal.SIG_IGN)
    _exit_with_leader(leader_pid)
    device = settings.rank_devices[rank]
    group = join_ranks(rank, plan.num_ranks, port, device)
    try:
        spec = settings.experts.spec_of(
            ModelSpec.from_pretrained(resolve_model_path(settings.model, weights=False)))
        prefetcher = cache_plan("lru", settings.prefetch, spec).prefetcher
        served = load_rank_model(replace(settings, device=device), prefetcher,
                                 plan.owned(rank))
        install_expert_parallel(served.model, plan, group)
        shape = group.broadcast()
        if shape is None:  # rank 0 failed to start (its error is its own line): stop here
            return
        if not isinstance(shape, PoolShape):
            raise TypeError(f"rank {rank} expected the KV pool's shape, got {shape!r}")
        pool = KVPool(served.model.spec, shape.num_blocks, shape.block_tokens,
                      served.model.dtype, served.model.device)
        group.barrier(STARTUP_TIMEOUT_S)
        follow(served, pool, group)
    except MoEError as exc:
        print(f"error: rank {rank} ({device}): {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        group.close()


def _exit_with_leader(leader_pid: int) -> None:
    """Exit when rank 0's process is gone (killed, crashed): this rank may be waiting in a
    collective that would otherwise wait for its timeout."""

    def watch() -> None:
        while os.getppid() == leader_pid:
            time.sleep(_LEADER_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="moe-infinity-leader-watch", daemon=True).start()


def main() -> None:
    """Read `follower_main`'s arguments from stdin (pickled by rank 0) and run it."""
    rank, settings, plan, port, leader_pid = pickle.load(sys.stdin.buffer)
    follower_main(rank, settings, plan, port, leader_pid)


if __name__ == "__main__":
    main()
