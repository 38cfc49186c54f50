"""The hardware table: GPUs (dense peak FLOP/s per precision, memory, bandwidth, PCIe, power,
price), server CPUs and host memory, each row with its source.

The shipped table is `data/hardware.yaml`. A YAML file of the same shape overrides it
(`load_hardware_table(override)`, or the `MOE_CAP_HARDWARE` environment variable): a row whose
name matches is merged field by field (so `{name: H200, price_usd: 25000}` reprices one GPU), a
row with a new name must give every field. Unknown hardware is an error that names the override,
never an empty result. A run on the CPU alone names its GPU `none` (`NO_GPU`); the host CPU's
rows then supply the peaks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import yaml

from moe_cap.errors import HardwareError
from moe_cap.precision import parse_precision

__all__ = ["NO_GPU", "OVERRIDE_ENV", "CpuSpec", "DramSpec", "GpuSpec", "HardwareTable",
           "MeasuredPeaks", "Peaks", "load_hardware_table", "names_no_gpu"]

OVERRIDE_ENV = "MOE_CAP_HARDWARE"
OVERRIDE_HINT = (f"add a row to a YAML hardware file (format in docs/moe-cap.md) and pass "
                 f"--hardware-file FILE or set {OVERRIDE_ENV}=FILE")
Peaks = Literal["datasheet", "measured"]
NO_GPU = "none"
"""The GPU name of a run on the CPU alone."""
_GIGA, _TERA = 1e9, 1e12


def _key(name: str) -> str:
    """Names compare without case, spaces or punctuation: `"a100-sxm-80gb"` is `"A100 SXM 80GB"`."""
    return re.sub(r"[^a-z0-9+]", "", name.lower())


def names_no_gpu(name: str) -> bool:
    """Whether a run record's GPU name says the run used none: `none`, with or without a remark
    in parentheses (moe-gen 0.1.0 wrote `none (CPU run)`)."""
    return _key(name.split("(")[0]) == NO_GPU


def _peak(name: str, table: Mapping[str, float], precision: str) -> float:
    """`table[precision]`, or an error naming the hardware and the rates it has."""
    if precision not in table:
        listed = ", ".join(table) or "none"
        raise HardwareError(f"{name} has no {precision} matrix rate in the hardware table "
                            f"(it lists {listed}); {OVERRIDE_HINT}")
    return table[precision]


@dataclass(frozen=True)
class MeasuredPeaks:
    """Rates measured on a real machine, kept apart from the datasheet's.

    Attributes:
        pcie_h2d_bytes_per_s: Pinned host-to-GPU copy bandwidth.
        memory_bandwidth_bytes_per_s: GPU memory bandwidth.
        flops_per_s: Matrix-product rate per precision.
        source: Where and how they were measured.
    """

    pcie_h2d_bytes_per_s: float | None
    memory_bandwidth_bytes_per_s: float | None
    flops_per_s: dict[str, float]
    source: str


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model.

    Attributes:
        name: Table name (`"H200"`).
        vendor: `"NVIDIA"`, `"AMD"`.
        device_names: Regular expressions matched against the lower-cased CUDA device name.
        memory_bytes: Memory size.
        memory_bandwidth_bytes_per_s: Datasheet memory bandwidth.
        pcie_gen: PCIe generation of the host link.
        pcie_bytes_per_s: Theoretical x16 bandwidth of that generation, one direction.
        tdp_w: Board power.
        peak_flops_per_s: Dense peak per precision (no structured sparsity).
        source: Where the specifications come from.
        price_usd: Purchase price.
        price_source: Where the price comes from.
        measured: Rates measured on a real machine, if any.
    """

    name: str
    vendor: str
    device_names: tuple[str, ...]
    memory_bytes: int
    memory_bandwidth_bytes_per_s: float
    pcie_gen: int
    pcie_bytes_per_s: float
    tdp_w: float
    peak_flops_per_s: dict[str, float]
    source: str
    price_usd: float
    price_source: str
    measured: MeasuredPeaks | None = None

    def peak_flops(self, precision: str, peaks: Peaks = "datasheet") -> float:
        """Dense peak FLOP/s of matrix products in `precision` (measured where asked and known).

        Raises:
            HardwareError: the table has no such rate for this GPU.
        """
        p = parse_precision(precision)
        if peaks == "measured" and self.measured and p in self.measured.flops_per_s:
            return self.measured.flops_per_s[p]
        return _peak(self.name, self.peak_flops_per_s, p)

    def memory_bandwidth(self, peaks: Peaks = "datasheet") -> float:
        """GPU memory bandwidth in bytes/s (measured where asked and known)."""
        if peaks == "measured" and self.measured and self.measured.memory_bandwidth_bytes_per_s:
            return self.measured.memory_bandwidth_bytes_per_s
        return self.memory_bandwidth_bytes_per_s

    def pcie_bandwidth(self, peaks: Peaks = "datasheet") -> float:
        """Host-to-GPU bandwidth in bytes/s (measured where asked and known)."""
        if peaks == "measured" and self.measured and self.measured.pcie_h2d_bytes_per_s:
            return self.measured.pcie_h2d_bytes_per_s
        return self.pcie_bytes_per_s


@dataclass(frozen=True)
class CpuSpec:
    """One server CPU (one socket).

    Attributes:
        name: Table name.
        vendor: `"Intel"`, `"AMD"`.
        cores: Physical cores.
        tdp_w: Thermal design power.
        memory: Memory channels and type, as text (`"12 x DDR5-4800"`).
        memory_bandwidth_bytes_per_s: Theoretical memory bandwidth of all channels.
        price_usd: Purchase price.
        source: Where the figures come from.
        peak_flops_per_s: Peak FLOP/s of the socket per precision (the denominators of a run on
            the CPU alone); may be empty.
    """

    name: str
    vendor: str
    cores: int
    tdp_w: float
    memory: str
    memory_bandwidth_bytes_per_s: float
    price_usd: float
    source: str
    peak_flops_per_s: dict[str, float] = field(default_factory=dict)

    def peak_flops(self, precision: str) -> float:
        """Peak FLOP/s of one socket in `precision`.

        Raises:
            HardwareError: the table has no such rate for this CPU.
        """
        return _peak(self.name, self.peak_flops_per_s, parse_precision(precision))


@dataclass(frozen=True)
class DramSpec:
    """Host memory: power and price per GiB.

    Attributes:
        name: Table name (`"DDR5 RDIMM"`).
        watts_per_gib: Power under load per GiB.
        usd_per_gib: Price per GiB.
        source: Where the figures come from.
    """

    name: str
    watts_per_gib: float
    usd_per_gib: float
    source: str


@dataclass(frozen=True)
class HardwareTable:
    """GPUs, CPUs and host memory, looked up by name."""

    gpus: tuple[GpuSpec, ...]
    cpus: tuple[CpuSpec, ...]
    dram: tuple[DramSpec, ...]
    sources: tuple[str, ...] = field(default=())

    def gpu(self, name: str) -> GpuSpec:
        """The GPU called `name` (case, spaces and dashes ignored).

        Raises:
            HardwareError: unknown; the message lists the known GPUs and names the override.
        """
        return _find(self.gpus, name, "GPU")

    def cpu(self, name: str) -> CpuSpec:
        """The CPU called `name` (see `gpu`)."""
        return _find(self.cpus, name, "CPU")

    def memory(self, name: str) -> DramSpec:
        """The host memory kind called `name` (see `gpu`)."""
        return _find(self.dram, name, "host memory")


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_Row = TypeVar("_Row", bound=_Named)


def _find(rows: tuple[_Row, ...], name: str, kind: str) -> _Row:
    for row in rows:
        if _key(row.name) == _key(name):
            return row
    known = ", ".join(row.name for row in rows)
    raise HardwareError(f"unknown {kind} {name!r} (known: {known}); {OVERRIDE_HINT}")


def _number(row: Mapping[str, object], key: str, where: str) -> float:
    if key not in row:
        raise HardwareError(f"{where}: missing field {key!r}")
    try:
        value = float(row[key])  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise HardwareError(f"{where}.{key}: not a number: {row[key]!r}") from None
    if value < 0:
        raise HardwareError(f"{where}.{key} must be non-negative, got {value}")
    return value


def _text(row: Mapping[str, object], key: str, where: str) -> str:
    if not isinstance(row.get(key), str) or not row[key]:
        raise HardwareError(f"{where}: field {key!r} must be a non-empty string")
    return str(row[key])


def _tflops(table: object, where: str) -> dict[str, float]:
    if not isinstance(table, Mapping):
        raise HardwareError(f"{where}.peak_tflops must be a mapping of precision to TFLOP/s")
    try:
        return {parse_precision(k): _number(table, k, f"{where}.peak_tflops") * _TERA
                for k in table}
    except ValueError as exc:
        raise HardwareError(f"{where}.peak_tflops: {exc}") from None


def _measured(row: object, where: str) -> MeasuredPeaks | None:
    if row is None:
        return None
    if not isinstance(row, Mapping):
        raise HardwareError(f"{where}.measured must be a mapping")
    pcie, hbm = row.get("pcie_h2d_gb_per_s"), row.get("memory_bandwidth_gb_per_s")
    return MeasuredPeaks(
        pcie_h2d_bytes_per_s=None if pcie is None else _number(row, "pcie_h2d_gb_per_s", where)
        * _GIGA,
        memory_bandwidth_bytes_per_s=None if hbm is None
        else _number(row, "memory_bandwidth_gb_per_s", where) * _GIGA,
        flops_per_s=_tflops(row.get("peak_tflops", {}), f"{where}.measured"),
        source=_text(row, "source", f"{where}.measured"))


def _gpu(row: Mapping[str, object], pcie: Mapping[int, float], where: str) -> GpuSpec:
    gen = int(_number(row, "pcie_gen", where))
    if gen not in pcie:
        raise HardwareError(f"{where}.pcie_gen: no bandwidth for PCIe gen {gen} in the table")
    names = row.get("device_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise HardwareError(f"{where}.device_names must be a list of regular expressions")
    return GpuSpec(
        name=_text(row, "name", where), vendor=_text(row, "vendor", where),
        device_names=tuple(names), memory_bytes=int(_number(row, "memory_gb", where) * _GIGA),
        memory_bandwidth_bytes_per_s=_number(row, "memory_bandwidth_gb_per_s", where) * _GIGA,
        pcie_gen=gen, pcie_bytes_per_s=pcie[gen] * _GIGA, tdp_w=_number(row, "tdp_w", where),
        peak_flops_per_s=_tflops(row.get("peak_tflops"), where),
        source=_text(row, "source", where), price_usd=_number(row, "price_usd", where),
        price_source=_text(row, "price_source", where),
        measured=_measured(row.get("measured"), where))


def _cpu(row: Mapping[str, object], where: str) -> CpuSpec:
    return CpuSpec(
        name=_text(row, "name", where), vendor=_text(row, "vendor", where),
        cores=int(_number(row, "cores", where)), tdp_w=_number(row, "tdp_w", where),
        memory=_text(row, "memory", where),
        memory_bandwidth_bytes_per_s=_number(row, "memory_bandwidth_gb_per_s", where) * _GIGA,
        price_usd=_number(row, "price_usd", where), source=_text(row, "source", where),
        peak_flops_per_s=_tflops(row.get("peak_tflops", {}), where))


def _dram(row: Mapping[str, object], where: str) -> DramSpec:
    return DramSpec(name=_text(row, "name", where),
                    watts_per_gib=_number(row, "watts_per_gib", where),
                    usd_per_gib=_number(row, "usd_per_gib", where),
                    source=_text(row, "source", where))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HardwareError(f"{origin}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HardwareError(f"{origin}: expected a mapping with gpus, cpus, dram or pcie")
    unknown = set(data) - {"gpus", "cpus", "dram", "pcie"}
    if unknown:
        raise HardwareError(f"{origin}: unknown section(s) {sorted(unknown)}; "
                            f"use gpus, cpus, dram or pcie")
    return data


def _merge(base: list[dict[str, Any]], extra: object, section: str,
           origin: str) -> list[dict[str, Any]]:
    if extra is None:
        return base
    if not isinstance(extra, list) or not all(isinstance(r, dict) and "name" in r for r in extra):
        raise HardwareError(f"{origin}: {section} must be a list of mappings, each with a name")
    rows = [dict(r) for r in base]
    for new in extra:
        match = next((r for r in rows if _key(str(r["name"])) == _key(str(new["name"]))), None)
        if match is None:
            rows.append(dict(new))
            continue
        for k, v in new.items():  # nested tables merge one level deep
            match[k] = {**match[k], **v} if isinstance(v, dict) and isinstance(
                match.get(k), dict) else v
    return rows


def load_hardware_table(override: str | Path | None = None) -> HardwareTable:
    """The shipped table, merged with `override` (or the file `$MOE_CAP_HARDWARE` names).

    Raises:
        HardwareError: the override file is missing, not YAML, or has a bad row (the message
            names the file, row and field).
    """
    text = resources.files("moe_cap").joinpath("data/hardware.yaml").read_text(encoding="utf-8")
    data = _read_yaml(text, "moe_cap/data/hardware.yaml")
    sources = ["moe_cap/data/hardware.yaml"]
    if override is None and os.environ.get(OVERRIDE_ENV):
        override = os.environ[OVERRIDE_ENV]
    if override is not None:
        path = Path(override).expanduser()
        if not path.is_file():
            raise HardwareError(f"hardware file {str(path)!r} does not exist")
        extra = _read_yaml(path.read_text(encoding="utf-8"), str(path))
        for section in ("gpus", "cpus", "dram"):
            data[section] = _merge(data.get(section, []), extra.get(section), section, str(path))
        data["pcie"] = {**data["pcie"], **(extra.get("pcie") or {})}
        sources.append(str(path))
    origin = sources[-1]
    try:
        pcie = {int(k): float(v) for k, v in data["pcie"].items()}
    except (TypeError, ValueError):
        raise HardwareError(f"{origin}: pcie maps a generation to GB/s, e.g. 5: 63.0") from None
    return HardwareTable(
        gpus=tuple(_gpu(r, pcie, f"{origin}: gpu {r.get('name')!r}") for r in data["gpus"]),
        cpus=tuple(_cpu(r, f"{origin}: cpu {r.get('name')!r}") for r in data["cpus"]),
        dram=tuple(_dram(r, f"{origin}: dram {r.get('name')!r}") for r in data["dram"]),
        sources=tuple(sources))
