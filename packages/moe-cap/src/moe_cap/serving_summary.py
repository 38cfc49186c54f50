"""The run record's `serving` section: what `moe-cap run` measured from the client's side of a
target (latency percentiles, throughput, goodput), with the load that produced it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_cap.errors import RunRecordError
from moe_cap.latency_stats import Percentiles, Slo, goodput_count, percentiles
from moe_cap.request_result import RequestResult

__all__ = ["LATENCIES", "ServingSummary", "summarise_requests"]

LATENCIES = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
_NUMBERS = ("duration_s", "requests_per_s", "input_tokens_per_s", "output_tokens_per_s",
            "prefill_seconds", "decode_seconds")


@dataclass(frozen=True, kw_only=True)
class ServingSummary:
    """Client-side measurements of a run.

    Attributes:
        target_kind: `"server"` (HTTP), `"engine"` (in process, streaming) or `"offline"`
            (in process, whole workload at once: no TTFT).
        load: The load pattern (`LoadPattern.to_dict`).
        num_requests: Requests sent; num_failed: of which failed.
        duration_s: First send to last answer.
        requests_per_s, input_tokens_per_s, output_tokens_per_s: Successful work per second.
        latencies: Percentiles of `ttft_s`, `tpot_s`, `itl_s`, `e2e_s` (absent: not measured).
        slo: The objective goodput was measured under (None: none given).
        goodput_requests_per_s: Requests per second that met `slo`.
        prefill_seconds: Sum over requests of TTFT (cost split: prefill's share).
        decode_seconds: Sum over requests of e2e minus TTFT.
        interrupted: The run was stopped early (Ctrl-C): what was measured until then.
        requests_file: The per-request rows (JSONL).
    """

    target_kind: str
    load: dict[str, Any]
    num_requests: int
    num_failed: int
    duration_s: float
    requests_per_s: float
    input_tokens_per_s: float
    output_tokens_per_s: float
    latencies: dict[str, Percentiles] = field(default_factory=dict)
    slo: Slo | None = None
    goodput_requests_per_s: float | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    interrupted: bool = False
    requests_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out: dict[str, Any] = {
            "target_kind": self.target_kind, "load": self.load,
            "num_requests": self.num_requests, "num_failed": self.num_failed,
            **{name: getattr(self, name) for name in _NUMBERS},
            "latencies": {k: v.to_dict() for k, v in self.latencies.items()},
            "interrupted": self.interrupted}
        if self.slo is not None:
            out["slo"] = self.slo.to_dict()
            out["goodput_requests_per_s"] = self.goodput_requests_per_s
        if self.requests_file is not None:
            out["requests_file"] = self.requests_file
        return out

    @classmethod
    def from_dict(cls, data: object, where: str = "serving") -> ServingSummary:
        """Read `to_dict`'s form; errors name the field."""
        if not isinstance(data, Mapping):
            raise RunRecordError(f"{where} must be an object")
        known = {"target_kind", "load", "num_requests", "num_failed", *_NUMBERS, "latencies",
                 "slo", "goodput_requests_per_s", "interrupted", "requests_file"}
        unknown = set(data) - known
        if unknown:
            raise RunRecordError(f"{where} has unknown field(s) {sorted(unknown)}")
        try:
            slo = data.get("slo")
            lat = data.get("latencies", {})
            return cls(target_kind=str(data["target_kind"]), load=dict(data["load"]),
                       num_requests=int(data["num_requests"]), num_failed=int(data["num_failed"]),
                       **{name: float(data[name]) for name in _NUMBERS},
                       latencies={k: Percentiles.from_dict(v) for k, v in lat.items()},
                       slo=None if slo is None else Slo(**slo),
                       goodput_requests_per_s=data.get("goodput_requests_per_s"),
                       interrupted=bool(data.get("interrupted", False)),
                       requests_file=data.get("requests_file"))
        except KeyError as exc:
            raise RunRecordError(f"{where}.{exc.args[0]} is missing") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise RunRecordError(f"{where}: {exc}") from None


def summarise_requests(rows: Sequence[RequestResult], *, target_kind: str,
                       load: dict[str, Any], duration_s: float, slo: Slo | None,
                       interrupted: bool, requests_file: str | None) -> ServingSummary:
    """The summary of `rows` measured over `duration_s` seconds."""
    good = [r for r in rows if r.ok]
    seconds = max(duration_s, 1e-9)
    values: dict[str, list[float]] = {
        "ttft_s": [r.ttft_s for r in good if r.ttft_s is not None],
        "tpot_s": [t for r in good if (t := r.tpot_s) is not None],
        "itl_s": [gap for r in good for gap in r.itl_s],
        "e2e_s": [r.e2e_s for r in good if r.e2e_s is not None]}
    latencies = {k: p for k, v in values.items() if (p := percentiles(v)) is not None}
    prefill = sum(r.ttft_s or 0.0 for r in good)
    decode = sum((r.e2e_s or 0.0) - (r.ttft_s or 0.0) for r in good)
    use_slo = slo if slo is not None and slo.is_set else None
    return ServingSummary(
        target_kind=target_kind, load=load, num_requests=len(rows),
        num_failed=len(rows) - len(good), duration_s=duration_s,
        requests_per_s=len(good) / seconds,
        input_tokens_per_s=sum(r.prompt_tokens or 0 for r in good) / seconds,
        output_tokens_per_s=sum(r.output_tokens for r in good) / seconds,
        latencies=latencies, slo=use_slo,
        goodput_requests_per_s=None if use_slo is None else goodput_count(rows, use_slo) / seconds,
        prefill_seconds=prefill, decode_seconds=decode, interrupted=interrupted,
        requests_file=requests_file)
