"""What a run record means once priced and measured against its hardware: its cost, its
utilisation and its bound, each computed where the record allows and otherwise a note saying
why not. `moe-cap run` prints it; `moe-cap report` plots and tabulates it."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_core import ModelSpec, MoEError, resolve_model_path

from moe_cap.cost import CostConfig, CostReport, price_run
from moe_cap.hardware import HardwareTable, Peaks, names_no_gpu
from moe_cap.run_record import RunRecord
from moe_cap.utilisation import (
    PeakRates,
    StepSample,
    UtilisationSummary,
    run_peaks,
    run_samples,
    summarise,
)

__all__ = ["BatchUtilisation", "RunView", "view_run"]


@dataclass(frozen=True)
class BatchUtilisation:
    """Decode steps of one batch size, aggregated (ratio of sums).

    Attributes:
        batch: Sequences per step.
        num_steps: Steps of that size.
        s_mbu, s_mfu: Utilisation over those steps.
        tokens_per_s: Measured decode tokens per second of step time.
        bound_tokens_per_s: What the bound allows for the same steps.
    """

    batch: int
    num_steps: int
    s_mbu: float
    s_mfu: float
    tokens_per_s: float
    bound_tokens_per_s: float


@dataclass
class RunView:
    """A record with its derived figures.

    Attributes:
        record: The run record.
        name: The system, as plots and tables label it.
        cost: Its price (None: not computable, see `notes`).
        utilisation: Per-phase summaries (None: no steps or unknown hardware).
        by_batch: Decode utilisation per batch size.
        notes: Why a figure is missing, what was estimated.
    """

    record: RunRecord
    name: str
    cost: CostReport | None = None
    utilisation: dict[str, UtilisationSummary] | None = None
    by_batch: list[BatchUtilisation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def output_tokens_per_s(self) -> float:
        """Output tokens per second: the client's figure, else the record's over wall time."""
        if self.record.serving is not None:
            return self.record.serving.output_tokens_per_s
        return self.record.output_tokens / self.record.wall_seconds


def _bound_s(sample: StepSample, peak: PeakRates) -> float:
    link = 0.0 if peak.pcie_bytes_per_s is None else sample.h2d_bytes / peak.pcie_bytes_per_s
    return max(sample.bytes_moved / peak.memory_bytes_per_s, sample.flops / peak.flops_per_s,
               link)


def _by_batch(samples: list[tuple[int, StepSample]], peak: PeakRates) -> list[BatchUtilisation]:
    out = []
    for batch in sorted({b for b, s in samples if s.phase == "decode"}):
        chosen = [s for b, s in samples if b == batch and s.phase == "decode"]
        seconds = sum(s.seconds for s in chosen)
        tokens = sum(s.num_tokens for s in chosen)
        bound = sum(_bound_s(s, peak) for s in chosen)
        out.append(BatchUtilisation(
            batch, len(chosen), sum(s.bytes_moved for s in chosen) / seconds
            / peak.memory_bytes_per_s, sum(s.flops for s in chosen) / seconds / peak.flops_per_s,
            tokens / seconds, tokens / bound if bound > 0 else float("inf")))
    return out


def system_name(record: RunRecord) -> str:
    """The engine without a server's URL details: `moe-gen 0.1.0`, `<url> <model>`."""
    return record.engine


def view_run(record: RunRecord, table: HardwareTable, peaks: Peaks = "datasheet",
             name: str | None = None) -> RunView:
    """Cost, utilisation and bounds of `record`, where computable."""
    view = RunView(record, name or system_name(record))
    on_cpu = names_no_gpu(record.gpu)
    with_host = record.cpu is not None and record.dram_gib is not None
    try:
        if on_cpu and not with_host:
            raise MoEError("the run used no GPU and its record names no host CPU and memory")
        view.cost = price_run(record, table, CostConfig(include_host=with_host))
        if not with_host:
            view.notes.append("cost: GPUs only (the record names no host CPU and memory)")
    except MoEError as exc:
        view.notes.append(f"cost: not computed ({exc})")
    if not record.steps:
        view.notes.append("utilisation: the target exposes no steps")
        return view
    try:
        spec = ModelSpec.from_pretrained(resolve_model_path(record.model, weights=False))
        _, peak = run_peaks(record, table, peaks)
        samples = run_samples(record, spec)
        view.utilisation = summarise(samples, peak)
        view.by_batch = _by_batch([(len(st.chunks), sa) for st, sa in
                                   zip(record.steps, samples, strict=True)], peak)
    except (MoEError, ValueError) as exc:
        view.notes.append(f"utilisation: not computed ({exc})")
    return view
