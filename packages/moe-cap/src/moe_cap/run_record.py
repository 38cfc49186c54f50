"""The run record: what an engine writes about one benchmark run, and what `moe-cap` prices and
measures. JSON, one object; the format is documented in docs/moe-cap.md.

Each step lists its sequences as `[past_tokens, new_tokens]` pairs, which is all the step-cost
model needs (FLOPs, KV reads, attention pairs); the run's totals (wall time, tokens, optional
measured energy) are what the cost model needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moe_core import write_output_text

from moe_cap.accuracy_result import AccuracyResult
from moe_cap.errors import RunRecordError
from moe_cap.precision import parse_precision
from moe_cap.serving_summary import ServingSummary
from moe_cap.step_cost import Chunk

__all__ = ["FORMAT", "VERSION", "RunRecord", "StepRecord"]

FORMAT = "moe-cap/run-record"
VERSION = 1
Phase = Literal["prefill", "decode"]
# Step times may add up to a hair over the wall time through float rounding.
_SLACK = 1e-6


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise RunRecordError(f"{where} {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class StepRecord:
    """One forward step of the engine.

    Attributes:
        phase: `"prefill"` or `"decode"` (a step that mixes both reports its main phase).
        seconds: Wall time of the step.
        chunks: One `[past_tokens, new_tokens]` pair per sequence in the step.
        h2d_bytes: Bytes copied host-to-GPU during the step (offloaded experts, KV).
        experts_activated: Distinct routed experts used per MoE layer, if the engine traced them.
    """

    phase: Phase
    seconds: float
    chunks: tuple[Chunk, ...]
    h2d_bytes: int = 0
    experts_activated: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check(self.phase in ("prefill", "decode"), "StepRecord.phase",
               f"must be 'prefill' or 'decode', got {self.phase!r}")
        _check(_is_number(self.seconds) and self.seconds > 0, "StepRecord.seconds",
               f"must be a positive number, got {self.seconds!r}")
        _check(len(self.chunks) > 0, "StepRecord.chunks", "must list at least one sequence")
        _check(_is_int(self.h2d_bytes) and self.h2d_bytes >= 0, "StepRecord.h2d_bytes",
               f"must be a non-negative integer, got {self.h2d_bytes!r}")
        if self.experts_activated is not None:
            _check(all(_is_int(n) and n >= 0 for n in self.experts_activated),
                   "StepRecord.experts_activated", "must be non-negative integers")

    @property
    def num_tokens(self) -> int:
        """New tokens the step ran."""
        return sum(c.new_tokens for c in self.chunks)

    @classmethod
    def from_dict(cls, data: object, where: str = "step") -> StepRecord:
        """Read one step; errors name the field as `where.field`."""
        _check(isinstance(data, Mapping), where, "must be an object")
        assert isinstance(data, Mapping)
        unknown = set(data) - {"phase", "seconds", "chunks", "h2d_bytes", "experts_activated"}
        _check(not unknown, where, f"has unknown field(s) {sorted(unknown)}")
        for key in ("phase", "seconds", "chunks"):
            _check(key in data, f"{where}.{key}", "is missing")
        raw = data["chunks"]
        _check(isinstance(raw, list), f"{where}.chunks", "must be a list of [past, new] pairs")
        chunks = []
        for i, pair in enumerate(raw):
            _check(isinstance(pair, list) and len(pair) == 2 and all(map(_is_int, pair))
                   and pair[0] >= 0 and pair[1] > 0, f"{where}.chunks[{i}]",
                   f"must be [past_tokens >= 0, new_tokens > 0], got {pair!r}")
            chunks.append(Chunk(pair[0], pair[1]))
        experts = data.get("experts_activated")
        _check(experts is None or isinstance(experts, list), f"{where}.experts_activated",
               "must be a list of counts, one per MoE layer")
        try:
            return cls(phase=data["phase"], seconds=data["seconds"], chunks=tuple(chunks),
                       h2d_bytes=data.get("h2d_bytes", 0),
                       experts_activated=None if experts is None else tuple(experts))
        except RunRecordError as exc:
            raise RunRecordError(str(exc).replace("StepRecord", where, 1)) from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form `from_dict` reads."""
        out: dict[str, Any] = {"phase": self.phase, "seconds": self.seconds,
                               "chunks": [[c.past_tokens, c.new_tokens] for c in self.chunks],
                               "h2d_bytes": self.h2d_bytes}
        if self.experts_activated is not None:
            out["experts_activated"] = list(self.experts_activated)
        return out


_REQUIRED = ("engine", "model", "weight_dtype", "kv_dtype", "gpu", "wall_seconds",
             "input_tokens", "output_tokens", "steps")
_OPTIONAL = ("num_layers", "expert_dtype", "compute_dtype", "num_gpus", "cpu", "dram_gib",
             "gpu_energy_j", "cpu_energy_j", "dram_energy_j", "energy_source", "counters",
             "routing", "serving", "accuracy")
_ENERGY_SOURCES = ("nvml", "tdp")


@dataclass(frozen=True)
class RunRecord:
    """One benchmark run, as an engine reports it.

    Attributes:
        engine: Engine name and version (`"moe-gen 0.1.0"`).
        model: Model folder, hub id or known shape name.
        weight_dtype: Storage format of the weights.
        kv_dtype: Storage format of the KV cache.
        gpu: GPU name as the hardware table knows it.
        wall_seconds: Wall time of the whole run (steps plus any overhead between them).
        input_tokens: Prompt tokens processed.
        output_tokens: Tokens generated.
        steps: Every forward step, in order.
        num_layers: Decoder layers actually run, when the model was truncated.
        expert_dtype: Storage format of the routed experts, when it differs from `weight_dtype`.
        compute_dtype: Precision of the matrix products (default: `weight_dtype`).
        num_gpus: GPUs used.
        cpu: Host CPU name as the hardware table knows it.
        dram_gib: Host memory the run used (or the machine has), GiB.
        gpu_energy_j: GPU energy measured over the run (NVML), joules.
        cpu_energy_j: CPU energy measured over the run (e.g. RAPL), joules.
        dram_energy_j: Host memory energy measured over the run, joules.
        energy_source: `"nvml"` when `gpu_energy_j` was measured, `"tdp"` when the runner
            could not measure it (cost then estimates TDP x load).
        counters: Counters the target exposed over the run (expert hits and misses, bytes
            copied host-to-GPU: a server's `/metrics` deltas, an engine's offload counters).
        routing: The benchmark routing the engine's routers were replaced by (`uniform`,
            `zipf:s=S,reuse=R`, `replay:TRACES`; `moe_core.routing_for`); None: the model's
            own routers (or, for a server, not known here).
        serving: What `moe-cap run` measured from the client's side (latency, throughput).
        accuracy: The score of an accuracy task run through the target.

    `steps` may be empty only for a record that has `serving` or `accuracy` (a server measured
    from outside shows no steps); utilisation needs steps.
    """

    engine: str
    model: str
    weight_dtype: str
    kv_dtype: str
    gpu: str
    wall_seconds: float
    input_tokens: int
    output_tokens: int
    steps: tuple[StepRecord, ...]
    num_layers: int | None = None
    expert_dtype: str | None = None
    compute_dtype: str | None = None
    num_gpus: int = 1
    cpu: str | None = None
    dram_gib: float | None = None
    gpu_energy_j: float | None = None
    cpu_energy_j: float | None = None
    dram_energy_j: float | None = None
    energy_source: str | None = None
    counters: dict[str, float] | None = None
    routing: str | None = None
    serving: ServingSummary | None = None
    accuracy: AccuracyResult | None = None
    format: str = field(default=FORMAT)
    version: int = field(default=VERSION)

    def __post_init__(self) -> None:
        _check(self.format == FORMAT, "RunRecord.format", f"must be {FORMAT!r}")
        _check(self.version == VERSION, "RunRecord.version",
               f"must be {VERSION} (this moe-cap reads version {VERSION})")
        for name in ("engine", "model", "gpu"):
            _check(isinstance(getattr(self, name), str) and bool(getattr(self, name)),
                   f"RunRecord.{name}", "must be a non-empty string")
        for name in ("weight_dtype", "kv_dtype", "expert_dtype", "compute_dtype"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_precision(value)
                except ValueError as exc:
                    raise RunRecordError(f"RunRecord.{name}: {exc}") from None
        _check(_is_number(self.wall_seconds) and self.wall_seconds > 0, "RunRecord.wall_seconds",
               f"must be a positive number, got {self.wall_seconds!r}")
        for name in ("input_tokens", "output_tokens"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 0, f"RunRecord.{name}",
                   f"must be a non-negative integer, got {value!r}")
        _check(self.input_tokens + self.output_tokens > 0, "RunRecord.output_tokens",
               "and input_tokens are both zero: nothing to price")
        _check(_is_int(self.num_gpus) and self.num_gpus >= 1, "RunRecord.num_gpus",
               f"must be a positive integer, got {self.num_gpus!r}")
        _check(self.num_layers is None or (_is_int(self.num_layers) and self.num_layers >= 1),
               "RunRecord.num_layers", f"must be a positive integer, got {self.num_layers!r}")
        for name in ("dram_gib", "gpu_energy_j", "cpu_energy_j", "dram_energy_j"):
            value = getattr(self, name)
            _check(value is None or (_is_number(value) and value >= 0), f"RunRecord.{name}",
                   f"must be a non-negative number, got {value!r}")
        _check(len(self.steps) > 0 or self.serving is not None or self.accuracy is not None,
               "RunRecord.steps", "must list at least one step (or the record needs serving "
               "or accuracy)")
        _check(self.energy_source is None or self.energy_source in _ENERGY_SOURCES,
               "RunRecord.energy_source", f"must be one of {_ENERGY_SOURCES}, got "
               f"{self.energy_source!r}")
        _check(self.counters is None or (isinstance(self.counters, dict) and all(
            isinstance(k, str) and _is_number(v) for k, v in self.counters.items())),
            "RunRecord.counters", "must map names to numbers")
        _check(self.routing is None or (isinstance(self.routing, str) and bool(self.routing)),
               "RunRecord.routing", f"must be a non-empty string, got {self.routing!r}")
        total = sum(s.seconds for s in self.steps)
        _check(total <= self.wall_seconds * (1 + _SLACK), "RunRecord.wall_seconds",
               f"({self.wall_seconds}) is less than the steps' total ({total})")

    def phase_seconds(self, phase: Phase) -> float:
        """Time the steps of `phase` took."""
        return sum(s.seconds for s in self.steps if s.phase == phase)

    def prefill_share(self) -> float:
        """Share of the work's time spent in prefill: from the steps, else from the client's
        TTFT against decode time (`serving`), else 1 (a scoring run only reads prompts)."""
        steps_s = sum(s.seconds for s in self.steps)
        if steps_s > 0:
            return self.phase_seconds("prefill") / steps_s
        if self.serving is not None:
            total = self.serving.prefill_seconds + self.serving.decode_seconds
            if total > 0:
                return self.serving.prefill_seconds / total
        return 1.0

    @classmethod
    def from_dict(cls, data: object) -> RunRecord:
        """Read a parsed JSON object.

        Raises:
            RunRecordError: a missing, unknown or bad field (the message names it, e.g.
                `steps[3].seconds`).
        """
        _check(isinstance(data, Mapping), "run record", "must be a JSON object")
        assert isinstance(data, Mapping)
        unknown = set(data) - set(_REQUIRED) - set(_OPTIONAL) - {"format", "version"}
        _check(not unknown, "run record", f"has unknown field(s) {sorted(unknown)}")
        for key in ("format", "version", *_REQUIRED):
            _check(key in data, key, "is missing")
        _check(isinstance(data["steps"], list), "steps", "must be a list")
        steps = tuple(StepRecord.from_dict(s, f"steps[{i}]") for i, s in enumerate(data["steps"]))
        fields = {k: data[k] for k in (*_REQUIRED, *_OPTIONAL, "format", "version") if k in data}
        fields["steps"] = steps
        if "serving" in fields:
            fields["serving"] = ServingSummary.from_dict(fields["serving"])
        if "accuracy" in fields:
            fields["accuracy"] = AccuracyResult.from_dict(fields["accuracy"])
        try:
            return cls(**fields)
        except RunRecordError as exc:
            raise RunRecordError(str(exc).removeprefix("RunRecord.")) from None

    @classmethod
    def from_json(cls, path: str | Path) -> RunRecord:
        """Read a run record file.

        Raises:
            RunRecordError: the file is missing, not JSON, or has a bad field.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunRecordError(f"{path}: no such run record") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunRecordError(f"{path}: not a JSON run record ({exc})") from None
        try:
            return cls.from_dict(data)
        except RunRecordError as exc:
            raise RunRecordError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form `from_dict` reads (optional fields left out when unset)."""
        out: dict[str, Any] = {"format": self.format, "version": self.version}
        for key in _REQUIRED:
            out[key] = getattr(self, key)
        out["steps"] = [s.to_dict() for s in self.steps]
        for key in _OPTIONAL:
            value = getattr(self, key)
            if isinstance(value, ServingSummary | AccuracyResult):
                out[key] = value.to_dict()
            elif value is not None and not (key == "num_gpus" and value == 1):
                out[key] = value
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        """The record as JSON text; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        if path is not None:
            write_output_text(path, text, "the run record")
        return text
