"""What a run cost: dollars per hour of the machine, dollars per million tokens, joules per token.

Owned hardware costs its purchase price spread over its useful life and the share of that life
it does paid work, plus the energy it draws:

    usd_per_hour = sum(price) / (years * 8760 * utilisation)
                 + (gpu_w + cpu_w + dram_w) * pue / 1000 * usd_per_kwh

summed over the GPUs, the host CPU (offloading engines compute there) and the host memory (which
holds the experts); a run on the CPU alone (GPU `none`) has no GPU term. Power is measured
energy over wall time where the run record has it (NVML for GPUs), else TDP x load. A cloud
machine costs its hourly rate instead. The run's cost,
`usd_per_hour * wall_seconds / 3600`, is split between input and output tokens by the share of
step time spent in prefill and in decode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moe_cap.errors import HardwareError, MoECapError
from moe_cap.hardware import GpuSpec, HardwareTable, names_no_gpu
from moe_cap.run_record import RunRecord

__all__ = ["CostConfig", "CostReport", "EnergyUse", "price_run"]

HOURS_PER_YEAR = 8760
_NO_HOST = "or pass --no-host to price the GPUs alone"


@dataclass(frozen=True, kw_only=True)
class CostConfig:
    """How to price a run.

    Attributes:
        years: Useful life over which purchases are amortised.
        utilisation: Share of that life the machine does paid work (1.0: every hour; lower
            raises the hourly cost).
        usd_per_kwh: Electricity price.
        pue: Power usage effectiveness of the room (1.0: no cooling overhead counted).
        gpu: GPU (table name), overriding the run record's; `none` prices a run on the CPU
            alone.
        gpu_load: Share of TDP a GPU draws when its energy was not measured.
        cpu_load: Share of TDP the CPU draws when its energy was not measured.
        cpu: Host CPU (table name), overriding the run record's.
        cpu_sockets: CPU sockets charged to the run (fractions for a shared host).
        dram_gib: Host memory charged to the run, overriding the run record's.
        dram: Host memory kind (table name).
        include_host: Charge the host CPU and memory (price and power).
        cloud_usd_per_hour: A cloud machine's all-in hourly rate; replaces purchase and energy.
    """

    years: float = 3.0
    utilisation: float = 1.0
    usd_per_kwh: float = 0.15
    pue: float = 1.0
    gpu: str | None = None
    gpu_load: float = 1.0
    cpu_load: float = 1.0
    cpu: str | None = None
    cpu_sockets: float = 1.0
    dram_gib: float | None = None
    dram: str = "DDR5 RDIMM"
    include_host: bool = True
    cloud_usd_per_hour: float | None = None

    def __post_init__(self) -> None:
        checks = {"years": self.years > 0, "utilisation": 0 < self.utilisation <= 1,
                  "usd_per_kwh": self.usd_per_kwh >= 0, "pue": self.pue >= 1,
                  "gpu_load": 0 <= self.gpu_load <= 1, "cpu_load": 0 <= self.cpu_load <= 1,
                  "cpu_sockets": self.cpu_sockets > 0,
                  "dram_gib": self.dram_gib is None or self.dram_gib >= 0,
                  "cloud_usd_per_hour": self.cloud_usd_per_hour is None
                  or self.cloud_usd_per_hour >= 0}
        rules = {"years": "> 0", "utilisation": "in (0, 1]", "usd_per_kwh": ">= 0",
                 "pue": ">= 1", "gpu_load": "in [0, 1]", "cpu_load": "in [0, 1]",
                 "cpu_sockets": "> 0", "dram_gib": ">= 0", "cloud_usd_per_hour": ">= 0"}
        for name, ok in checks.items():
            if not ok:
                raise MoECapError(f"{name} must be {rules[name]}, "
                                 f"got {getattr(self, name)}")


@dataclass(frozen=True)
class EnergyUse:
    """Energy of one part over the run.

    Attributes:
        joules: Energy used.
        measured: True when read from a counter, False when TDP x load (or W/GiB) x time.
    """

    joules: float
    measured: bool


@dataclass(frozen=True)
class CostReport:
    """The price of a run.

    Attributes:
        usd_per_hour: Machine cost per hour.
        usd_per_hour_parts: Its parts (`gpu`, `cpu`, `dram` purchases and `energy`; or `cloud`).
        run_usd: Cost of the run's wall time.
        usd_per_million_input_tokens: Prefill's share of the cost per million prompt tokens
            (None when the run had no prompt tokens).
        usd_per_million_output_tokens: Decode's share per million generated tokens (None when
            none were generated).
        usd_per_million_tokens: Whole cost per million tokens of either kind.
        energy: Energy of `gpu`, `cpu` and `dram`.
        joules_per_token: All energy per token of either kind.
        joules_per_input_token: Prefill's share of the energy per prompt token.
        joules_per_output_token: Decode's share of the energy per generated token.
        prefill_share: Share of step time spent in prefill.
        notes: What was estimated rather than measured, and other caveats.
    """

    usd_per_hour: float
    usd_per_hour_parts: dict[str, float]
    run_usd: float
    usd_per_million_input_tokens: float | None
    usd_per_million_output_tokens: float | None
    usd_per_million_tokens: float
    energy: dict[str, EnergyUse]
    joules_per_token: float
    joules_per_input_token: float | None
    joules_per_output_token: float | None
    prefill_share: float
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out


def _charge_gpu(record: RunRecord, gpu: GpuSpec, config: CostConfig, life_h: float,
                capex: dict[str, float], energy: dict[str, EnergyUse], notes: list[str]) -> None:
    """Add the GPUs' purchase share and energy."""
    capex["gpu"] = gpu.price_usd * record.num_gpus / life_h
    if record.gpu_energy_j is not None:
        energy["gpu"] = EnergyUse(record.gpu_energy_j, True)
    else:
        energy["gpu"] = EnergyUse(gpu.tdp_w * record.num_gpus * config.gpu_load
                                  * record.wall_seconds, False)
        notes.append(f"GPU energy estimated as TDP {gpu.tdp_w:g} W x load {config.gpu_load:g}")


def _charge_host(record: RunRecord, table: HardwareTable, config: CostConfig, life_h: float,
                 capex: dict[str, float], energy: dict[str, EnergyUse], notes: list[str]) -> None:
    """Add the host CPU's and memory's purchase share and energy."""
    cpu_name = config.cpu or record.cpu
    dram_gib = config.dram_gib if config.dram_gib is not None else record.dram_gib
    if cpu_name is None:
        raise HardwareError(f"the run record names no host CPU: pass --cpu NAME "
                            f"(`moe-cap hardware` lists them) {_NO_HOST}")
    if dram_gib is None:
        raise HardwareError(f"the run record gives no host memory size: pass --dram-gib N "
                            f"{_NO_HOST}")
    cpu, dram = table.cpu(cpu_name), table.memory(config.dram)
    capex["cpu"] = cpu.price_usd * config.cpu_sockets / life_h
    capex["dram"] = dram.usd_per_gib * dram_gib / life_h
    if record.cpu_energy_j is not None:
        energy["cpu"] = EnergyUse(record.cpu_energy_j, True)
    else:
        energy["cpu"] = EnergyUse(cpu.tdp_w * config.cpu_sockets * config.cpu_load
                                  * record.wall_seconds, False)
        notes.append(f"CPU energy estimated as TDP {cpu.tdp_w:g} W x load {config.cpu_load:g}")
    if record.dram_energy_j is not None:
        energy["dram"] = EnergyUse(record.dram_energy_j, True)
    else:
        energy["dram"] = EnergyUse(dram.watts_per_gib * dram_gib * record.wall_seconds, False)
        notes.append(f"host memory energy estimated as {dram.watts_per_gib:g} W/GiB")


def _per(total: float, share: float, count: int, scale: float = 1.0) -> float | None:
    return total * share / count * scale if count else None


def price_run(record: RunRecord, table: HardwareTable,
              config: CostConfig | None = None) -> CostReport:
    """Price `record` on the hardware it names (see the module docstring for the formulas).

    A run on the CPU alone (GPU `none`, in the record or `config.gpu`) is charged its host CPU
    and memory only.

    Raises:
        HardwareError: the GPU, CPU or memory kind is unknown, or the host is to be charged
            but neither the record nor `config` names its CPU or memory size, or a CPU run is
            priced without its host.
    """
    config = config or CostConfig()
    hours = record.wall_seconds / 3600
    gpu_name = config.gpu or record.gpu
    notes: list[str] = []
    life_h = config.years * HOURS_PER_YEAR * config.utilisation
    capex: dict[str, float] = {}
    energy: dict[str, EnergyUse] = {}
    if names_no_gpu(gpu_name):
        if not config.include_host:
            raise HardwareError("the run used no GPU, so --no-host leaves nothing to price")
        notes.append("no GPU: the run used the host CPU alone")
    else:
        _charge_gpu(record, table.gpu(gpu_name), config, life_h, capex, energy, notes)
    if config.include_host:
        _charge_host(record, table, config, life_h, capex, energy, notes)
    else:
        notes.append("host CPU and memory not charged (--no-host)")
    joules = sum(e.joules for e in energy.values())
    watts = joules / record.wall_seconds
    if config.cloud_usd_per_hour is not None:
        parts = {"cloud": config.cloud_usd_per_hour}
        notes.append("cloud rate replaces purchase and energy; energy is reported only")
    else:
        parts = {**capex, "energy": watts * config.pue / 1000 * config.usd_per_kwh}
    per_hour = sum(parts.values())
    run_usd = per_hour * hours
    prefill = record.prefill_share()
    tokens = record.input_tokens + record.output_tokens
    return CostReport(
        usd_per_hour=per_hour, usd_per_hour_parts=parts, run_usd=run_usd,
        usd_per_million_input_tokens=_per(run_usd, prefill, record.input_tokens, 1e6),
        usd_per_million_output_tokens=_per(run_usd, 1 - prefill, record.output_tokens, 1e6),
        usd_per_million_tokens=run_usd / tokens * 1e6, energy=energy,
        joules_per_token=joules / tokens,
        joules_per_input_token=_per(joules, prefill, record.input_tokens),
        joules_per_output_token=_per(joules, 1 - prefill, record.output_tokens),
        prefill_share=prefill, notes=tuple(notes))
