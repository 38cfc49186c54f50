"""moe-gen in process: the whole workload handed to its offline engine at once (module-based
batching, its planner and streaming runtime), as `moe-gen run` would run it.

moe-gen does not stream: each request's end-to-end latency is when its result came back,
counted from the start of the job, and TTFT is not measured. moe-gen's own run record supplies
the steps (so utilisation and the cost split are its measurements)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from moe_cap.engine_options import EngineOptions, precision_name
from moe_cap.errors import RunRecordError
from moe_cap.run_record import RunRecord
from moe_cap.streaming_engine import EngineInfo
from moe_cap.target import Completion, GenerationSettings
from moe_cap.workload import WorkItem

__all__ = ["MoEGenOffline"]

OnResult = Callable[[int, Completion, float], None]


class MoEGenOffline:
    """An offline moe-gen job over a workload.

    Args:
        moe_gen: The imported `moe_gen` package (imported by `engines`, lazily).
        options: Model, device, dtype and budget.
    """

    def __init__(self, moe_gen: ModuleType, options: EngineOptions) -> None:
        self._moe_gen = moe_gen
        self.options = options
        self.label = f"moe-gen {moe_gen.__version__}"

    def _write_requests(self, items: Sequence[WorkItem], settings: GenerationSettings,
                        path: Path) -> None:
        with path.open("w", encoding="utf-8") as out:
            for index, item in enumerate(items):
                line: dict[str, object] = {"id": str(index),
                                           "max_new_tokens": item.max_tokens or settings.max_tokens}
                if item.messages is not None:
                    line["messages"] = list(item.messages)
                else:
                    line["prompt"] = item.prompt
                out.write(json.dumps(line) + "\n")

    def run(self, items: Sequence[WorkItem], settings: GenerationSettings, workdir: Path,
            on_result: OnResult, on_first_step: Callable[[], None] = lambda: None
            ) -> tuple[RunRecord | None, EngineInfo]:
        """Run `items` (indices are their positions).

        `on_result(index, completion, seconds)` as each finishes (seconds from the start of the
        job's first step: loading the model and planning are not counted); `on_first_step()`
        once the first step ran. Returns moe-gen's run record (None if it ran no step; on an
        interruption, the record it saved) and the engine's info."""
        mg, options = self._moe_gen, self.options
        requests, output = workdir / "requests.jsonl", workdir / "results.jsonl"
        self._write_requests(items, settings, requests)
        defaults = mg.Defaults(max_new_tokens=settings.max_tokens,
                               temperature=settings.temperature, seed=settings.seed or 0)
        extra = {} if options.gpu_memory_bytes is None else {
            "gpu_memory_bytes": options.gpu_memory_bytes}
        config = mg.JobConfig(model=options.model, input=requests, output=output,
                              defaults=defaults, device=options.device, dtype=options.dtype,
                              dummy=options.dummy, num_layers=options.num_layers,
                              eos=not any(i.ignore_eos for i in items),
                              expert_dtype=options.expert_dtype, routing=options.routing,
                              **extra)
        started: list[float] = []  # when the first step began (after loading and planning)

        def stepped(stats: object) -> None:
            if not started:
                started.append(time.perf_counter() - stats.seconds)  # type: ignore[attr-defined]
                on_first_step()

        def finished(result: object) -> None:
            done = time.perf_counter() - started[0]
            completion = Completion(text=result.text or "",  # type: ignore[attr-defined]
                                    prompt_tokens=result.prompt_tokens,  # type: ignore[attr-defined]
                                    output_tokens=result.completion_tokens,  # type: ignore[attr-defined]
                                    finish_reason=result.finish_reason)  # type: ignore[attr-defined]
            on_result(int(result.id), completion, done)  # type: ignore[attr-defined]

        outcome = None
        try:
            outcome = mg.run_job(config, on_result=finished, on_step=stepped)
        finally:
            record = self._record(outcome, output)
        dtype = precision_name(outcome.dtype) if outcome is not None else (
            record.weight_dtype if record is not None else "fp32")
        return record, EngineInfo(self.label, options.model, dtype, options.num_layers,
                                  record.gpu if record is not None else "none",
                                  options.expert_dtype)

    @staticmethod
    def _record(outcome: object | None, output: Path) -> RunRecord | None:
        data = getattr(outcome, "record", None)
        if data is None:  # interrupted: moe-gen saved the record beside its output
            saved = output.with_name(output.name + ".run-record.json")
            if not saved.is_file():
                return None
            try:
                return RunRecord.from_json(saved)
            except RunRecordError:
                return None
        return RunRecord.from_dict(data)
