"""Serving sweep on S3 shapes (issues 16 and 17): `moe-infinity serve` measured over HTTP by
`moe-cap run --url` at several concurrencies, the same workload in process
(`moe-cap run --engine moe-infinity`: what the HTTP layer costs), moe-gen offline on the same
shapes, and `moe-cap report` over every record.

Scenario S3 (../shared/BENCHMARKS.md): Qwen3-30B-A3B shapes (the shipped `qwen3-30b-a3b` shape,
dummy bf16 weights) truncated to 24 layers, a 16 GiB GPU budget, 512-token prompts, 128 new
tokens (ignore EOS), uniform random top-k routing set explicitly in every step (`--routing`;
dummy weights route every decode token to the same experts). The in-process engine gets the
expert-slot bytes the server's memory plan gives its experts, so both cache the same number of
experts.

Every step runs as its own process under a timeout; a failed step is recorded and the sweep goes
on. The summary is rewritten after every step. `--out DIR` receives at most six files:
`summary.json` (every step: command, status, seconds, the run record's serving numbers),
`sweep.log` (each step's stderr tail), `runs.tar.gz` (run records, per-request rows, server log),
`report.tar.gz` (report.md and its figures) and the two main figures loose (`cap_radar.png`,
`throughput_latency.png`).

On the GPU machine (console scripts not installed: the steps run `python3 -m moe_infinity` and
`python3 -m moe_cap`; packages on PYTHONPATH). It lacks the server's and the report's packages:
carry them as wheels for CPython 3.12 (the device tool's README says how), at the versions of
uv.lock: annotated-doc, annotated-types, anyio, certifi, contourpy, cycler, fastapi, fonttools,
h11, httpcore, httpx, idna, kiwisolver, matplotlib, opentelemetry-api (fastapi needs it),
pillow, prometheus-client, pydantic, pydantic-core, pyparsing, python-dateutil, six, sniffio,
starlette, typing-extensions, typing-inspection, tzdata (python-dateutil needs it), uvicorn
(28 MB in all). Then, with `.whl` carried:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:packages/moe-core/src:\
    packages/moe-gen/src:packages/moe-infinity/src:packages/moe-cap/src HF_HUB_OFFLINE=1 \
        PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    timeout 480 python3 benchmarks/serve_sweep.py --out $OUT/sweep --total-timeout 450

The first run (2026-12-03) failed: the server drew its 30 GB of dummy weights on the host for
longer than the 150 s start-up limit (`--load-timeout`); they are drawn on the GPU since.

`--prefill stream` runs the server and the in-process engine with prompt chunks streaming their
missing experts through the prefill ring instead of admitting them (moe-core's decision 0018;
the server's label then says `prefill stream`).

On a CPU (tiny-moe, tiny counts, proves the plumbing):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve_sweep.py --smoke --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

_SERVING = re.compile(r"serving (\S+) on (http://\S+/v1)")


@dataclass
class Sweep:
    """What the sweep runs and where it writes."""

    args: argparse.Namespace
    out: Path
    work: Path
    started: float = field(default_factory=time.perf_counter)
    steps: list[dict[str, object]] = field(default_factory=list)
    records: list[Path] = field(default_factory=list)

    @property
    def deadline_left_s(self) -> float:
        return self.args.total_timeout - (time.perf_counter() - self.started)

    def python(self, module: str, *argv: str) -> list[str]:
        return [sys.executable, "-m", module, *argv]

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)
        with (self.out / "sweep.log").open("a", encoding="utf-8") as f:
            f.write(text.rstrip() + "\n")

    def save(self) -> None:
        """Rewrite summary.json (after every step: a cut-short sweep keeps what it measured)."""
        data = {"settings": {k: str(v) if isinstance(v, Path) else v
                             for k, v in vars(self.args).items()},
                "elapsed_s": round(time.perf_counter() - self.started, 1),
                "acceptance": acceptance(self), "steps": self.steps}
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.out / "summary.json")


def _serving_numbers(record_path: Path) -> dict[str, object]:
    """The run record's headline numbers: latency percentiles (TTFT/TPOT/ITL/e2e, seconds),
    throughput, the engine's counters."""
    data = json.loads(record_path.read_text(encoding="utf-8"))
    serving = data.get("serving") or {}
    keep: dict[str, object] = {"engine": data.get("engine"),
                               "output_tokens": data.get("output_tokens"),
                               "wall_seconds": data.get("wall_seconds"),
                               "counters": data.get("counters"),
                               "latencies": serving.get("latencies", {})}
    for name, value in serving.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            keep[name] = value
    return keep


def run_step(sweep: Sweep, name: str, argv: list[str], timeout_s: float,
             record: Path | None = None) -> bool:
    """Run one step's process with a timeout; record its outcome; True when it succeeded."""
    timeout_s = max(5.0, min(timeout_s, sweep.deadline_left_s - 5.0))
    sweep.log(f"== {name}: {' '.join(argv)} (timeout {timeout_s:.0f} s)")
    started = time.perf_counter()
    step: dict[str, object] = {"name": name, "argv": argv}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
        step["status"] = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        tail = done.stderr[-3000:]
    except subprocess.TimeoutExpired as exc:
        step["status"] = "timeout"
        err = exc.stderr or b""
        tail = (err.decode(errors="replace") if isinstance(err, bytes) else err)[-3000:]
    step["seconds"] = round(time.perf_counter() - started, 1)
    if tail.strip():
        sweep.log(tail)
    if record is not None and record.is_file():
        try:
            step["result"] = _serving_numbers(record)
            sweep.records.append(record)
        except (OSError, ValueError) as exc:
            step["result_error"] = str(exc)
    sweep.log(f"-- {name}: {step['status']} in {step['seconds']} s")
    sweep.steps.append(step)
    sweep.save()
    return step["status"] == "ok"


class Server:
    """`moe-infinity serve` as a child process: started, waited for, stopped with SIGTERM."""

    def __init__(self, sweep: Sweep, argv: list[str]) -> None:
        self.sweep = sweep
        self.argv = argv
        self.log_path = sweep.work / "server.log"
        self.url: str | None = None
        self.model: str | None = None
        self._found = threading.Event()
        self._log = self.log_path.open("a", encoding="utf-8")
        self._log.write(f"$ {' '.join(argv)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True)
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            match = _SERVING.search(line)
            if match and not self._found.is_set():
                self.model, self.url = match.group(1), match.group(2)
                self._found.set()

    def wait_ready(self, timeout_s: float) -> str | None:
        """None when /health answers; else why not."""
        deadline = time.perf_counter() + timeout_s
        while not self._found.wait(0.5):
            if self.proc.poll() is not None:
                return f"the server exited with status {self.proc.returncode} before serving"
            if time.perf_counter() > deadline:
                return f"the server did not start within {timeout_s:.0f} s"
        assert self.url is not None
        return wait_healthy(self.proc, self.url, deadline - time.perf_counter(), "the server")

    def stop(self, timeout_s: float = 60.0) -> str:
        """SIGTERM, then SIGKILL after `timeout_s`; the exit status as text."""
        return stop_child(self.proc, self._log, timeout_s)


def wait_healthy(proc: subprocess.Popen[Any], url: str, timeout_s: float,
                 name: str) -> str | None:
    """None once the server at `url` (`.../v1`) answers 200 on `/health` within `timeout_s`;
    else why not (`name` exited, or no answer)."""
    health = url.removesuffix("/v1") + "/health"
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            with urllib.request.urlopen(health, timeout=5) as response:
                if response.status == 200:
                    return None
        except OSError:  # refused while starting; HTTPError (503 while loading) is one too
            pass
        if proc.poll() is not None:
            return f"{name} exited with status {proc.returncode}"
        time.sleep(0.5)
    return f"{health} did not answer 200 within {timeout_s:.0f} s"


def stop_child(proc: subprocess.Popen[Any], log: TextIO, timeout_s: float) -> str:
    """SIGTERM `proc`, then SIGKILL after `timeout_s`; close its `log`; the outcome as text."""
    outcome = None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            outcome = "killed after SIGTERM timed out"
    log.close()
    return outcome or f"exit {proc.returncode}"


def _serve_argv(sweep: Sweep, fetch: str, lanes: int) -> list[str]:
    a = sweep.args
    argv = sweep.python("moe_infinity", "serve", a.model, "--gpu-memory", a.gpu_memory,
                        "--port", "0", "--policy", a.policy, "--routing", a.routing,
                        "--fetch", fetch, "--lanes", str(lanes), "--prefill", a.prefill,
                        "--device", a.device, "--max-batch", str(max(a.concurrency)),
                        "--grace", "5")
    if a.kv_memory:
        argv += ["--kv-memory", a.kv_memory]
    return argv + _model_argv(a)


def _server_label(argv: list[str]) -> str:
    """The server's name in the records and the report: its fetch path, lanes, policy, and how
    its prompts treat misses where they stream them."""
    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1] if flag in argv else "?"
    lanes = value("--lanes")
    experts = f", experts {value('--expert-dtype')}" if "--expert-dtype" in argv else ""
    prefill = ", prefill stream" if value("--prefill") == "stream" else ""
    return (f"moe-infinity serve ({value('--fetch')}, {lanes} lane{'s' if lanes != '1' else ''}, "
            f"{value('--policy')}{experts}{prefill})")


def _model_argv(a: argparse.Namespace) -> list[str]:
    """The model options every engine of the sweep takes: dummy weights, truncation, dtype, the
    experts' storage (the server, the in-process engine and moe-gen all take --expert-dtype)."""
    argv = ["--dummy"] if a.dummy else []
    if a.num_layers:
        argv += ["--num-layers", str(a.num_layers)]
    if a.dtype:
        argv += ["--dtype", a.dtype]
    if a.expert_dtype:
        argv += ["--expert-dtype", a.expert_dtype]
    return argv


def _workload_argv(sweep: Sweep, num_requests: int) -> list[str]:
    a = sweep.args
    return ["--input-len", str(a.input_len), "--output-len", str(a.output_len),
            "--num-prompts", str(num_requests), "--requests", str(num_requests),
            "--max-tokens", str(a.output_len), "--seed", "0"]


def start_server(sweep: Sweep) -> Server | None:
    """The server with the sweep's fetch path; if that fails to start, with `--fetch copy`."""
    a = sweep.args
    tries = [(a.fetch, a.lanes)] + ([("copy", 1)] if (a.fetch, a.lanes) != ("copy", 1) else [])
    for fetch, lanes in tries:
        started = time.perf_counter()
        server = Server(sweep, _serve_argv(sweep, fetch, lanes))
        problem = server.wait_ready(min(a.load_timeout, sweep.deadline_left_s - 10))
        step: dict[str, object] = {"name": f"serve start (fetch {fetch}, lanes {lanes})",
                                   "argv": server.argv,
                                   "seconds": round(time.perf_counter() - started, 1)}
        if problem is None:
            step["status"], step["url"] = "ok", server.url
            sweep.steps.append(step)
            sweep.log(f"-- server ready at {server.url} in {step['seconds']} s")
            sweep.save()
            return server
        step["status"] = f"failed: {problem}; {server.stop(10)}"
        sweep.steps.append(step)
        sweep.log(f"-- {step['name']}: {step['status']}")
        sweep.log(_tail(server.log_path))
        sweep.save()
    return None


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def http_sweep(sweep: Sweep) -> dict[str, object] | None:
    """The server at each concurrency; returns the fetch path it ran with."""
    a = sweep.args
    server = start_server(sweep)
    if server is None:
        return None
    try:
        for c, n in zip(a.concurrency, a.requests, strict=True):
            if sweep.deadline_left_s < 30:
                sweep.log(f"-- skipping http c={c}: out of time")
                break
            record = sweep.work / f"http-c{c}.json"
            assert server.url is not None and server.model is not None
            argv = sweep.python("moe_cap", "run", "--url", server.url, "--model", server.model,
                                "--label", _server_label(server.argv),
                                *_workload_argv(sweep, n), "--concurrency", str(c),
                                "--out", str(record))
            if a.num_layers:
                argv += ["--num-layers", str(a.num_layers)]
            if a.expert_dtype:  # the record says what the server's experts are
                argv += ["--expert-dtype", a.expert_dtype]
            run_step(sweep, f"http c={c} ({n} requests)", argv, a.step_timeout, record)
    finally:
        status = server.stop()
        sweep.steps.append({"name": "serve stop", "status": status})
        sweep.log(f"-- server stopped: {status}")
        sweep.log(_tail(server.log_path, 1500))
        sweep.save()
    return {"fetch": server.argv[server.argv.index("--fetch") + 1],
            "lanes": int(server.argv[server.argv.index("--lanes") + 1])}


def expert_slot_bytes(sweep: Sweep) -> int:
    """The expert-slot bytes of the server's memory plan (so the in-process engine caches as
    many experts as the server)."""
    import torch
    from moe_core import ModelSpec, parse_bytes, resolve_model_path, run_dtype
    from moe_infinity.serving.memory_plan import plan_memory

    a = sweep.args
    spec = ModelSpec.from_pretrained(resolve_model_path(a.model, weights=False))
    if a.num_layers:
        spec = spec.truncated(a.num_layers)
    device = a.device if a.device != "auto" else ("cuda" if _has_cuda() else "cpu")
    dtype = run_dtype(a.dtype or None, torch.device(device), spec.torch_dtype)
    kv = parse_bytes(a.kv_memory) if a.kv_memory else None
    return plan_memory(spec, dtype, parse_bytes(a.gpu_memory), max(a.concurrency),
                       kv).expert_bytes


def in_process(sweep: Sweep, path: dict[str, object]) -> None:
    """The same workload through `moe-cap run --engine moe-infinity` (batch 1, one request at a
    time: the interim engine is moe-core's generation; see moe_cap.engines)."""
    a = sweep.args
    if a.inproc_requests <= 0 or sweep.deadline_left_s < 60:
        return
    device = a.device if a.device != "auto" else ("cuda" if _has_cuda() else "cpu")
    record = sweep.work / "engine-c1.json"
    try:
        slots = expert_slot_bytes(sweep)
    except Exception as exc:  # recorded; the sweep goes on
        sweep.steps.append({"name": "in-process expert memory", "status": f"failed: {exc}"})
        sweep.save()
        return
    argv = sweep.python("moe_cap", "run", a.model, "--engine", "moe-infinity",
                        *_workload_argv(sweep, a.inproc_requests), "--concurrency", "1",
                        "--device", device, "--expert-memory", str(slots),
                        "--routing", a.routing, "--fetch", str(path["fetch"]),
                        "--lanes", str(path["lanes"]), "--prefill", a.prefill,
                        "--out", str(record),
                        *_model_argv(a))
    run_step(sweep, f"in-process moe-infinity c=1 ({a.inproc_requests} requests)", argv,
             a.step_timeout, record)


def moe_gen_offline(sweep: Sweep) -> None:
    """moe-gen's offline engine on the same shapes and prompts, with the sweep's routing (set
    explicitly as for the other steps: dummy weights would activate only a few experts per
    layer per decode step, so moe-gen would move far fewer expert bytes than real routing
    makes it)."""
    a = sweep.args
    if a.moe_gen_requests <= 0 or sweep.deadline_left_s < 60:
        return
    device = a.device if a.device != "auto" else ("cuda" if _has_cuda() else "cpu")
    record = sweep.work / "moe-gen.json"
    argv = sweep.python("moe_cap", "run", a.model, "--engine", "moe-gen",
                        *_workload_argv(sweep, a.moe_gen_requests), "--device", device,
                        "--gpu-memory", a.gpu_memory, "--routing", a.routing,
                        "--out", str(record), *_model_argv(a))
    run_step(sweep, f"moe-gen offline ({a.moe_gen_requests} requests)", argv, a.step_timeout,
             record)


def report(sweep: Sweep, title: str = "moe-infinity serve sweep (S3 shapes)",
           extra: tuple[Path, ...] = ()) -> None:
    """`moe-cap report` over every record (and `extra` ones measured elsewhere); the report
    tarred, its two main figures loose."""
    if not sweep.records:
        return
    folder = sweep.work / "report"
    argv = sweep.python("moe_cap", "report", *map(str, [*sweep.records, *extra]), "--out",
                        str(folder), "--title", title)
    run_step(sweep, "report", argv, 120)
    if folder.is_dir():
        with tarfile.open(sweep.out / "report.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="report")
        for name in ("cap_radar.png", "throughput_latency.png"):
            if (folder / name).is_file():
                shutil.copy(folder / name, sweep.out / name)


def pack_runs(sweep: Sweep) -> None:
    with tarfile.open(sweep.out / "runs.tar.gz", "w:gz") as tar:
        for path in sorted(sweep.work.iterdir()):
            if path.is_file():
                tar.add(path, arcname=f"runs/{path.name}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _latency(step: dict[str, object], name: str, q: str) -> float | None:
    result = step.get("result")
    latencies = result.get("latencies") if isinstance(result, dict) else None
    block = latencies.get(name) if isinstance(latencies, dict) else None
    value = block.get(q) if isinstance(block, dict) else None
    return float(value) if isinstance(value, int | float) else None


def _cell(value: float | None, scale: float = 1e3) -> str:
    return f"{value * scale:8.1f}" if value is not None else f"{'-':>8}"


def acceptance(sweep: Sweep) -> dict[str, object] | None:
    """Issue 16: at concurrency 1 the HTTP TPOT p50 within 10% of the in-process one."""
    http = next((s for s in sweep.steps if str(s["name"]).startswith("http c=1 ")), None)
    local = next((s for s in sweep.steps if str(s["name"]).startswith("in-process")), None)
    if http is None or local is None:
        return None
    a, b = _latency(http, "tpot_s", "p50"), _latency(local, "tpot_s", "p50")
    if a is None or b is None:
        return None
    return {"http_tpot_p50_s": a, "in_process_tpot_p50_s": b, "ratio": a / b,
            "within_10_percent": a <= 1.1 * b}


def print_table(sweep: Sweep) -> None:
    """One line per measured step: TTFT and TPOT p50/p99 (ms), output tok/s."""
    lines = [f"{'step':44} {'status':>8} {'TTFT50':>8} {'TTFT99':>8} {'TPOT50':>8} "
             f"{'TPOT99':>8} {'tok/s':>8}"]
    for step in sweep.steps:
        result = step.get("result")
        rate = result.get("output_tokens_per_s") if isinstance(result, dict) else None
        status = str(step.get("status", ""))[:8]
        lines.append(f"{str(step['name'])[:44]:44} {status:>8} "
                     f"{_cell(_latency(step, 'ttft_s', 'p50'))} "
                     f"{_cell(_latency(step, 'ttft_s', 'p99'))} "
                     f"{_cell(_latency(step, 'tpot_s', 'p50'))} "
                     f"{_cell(_latency(step, 'tpot_s', 'p99'))} "
                     f"{_cell(rate if isinstance(rate, int | float) else None, 1.0)}")
    check = acceptance(sweep)
    if check is not None:
        lines.append(f"c=1 TPOT p50: HTTP {check['http_tpot_p50_s'] * 1e3:.2f} ms vs in-process "
                     f"{check['in_process_tpot_p50_s'] * 1e3:.2f} ms (x{check['ratio']:.3f}; "
                     f"within 10%: {check['within_10_percent']})")
    lines.append(f"total {time.perf_counter() - sweep.started:.0f} s")
    text = "\n".join(lines)
    sweep.log(text)
    print(text, flush=True)


PARTS = ("http", "in-process", "moe-gen")


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in parts if v not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown parts {unknown}; choose from {PARTS}")
    return parts


def int_list(text: str) -> list[int]:
    """`--concurrency` / `--requests`: comma-separated integers (llama_peer.py's too)."""
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the (few) result files")
    p.add_argument("--smoke", action="store_true",
                   help="tiny-moe on the CPU with tiny counts (proves the plumbing)")
    p.add_argument("--model", default="qwen3-30b-a3b")
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--gpu-memory", default="16GiB")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-memory", default="",
                   help="the server's KV pool (e.g. 600MiB: llama_peer.py's 16 slots x 768 "
                        "tokens at S3); default: the server's own split of the budget")
    p.add_argument("--device", default="auto")
    p.add_argument("--routing", default="uniform")
    p.add_argument("--policy", default="lru",
                   help="the server's eviction policy (lru: as the in-process engine's)")
    p.add_argument("--fetch", default="mapped", help="copy or mapped (falls back to copy if "
                   "the server fails to start with mapped)")
    p.add_argument("--lanes", type=int, default=1)
    p.add_argument("--prefill", default="admit", choices=["admit", "stream"],
                   help="how the server's and the in-process engine's prompt chunks treat "
                        "missing experts: admit (into the cache) or stream (through a ring of "
                        "staging slots, none admitted; moe-core's decision 0018)")
    p.add_argument("--expert-dtype", default="",
                   help="fp8: the routed experts as e4m3 with per-output-channel scales in every "
                        "step (server, in-process engine, moe-gen); default: the model dtype")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int_list, default=[1, 4, 16])
    p.add_argument("--requests", type=int_list, default=[4, 8, 16],
                   help="requests at each concurrency")
    p.add_argument("--inproc-requests", type=int, default=4)
    p.add_argument("--moe-gen-requests", type=int, default=16)
    p.add_argument("--load-timeout", type=float, default=150.0,
                   help="seconds for the server to load and answer /health")
    p.add_argument("--step-timeout", type=float, default=150.0)
    p.add_argument("--total-timeout", type=float, default=460.0,
                   help="the sweep stops starting steps once this is spent")
    p.add_argument("--no-dummy", dest="dummy", action="store_false")
    p.add_argument("--parts", type=_parts, default=PARTS,
                   help=f"which steps run, comma-separated (default: {','.join(PARTS)}; the "
                        f"report always)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.num_layers, args.gpu_memory, args.dtype = "tiny-moe", 0, "64MiB", ""
        args.device, args.input_len, args.output_len = "cpu", 32, 8
        args.concurrency, args.requests = [1, 2], [2, 4]
        args.inproc_requests, args.moe_gen_requests = 2, 4
        args.load_timeout = args.step_timeout = 240.0
        args.total_timeout = 900.0
    if len(args.concurrency) != len(args.requests):
        p.error("--concurrency and --requests need as many values each")
    return args


def run_sweep(args: argparse.Namespace, prefix: str, steps: Callable[[Sweep], None]) -> int:
    """Run `steps` on a sweep writing to `args.out` (a work folder named `prefix...` for its
    records); whatever happens, pack the runs, save the summary and print the table. 0 when
    some record was made."""
    args.out.mkdir(parents=True, exist_ok=True)
    # An outer `timeout` sends SIGTERM: unwind (stop the server, pack, print) instead of dying.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        sweep = Sweep(args, args.out, Path(work))
        sweep.save()
        try:
            steps(sweep)
        finally:
            pack_runs(sweep)
            sweep.save()
            print_table(sweep)
    return 0 if sweep.records else 1


def _steps(sweep: Sweep) -> None:
    a = sweep.args
    path = (http_sweep(sweep) if "http" in a.parts else None) or {"fetch": a.fetch,
                                                                  "lanes": a.lanes}
    if "in-process" in a.parts:
        in_process(sweep, path)
    if "moe-gen" in a.parts:
        moe_gen_offline(sweep)
    report(sweep)


def main(argv: list[str] | None = None) -> int:
    return run_sweep(parse_args(argv), "serve-sweep-", _steps)


if __name__ == "__main__":
    sys.exit(main())
