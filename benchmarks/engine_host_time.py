"""Host time of the serving engine per decode step at batch 1, by phase (issue 16's latency
target: the HTTP stream's time per output token within 10% of in-process decode).

    PYTHONPATH=packages/moe-core/src:packages/moe-infinity/src \
        python3 benchmarks/engine_host_time.py --tokens 512 --json $OUT/engine_host_time.json

Runs the `Engine` of `moe-infinity serve` in-process on the embedded tiny model (`--device`, the
CPU by default; the policy `serve` uses, activation, so the activation feed runs), or on what
`--model`, `--dummy`, `--num-layers`, `--gpu-memory`, `--fetch`, `--routing` ... name, as
`serve` takes them (S3 as the serving sweep runs it: `--device cuda --model qwen3-30b-a3b
--dummy --num-layers 24 --kv-memory 576MiB --policy lru --fetch mapped --routing uniform
--prompt-tokens 512 --tokens 128`; the record says whether decode was captured), a few short
requests first (warm-up, and EAMs in the trace collection as a running server has them), then
one greedy request of `--tokens` output tokens with EOS ignored. Every phase of the engine
thread's work is timed with `time.perf_counter` by wrapping the functions that do it (timers
nest: a phase's time excludes the phases it calls), per engine step:

- schedule: `Scheduler.plan`;
- indices: the pass's index tensors (`RaggedPass`, the captured pass's `fill`, their
  incremental forms where present);
- forward: the model pass (on CUDA with graphs: enqueueing the replay; before decision 0017
  also its wait and the routing read);
- choose: the next tokens chosen on the device (`choose_tokens`);
- ahead: enqueueing the next decode pass before the step's host work (decision 0017), less
  its indices and forward: its presence marks a step whose host work ran while the next pass
  computed;
- wait: the engine thread blocked until the pass's routing and tokens reached the host
  (`PassReadback.wait`);
- trace: the live tracer's pass set-up and read-back, each request's trace recorder and the
  activation feed (observe and refresh);
- detokenise: `TextStream.push` and `flush`;
- emit: handing the event to its sink;
- publish: the engine's snapshot after the step;
- other: the rest of the step (bookkeeping).

"host" is every phase but forward and wait: what a CUDA graph replay does not hide by itself.
With overlapped steps (decision 0017) part of it runs while the next pass computes: "hidden"
is the host work of a step after the next pass was enqueued (trace, detokenise, emit, publish;
0 in a step that did not run ahead), "exposed" the rest of "host". On CUDA, a step whose
"wait" is above zero found the GPU still busy after that work, so the work was hidden behind
it entirely; "busy" is the step less its wait (the engine thread's own time), "overlapped" the
share of steps that ran ahead. `--no-overlap` runs the same steps serially to compare.

Steps are reported in two windows of the output, its first `--window` tokens (after the
first) and its last, so the growth of any per-token cost with the output's length shows
(detokenisation decoded the whole output at every token before it was made incremental).
Phases missing from the code under test (an older commit) are reported as zero.
"""

from __future__ import annotations

import argparse
import importlib
import json
import queue
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

PHASES: dict[str, tuple[str, ...]] = {
    "schedule": ("scheduler:Scheduler.plan",),
    "indices": ("ragged_pass:RaggedPass.__init__", "captured_decode:StaticDecodePass.fill",
                "decode_passes:DecodePasses.build"),
    "forward": ("engine:run_pass", "captured_decode:CapturedDecode.run",
                "pass_launcher:run_pass", "captured_decode:CapturedDecode.launch"),
    "choose": ("engine:choose_tokens",),
    "ahead": ("engine:Engine._launch_ahead",),
    "wait": ("pass_readback:PassReadback.wait",),
    "trace": ("live_tracer:LiveTracer.begin_pass", "live_tracer:LiveTracer.end_pass",
              "live_tracer:LiveTracer.drop_pass", "trace_recorder:TraceRecorder.add",
              "activation_feed:ActivationFeed.observe", "activation_feed:ActivationFeed.refresh"),
    "detokenise": ("text_stream:TextStream.push", "text_stream:TextStream.flush"),
    "emit": ("sequence:Sequence.emit",),
    "publish": ("engine:Engine._publish",),
}
"""Phase -> the functions (`module:attribute` under `moe_infinity.serving`) whose time is its
(names of older commits kept: a missing one is listed, not an error)."""
STEP = "engine:Engine._step"
ORDER = (*PHASES, "other")
NOT_HOST = ("forward", "wait")
"""Phases that are the device's work or waiting for it, not the host's own."""
AFTER_LAUNCH = ("trace", "detokenise", "emit", "publish")
"""Host phases of a step that run after the next pass was enqueued, where it ran ahead."""


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
"""`wall`: elapsed time, what a stream waits; `cpu`: the engine thread's own CPU time, which other
processes on a shared machine do not inflate."""


@dataclass
class PhaseClock:
    """Per-step phase times of the engine thread (seconds) on each of `CLOCKS`, nested timers
    exclusive."""

    steps: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: {name: [] for name in CLOCKS})
    _stack: list[list[float]] = field(default_factory=list)  # per open timer: starts, child times

    def new_step(self) -> None:
        """Start the next step's record."""
        for records in self.steps.values():
            records.append({})

    def clear(self) -> None:
        """Forget the steps so far."""
        for records in self.steps.values():
            records.clear()

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        """Time the enclosed code as `phase` (less any timed code it calls)."""
        clocks = list(CLOCKS.values())
        frame = [clock() for clock in clocks] + [0.0] * len(clocks)
        self._stack.append(frame)
        try:
            yield
        finally:
            ends = [clock() for clock in clocks]
            self._stack.pop()
            for k, records in enumerate(self.steps.values()):
                spent = ends[k] - frame[k]
                if self._stack:
                    self._stack[-1][len(clocks) + k] += spent
                if records:
                    records[-1][phase] = (records[-1].get(phase, 0.0) + spent
                                          - frame[len(clocks) + k])


def _wrap(clock: PhaseClock, phase: str, fn: Callable[..., Any], starts_step: bool
          ) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        if starts_step:
            clock.new_step()
        with clock.timing(phase):
            return fn(*args, **kwargs)

    timed.__wrapped__ = fn  # type: ignore[attr-defined]
    return timed


def instrument(clock: PhaseClock) -> list[str]:
    """Wrap every phase's functions found in `moe_infinity.serving`; the names not found."""
    missing = []
    targets = [(STEP, "other", True)] + [(name, phase, False)
                                         for phase, names in PHASES.items() for name in names]
    for name, phase, starts_step in targets:
        module_name, attribute = name.split(":")
        try:
            owner: Any = importlib.import_module(f"moe_infinity.serving.{module_name}")
        except ImportError:
            missing.append(name)
            continue
        *path, leaf = attribute.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, leaf):
            missing.append(name)
            continue
        setattr(owner, leaf, _wrap(clock, phase, getattr(owner, leaf), starts_step))
    return missing


def run_request(engine: Any, request: Any, timeout_s: float = 600.0) -> list[Any]:
    """Submit `request`, wait for its last event; its events."""
    events: queue.Queue[Any] = queue.Queue()
    engine.submit(request, events.put)
    out = []
    deadline = time.monotonic() + timeout_s
    while True:
        event = events.get(timeout=max(0.1, deadline - time.monotonic()))
        out.append(event)
        if event.finish_reason is not None:
            return out


def summarise(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median milliseconds per step of each phase (robust to a busy machine's outliers); of the
    step's `host` time (every phase but forward and wait; `host_mean` too), the part of it
    `hidden` behind the next pass (the phases after its launch, in a step that ran ahead) and
    the rest `exposed`, the step less its wait (`busy`) and the step (`total`); and the share
    of steps that ran ahead (`overlapped`, 0 to 1)."""
    row = {phase: 1e3 * statistics.median(s.get(phase, 0.0) for s in steps) for phase in ORDER}
    hosts = [sum(v for k, v in s.items() if k not in NOT_HOST) for s in steps]
    hidden = [sum(s.get(k, 0.0) for k in AFTER_LAUNCH) if "ahead" in s else 0.0 for s in steps]
    row["host"] = 1e3 * statistics.median(hosts)
    row["host_mean"] = 1e3 * statistics.fmean(hosts)
    row["hidden"] = 1e3 * statistics.median(hidden)
    row["exposed"] = 1e3 * statistics.median(h - d for h, d in zip(hosts, hidden, strict=True))
    row["busy"] = 1e3 * statistics.median(sum(s.values()) - s.get("wait", 0.0) for s in steps)
    row["total"] = 1e3 * statistics.median(sum(s.values()) for s in steps)
    row["overlapped"] = statistics.fmean("ahead" in s for s in steps)
    return row


def report(clock_name: str, steps: list[dict[str, float]], tokens: int, window: int
           ) -> dict[str, Any]:
    """Print one clock's table (first window, last window, every decode step); its record."""
    # Step 0 prefills and samples the first token; each later step decodes one token.
    decode = steps[1:tokens]
    windows = {f"tokens 2-{window + 1}": decode[:window],
               f"tokens {tokens - window + 1}-{tokens}": decode[-window:],
               f"all {len(decode)} steps": decode}
    table = {name: summarise(part) for name, part in windows.items()}
    first, last = (table[name]["detokenise"] for name in list(windows)[:2])
    growth = last / first if first > 0 else float("nan")
    print(f"\n{clock_name} clock")
    print(f"{'phase':<12}" + "".join(f"{name:>22}" for name in table))
    for phase in (*ORDER, "host", "host_mean", "hidden", "exposed", "busy", "total",
                  "overlapped"):
        print(f"{phase:<12}" + "".join(f"{row[phase]:>22.3f}" for row in table.values()))
    print(f"detokenise, last window / first window: {growth:.2f}x")
    return {"ms_per_step": table, "detokenise_growth": growth}


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """The options that say which engine `moe-infinity serve` would build, as it takes them
    (`engine_settings` reads them; `pass_kernels.py` takes them too)."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny-moe",
                        help="what `serve` takes: tiny-moe, a folder, or a shipped shape with "
                             "--dummy (S3: qwen3-30b-a3b --dummy --num-layers 24)")
    parser.add_argument("--dummy", action="store_true")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--gpu-memory", default="16GiB")
    parser.add_argument("--kv-memory", default=None, help="e.g. 576MiB (default: serve's split)")
    parser.add_argument("--policy", default="activation", help="serve's --policy")
    parser.add_argument("--fetch", default="copy", help="copy, or mapped (captured decode)")
    parser.add_argument("--lanes", type=int, default=1)
    parser.add_argument("--expert-dtype", choices=["fp8"], default=None,
                        help="serve's --expert-dtype")
    parser.add_argument("--routing", default=None, help="e.g. uniform (benchmark routing)")
    parser.add_argument("--no-overlap", action="store_true",
                        help="every step's host work between passes (decision 0017's baseline)")


def engine_settings(args: argparse.Namespace) -> Any:
    """The `EngineSettings` of `add_serve_options`' options, batch 1 (`serve --max-batch 1`)."""
    from moe_core import parse_bytes
    from moe_infinity.serving.engine_setup import EngineSettings
    from moe_infinity.serving.expert_settings import ExpertSettings

    experts = ExpertSettings(dummy=args.dummy, num_layers=args.num_layers, fetch=args.fetch,
                             lanes=args.lanes, routing=args.routing,
                             expert_dtype=args.expert_dtype)
    settings = EngineSettings(model=args.model, device=args.device, dtype=None,
                              gpu_memory_bytes=parse_bytes(args.gpu_memory),
                              kv_memory_bytes=(parse_bytes(args.kv_memory)
                                               if args.kv_memory else None),
                              policy=args.policy, traces=None, save_every=0,
                              trace_capacity=1000, max_batch=1, max_queue=8,
                              prefill_chunk=256, experts=experts)
    if args.no_overlap:  # EngineSettings.overlap is absent before decision 0017
        settings = replace(settings, overlap=False)
    return settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_serve_options(parser)
    parser.add_argument("--tokens", type=int, default=512, help="output tokens measured")
    parser.add_argument("--window", type=int, default=32, help="steps per reported window")
    parser.add_argument("--warmup", type=int, default=4, help="short requests run first")
    parser.add_argument("--prompt", default="Once upon a time, there was a little fox who")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="a prompt of this many token ids instead of --prompt's text")
    args = parser.parse_args()
    if args.tokens < 2 * args.window + 1:
        parser.error("--tokens must be more than twice --window")

    from moe_infinity.serving.engine_setup import build_engine
    from moe_infinity.serving.request import GenerationRequest

    clock = PhaseClock()
    missing = instrument(clock)
    engine = build_engine(engine_settings(args))
    decode_mode = engine.eager_decode_reason()
    tokenizer = engine.served.tokenizer
    prompt = (tuple(range(1, args.prompt_tokens + 1)) if args.prompt_tokens
              else tuple(tokenizer(args.prompt)["input_ids"]))
    engine.start()
    try:
        for i in range(args.warmup):
            run_request(engine, GenerationRequest(request_id=f"warm{i}", prompt_ids=prompt,
                                                  max_tokens=16, ignore_eos=True))
        clock.clear()
        started = time.perf_counter()
        events = run_request(engine, GenerationRequest(
            request_id="measured", prompt_ids=prompt, max_tokens=args.tokens, ignore_eos=True))
        wall_s = time.perf_counter() - started
        steps_ahead = getattr(engine.snapshot(), "steps_ahead", 0)  # measured request and warm-up
    finally:
        engine.stop()
    record: dict[str, Any] = {
        "device": args.device, "tokens": args.tokens, "window": args.window,
        "prompt_tokens": len(prompt), "num_events": len(events), "wall_s": wall_s,
        "missing_phases": missing, "model": args.model, "num_layers": args.num_layers,
        "policy": args.policy, "fetch": args.fetch, "lanes": args.lanes,
        "expert_dtype": args.expert_dtype,
        "routing": args.routing, "overlap": not args.no_overlap, "steps_ahead": steps_ahead,
        "decode": "captured" if decode_mode is None else f"eager ({decode_mode})"}
    print(f"engine host ms per decode step (median), batch 1, {args.device}, {args.model} "
          f"({len(prompt)}-token prompt, {args.tokens} tokens, {wall_s:.1f} s, "
          f"{record['decode']} decode, {'serial' if args.no_overlap else 'overlapped'} steps, "
          f"{steps_ahead} passes enqueued ahead)")
    for clock_name, steps in clock.steps.items():
        record[clock_name] = report(clock_name, steps, args.tokens, args.window)
    if missing:
        print(f"not in this code: {', '.join(missing)}", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
