"""A file job run on Ray (`moe-gen run --ray`): the job's requests, minus those already in the
output, become a Ray dataset that flows through the engine actors of `moe_gen.ray_data`; this
process writes each result to the output as it comes back (the same JSONL, resumed the same
way), drives the one progress bar, and sums up the engines' steps for the summary and the run
record.

Results come back an engine batch at a time (`RayConfig.requests_per_batch`), so an
interrupted job keeps every batch that came back and redoes the batches in flight.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, cast

from moe_gen.batch_loop import StepStats
from moe_gen.job import JobRun
from moe_gen.job_config import RayConfig
from moe_gen.job_engine import job_shape
from moe_gen.ray_data import engine_stage, plan_engines, request_row, result_of_row
from moe_gen.requests import GenRequest

if TYPE_CHECKING:
    import pyarrow as pa
    from ray.data import Dataset

__all__ = ["RayJobRun", "ray_cluster"]

_ENGINE_START_S = 3600  # the longest an engine may take to load its model


@contextmanager
def ray_cluster(address: str | None) -> Iterator[None]:
    """Connected to a Ray cluster: the one this process is already connected to, else
    `address` (None: `RAY_ADDRESS`, else a new local cluster, shut down on leaving)."""
    # The engines run in this Python environment (every node of a cluster has moe-gen
    # installed). Ray's `uv run` hook would instead rebuild an environment for each worker
    # from the working directory (the whole checkout, its .venv included), which hung the
    # workers' start here; it is read when ray is first imported.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's INFO lines kept off our stderr (they stay in the Ray session's logs)."""
    log = logging.getLogger("ray.data")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


class RayJobRun(JobRun):
    """A run of a job on Ray engines (`JobConfig.ray`), measured like one in this process: the
    summary's wall time is the job's (engine start included), its prefill and decode rates are
    per engine; the run record counts engine-seconds (`JobRun.record`)."""

    def generate(self, todo: list[tuple[int, GenRequest]], tokenizer: object | None) -> None:
        """Plan the engines, run `todo` on them and write the results as they come back."""
        del tokenizer  # each engine loads its own
        settings = self.config.ray or RayConfig()
        engines: set[str] = set()
        started = time.perf_counter()
        with ray_cluster(settings.address), _quiet_ray_data():
            results = self._results(todo, settings)
            try:
                for block in results.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for row in cast("pa.Table", block).to_pylist():
                        self._take(row, engines)
            finally:
                self.wall = time.perf_counter() - started
                self.num_engines = max(len(engines), 1)

    def _results(self, todo: list[tuple[int, GenRequest]], settings: RayConfig) -> Dataset:
        """Plan the engines and lay out the pipeline: `todo` as a dataset, through them."""
        import ray.data

        config = self.config
        setup = plan_engines(config, *job_shape(todo, config.defaults.max_new_tokens), len(todo))
        self.plan, self.profile, self.gpu = setup.plan, setup.profile, setup.gpu
        self.host_memory_bytes = config.host_memory_bytes // setup.num_engines
        batch = settings.requests_per_batch or min(4 * setup.plan.max_batch_size,
                                                   math.ceil(len(todo) / setup.num_engines))
        requests = ray.data.from_items([request_row(i, r) for i, r in todo])
        results = engine_stage(requests, replace(config, plan=setup.plan), setup, batch)
        # The dataset is ours (its context a copy of the current one): set it up for a job.
        results.context.enable_progress_bars = False  # ours is the one progress bar
        results.context.print_on_execution_start = False
        # Every engine starts (loads its model) before requests are handed out, so that a
        # small job is spread over all engines, not taken by the first one up.
        results.context.wait_for_min_actors_s = _ENGINE_START_S
        return results

    def _take(self, row: dict[str, object], engines: set[str]) -> None:
        """Write a result row and keep what its engine measured."""
        self.finished(result_of_row(row))
        stats = json.loads(str(row["engine_stats"]))
        engines.add(stats["engine"])
        for step in stats.get("steps", []):
            self.stepped(StepStats.from_dict(step))
        self.engine_seconds += stats.get("wall_s", 0.0)
        for key, name in (("bytes_copied", "expert_bytes"), ("stall_seconds", "stall_s")):
            self.offload[key] = self.offload.get(key, 0) + stats.get(name, 0)

    def peak_host_bytes(self) -> int | None:
        """Not measured: the engines' memory is in their own processes."""
        return None
