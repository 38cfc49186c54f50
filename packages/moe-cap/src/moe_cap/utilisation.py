"""Sparsity-aware utilisation: S-MBU, S-MFU and PCIe utilisation, per step and over a run.

For one step of `t` seconds that must move `B` bytes through GPU memory and run `F` FLOPs (both
counted by `step_cost`, so only the experts the step activates are charged) and copied `P` bytes
host-to-GPU:

    S-MBU = B / t / memory_bandwidth        S-MFU = F / t / peak_flops        PCIe = P / t / pcie

A run's figure is the ratio of its sums, `sum(B) / sum(t) / bandwidth`: the time-weighted mean of
the per-step values, so a step that takes ten times longer counts ten times more. The unweighted
mean of per-step ratios (what MoE-CAP reports) overstates runs whose many short steps are
efficient and whose few long ones are not. Per-step percentiles describe the spread; they are
not the headline.

A run on the CPU alone (its record's GPU is `none`) is divided by the host CPU's rates instead:
its memory bandwidth and peak FLOP/s from the hardware table, and no host link (PCIe is None).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moe_core import ModelSpec

from moe_cap.errors import HardwareError, MoECapError
from moe_cap.hardware import CpuSpec, GpuSpec, HardwareTable, Peaks, names_no_gpu
from moe_cap.percentile import percentile
from moe_cap.run_record import RunRecord
from moe_cap.step_cost import step_cost

__all__ = ["PeakRates", "StepSample", "Utilisation", "UtilisationSummary", "percentile",
           "run_peaks", "run_samples", "summarise", "utilisation"]

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class PeakRates:
    """The denominators: what the hardware could do per second.

    Attributes:
        memory_bytes_per_s: Memory bandwidth of the compute device (all GPUs of the run, or
            the host CPU's).
        flops_per_s: Dense matrix-product peak at the run's compute precision (all GPUs).
        pcie_bytes_per_s: Host-to-GPU bandwidth (all GPUs); None for a run on the CPU alone.
    """

    memory_bytes_per_s: float
    flops_per_s: float
    pcie_bytes_per_s: float | None

    def __post_init__(self) -> None:
        for name in ("memory_bytes_per_s", "flops_per_s", "pcie_bytes_per_s"):
            value = getattr(self, name)
            if not (value is None and name == "pcie_bytes_per_s") and not value > 0:
                raise MoECapError(f"the peak {name} must be positive, got {value}")

    @classmethod
    def of(cls, gpu: GpuSpec, precision: str, peaks: Peaks = "datasheet",
           num_gpus: int = 1) -> PeakRates:
        """The rates of `num_gpus` GPUs of `gpu` computing in `precision`."""
        return cls(gpu.memory_bandwidth(peaks) * num_gpus,
                   gpu.peak_flops(precision, peaks) * num_gpus,
                   gpu.pcie_bandwidth(peaks) * num_gpus)

    @classmethod
    def of_cpu(cls, cpu: CpuSpec, precision: str) -> PeakRates:
        """The rates of one socket of `cpu` computing in `precision`, with no host link."""
        return cls(cpu.memory_bandwidth_bytes_per_s, cpu.peak_flops(precision), None)


def run_peaks(record: RunRecord, table: HardwareTable, peaks: Peaks = "datasheet",
              gpu: str | None = None, cpu: str | None = None) -> tuple[str, PeakRates]:
    """What `record` ran on and its rates: its GPUs, or the host CPU for a run on the CPU alone.

    Args:
        record: The run.
        table: The hardware table.
        peaks: Datasheet or measured rates (GPUs only: CPUs have datasheet rates).
        gpu: A GPU name overriding the record's (`none`: the run used the CPU alone).
        cpu: A CPU name overriding the record's.

    Raises:
        HardwareError: unknown hardware, or a CPU run whose CPU neither the record nor `cpu`
            names.
    """
    precision = record.compute_dtype or record.weight_dtype
    if not names_no_gpu(gpu or record.gpu):
        spec = table.gpu(gpu or record.gpu)
        return spec.name, PeakRates.of(spec, precision, peaks, record.num_gpus)
    cpu_name = cpu or record.cpu
    if cpu_name is None:
        raise HardwareError("the run used no GPU and its record names no host CPU to divide by: "
                            "pass --cpu NAME (`moe-cap hardware` lists them)")
    host = table.cpu(cpu_name)
    return host.name, PeakRates.of_cpu(host, precision)


@dataclass(frozen=True)
class Utilisation:
    """Shares of peak, each in `[0, 1]` for a physically possible measurement.

    Attributes:
        s_mbu: Sparse memory-bandwidth utilisation.
        s_mfu: Sparse model-FLOPs utilisation.
        pcie: Host-to-GPU link utilisation (None for a run on the CPU alone).
    """

    s_mbu: float
    s_mfu: float
    pcie: float | None


def utilisation(bytes_moved: float, flops: float, seconds: float, peak: PeakRates,
                h2d_bytes: float = 0.0) -> Utilisation:
    """S-MBU, S-MFU and PCIe utilisation of work that took `seconds`.

    Raises:
        ValueError: `seconds` not positive.
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    link = peak.pcie_bytes_per_s
    return Utilisation(bytes_moved / seconds / peak.memory_bytes_per_s,
                       flops / seconds / peak.flops_per_s,
                       None if link is None else h2d_bytes / seconds / link)


@dataclass(frozen=True)
class StepSample:
    """One step's work and time.

    Attributes:
        phase: `"prefill"` or `"decode"`.
        seconds: Wall time.
        bytes_moved: Bytes through GPU memory (`StepCost.bytes`).
        flops: Matrix-product FLOPs (`StepCost.flops`).
        h2d_bytes: Bytes copied host-to-GPU.
        num_tokens: New tokens run.
    """

    phase: str
    seconds: float
    bytes_moved: float
    flops: float
    h2d_bytes: float
    num_tokens: int


@dataclass(frozen=True)
class UtilisationSummary:
    """Utilisation of a set of steps (a phase, or the whole run).

    Attributes:
        phase: `"prefill"`, `"decode"` or `"all"`.
        num_steps: Steps summarised.
        seconds: Their total time.
        num_tokens: Their new tokens.
        bytes_moved: Their total bytes through GPU memory.
        flops: Their total FLOPs.
        h2d_bytes: Their total host-to-GPU bytes.
        aggregate: Ratio of sums over the steps (the headline).
        percentiles: Per-step values at p50, p90 and p99 (keys `"p50"`, ...).
    """

    phase: str
    num_steps: int
    seconds: float
    num_tokens: int
    bytes_moved: float
    flops: float
    h2d_bytes: float
    aggregate: Utilisation
    percentiles: dict[str, Utilisation]

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of step time."""
        return self.num_tokens / self.seconds

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        def util(u: Utilisation) -> dict[str, float | None]:
            return {"s_mbu": u.s_mbu, "s_mfu": u.s_mfu, "pcie": u.pcie}

        return {"phase": self.phase, "num_steps": self.num_steps, "seconds": self.seconds,
                "num_tokens": self.num_tokens, "tokens_per_s": self.tokens_per_s,
                "bytes": self.bytes_moved, "flops": self.flops, "h2d_bytes": self.h2d_bytes,
                "aggregate": util(self.aggregate),
                "percentiles": {k: util(v) for k, v in self.percentiles.items()}}


def _summary(phase: str, samples: Sequence[StepSample], peak: PeakRates) -> UtilisationSummary:
    seconds = sum(s.seconds for s in samples)
    total_bytes, flops = sum(s.bytes_moved for s in samples), sum(s.flops for s in samples)
    h2d = sum(s.h2d_bytes for s in samples)
    steps = [utilisation(s.bytes_moved, s.flops, s.seconds, peak, s.h2d_bytes) for s in samples]
    links = [u.pcie for u in steps if u.pcie is not None]
    pct = {f"p{q}": Utilisation(percentile([u.s_mbu for u in steps], q),
                                percentile([u.s_mfu for u in steps], q),
                                percentile(links, q) if links else None) for q in PERCENTILES}
    return UtilisationSummary(phase, len(samples), seconds, sum(s.num_tokens for s in samples),
                              total_bytes, flops, h2d,
                              utilisation(total_bytes, flops, seconds, peak, h2d), pct)


def summarise(samples: Sequence[StepSample], peak: PeakRates) -> dict[str, UtilisationSummary]:
    """Summaries per phase present and for `"all"` steps.

    Raises:
        ValueError: no samples.
    """
    if not samples:
        raise ValueError("no steps to summarise")
    out = {}
    for phase in ("prefill", "decode"):
        chosen = [s for s in samples if s.phase == phase]
        if chosen:
            out[phase] = _summary(phase, chosen, peak)
    out["all"] = _summary("all", samples, peak)
    return out


def run_samples(record: RunRecord, spec: ModelSpec) -> list[StepSample]:
    """Each step of `record`, costed with `spec` (truncated to `record.num_layers` if set).

    Steps with traced expert counts are charged those; the others the uniform expectation.

    Raises:
        ValueError: the record's truncation or expert counts do not fit `spec`.
    """
    if record.num_layers is not None:
        spec = spec.truncated(record.num_layers)
    samples = []
    for i, step in enumerate(record.steps):
        try:
            cost = step_cost(spec, step.chunks, weight_dtype=record.weight_dtype,
                             kv_dtype=record.kv_dtype, expert_dtype=record.expert_dtype,
                             measured_experts=step.experts_activated)
        except ValueError as exc:
            raise ValueError(f"steps[{i}]: {exc}") from None
        samples.append(StepSample(step.phase, step.seconds, cost.bytes, cost.flops,
                                  step.h2d_bytes, cost.num_tokens))
    return samples
