"""The llama.cpp peer of the S3 serving sweep: build `llama-server` (CUDA) from the sources
carried in `.peer/`, write a dummy GGUF of the S3 shapes, serve it with the experts of the first
11 layers on the CPU (`--n-cpu-moe 11`: 16.07 GiB of bf16 weights on the GPU, the S3 budget) and
measure it over HTTP with our own client, `moe-cap run --url`, exactly as serve_sweep.py
measures `moe-infinity serve` (same prompts, lengths, concurrencies, request counts), so
`moe-cap report` puts both side by side.

Scenario S3 (../shared/BENCHMARKS.md): Qwen3-30B-A3B shapes (the shipped `qwen3-30b-a3b`
shape: hidden 2048, 128 experts top-8, expert ffn 768, 32/4 heads of 128) truncated to 24
layers, dummy bf16 weights (dummy_gguf.py; `--gguf-type q8_0`: GGML's 8-bit Q8_0, the peer of
our FP8 experts), 512-token prompts (moe-cap's synthetic words: one token each in the dummy
vocabulary), 128 new tokens ignoring EOS, concurrency 1, 4 and 16.
Routing: llama.cpp has no routing control, so requests are sampled at temperature 1
(`--temperature`): the tokens, and with them the experts, vary from step to step, where
greedy decoding of random weights repeats one token and routes every step to the same experts.

GPU budget: `--n-cpu-moe` is the fewest layers whose experts stay on the CPU so that what
llama.cpp holds on the GPU (every tensor but the token embedding and those experts, counted in
the bytes the GGUF stores them in: llama_placement.py) fits `--gpu-weights` (16.1 GiB: the bf16
runs' 11 layers, 16.07 GiB; in Q8_0 the whole 24-layer model is 15.12 GiB, so none stays on the
CPU). The KV cache and compute buffers come on top. `--n-cpu-moe N` sets it directly.

Steps, each under a timeout (a failed step is recorded and the rest go on; `--total-timeout`
stops starting new ones): unpack `.peer/llama.cpp.tar.gz` into `--work` (kept: a second run on
a warm machine rebuilds nothing), configure and build `llama-server` with CMake while the GGUF
is written (the build is CPU-bound, the GGUF GPU- and I/O-bound: the random numbers come from
the idle GPU, the 29 GiB go to /dev/shm when it has room, else under `--work`), start the
server and wait for `/health`, warm it up (`--warmup-requests` at the largest concurrency, not
kept), one `moe-cap run` per concurrency, stop the server, `moe-cap report` over the records
(plus `--compare` records or serve_sweep.py's `runs.tar.gz`: both servers on one page). `--out
DIR` gets what serve_sweep.py writes: `summary.json`, `sweep.log` (with each failed step's
stderr, the build's too), `runs.tar.gz` (records, rows, the server's and the GGUF writer's
logs), `report.tar.gz`, `cap_radar.png`, `throughput_latency.png`.

On the GPU machine (no package index: carry the wheels and `.peer`; `.peer` is made here by
llama_peer_pack.py). The carry limit (64 MiB with the tracked tree, itself ~33 MB) does not hold
`.whl` (28 MB) and `.peer` (6 MB) together: carry a `.whl-lite` folder of `.whl` without the
report's wheels (matplotlib, pillow, fonttools, kiwisolver, contourpy, cycler, pyparsing;
4 MB) and make the report here afterwards from `runs.tar.gz` (`moe-cap report`):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl-lite/*.whl .peer/wheels/*.whl && export PYTHONPATH=/tmp/site:\\
    packages/moe-core/src:packages/moe-gen/src:packages/moe-infinity/src:packages/moe-cap/src \\
        HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    timeout 560 python3 benchmarks/llama_peer.py --out $OUT/llama --total-timeout 530

The 8-bit peer (a Q8_0 GGUF; `--n-cpu-moe 0` at the default `--gpu-weights 16.1GiB`), the same
way after the same set-up:

    timeout 560 python3 benchmarks/llama_peer.py --gguf-type q8_0 --out $OUT/llama-q8_0 \\
        --total-timeout 530

On a CPU (a tiny qwen3moe with Qwen3's vocabulary, a CPU build; proves the plumbing; the build
takes ~12 min on 2 cores, once; gguf and tqdm installed into /tmp/site from .peer/wheels):

    HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site .venv/bin/python benchmarks/llama_peer.py --smoke \\
        --out /tmp/llama --compare /tmp/sweep/runs.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llama_peer_pack import sha256_of
from llama_placement import gpu_weight_bytes, n_cpu_moe_for
from serve_sweep import (
    Sweep,
    int_list,
    report,
    run_step,
    run_sweep,
    stop_child,
    wait_healthy,
)

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent


class Background:
    """A step's process running beside others (the GGUF writer during the build)."""

    def __init__(self, sweep: Sweep, name: str, argv: list[str], log_path: Path,
                 on_success: Callable[[], None] | None = None) -> None:
        self.sweep, self.name, self.argv, self.log_path = sweep, name, argv, log_path
        self.on_success = on_success
        sweep.log(f"== {name} (in the background): {' '.join(argv)}")
        self.started = time.perf_counter()
        self._log = log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def finish(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` more (killed after); record the step; True when it succeeded."""
        try:
            self.proc.wait(max(1.0, timeout_s))
            status = "ok" if self.proc.returncode == 0 else f"exit {self.proc.returncode}"
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            status = "timeout"
        self._log.close()
        if status == "ok" and self.on_success is not None:
            self.on_success()
        step = {"name": self.name, "argv": self.argv, "status": status,
                "seconds": round(time.perf_counter() - self.started, 1)}
        self.sweep.steps.append(step)
        self.sweep.log(_tail(self.log_path, 1500))
        self.sweep.log(f"-- {self.name}: {status} in {step['seconds']} s")
        self.sweep.save()
        return status == "ok"


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def unpack(sweep: Sweep) -> Path | None:
    """The llama.cpp source tree under `--work` (unpacked once per tarball: a warm machine's
    second run keeps its build)."""
    a = sweep.args
    source = a.work / "llama.cpp"
    stamp = a.work / "llama.cpp.sha256"
    started = time.perf_counter()
    step: dict[str, object] = {"name": "unpack", "argv": [str(a.sources)]}
    try:
        digest = sha256_of(a.sources)
        if stamp.is_file() and stamp.read_text() == digest and source.is_dir():
            step["status"] = "ok (kept)"
        else:
            shutil.rmtree(source, ignore_errors=True)
            a.work.mkdir(parents=True, exist_ok=True)
            with tarfile.open(a.sources) as tar:
                tar.extractall(a.work, filter="data")
            stamp.write_text(digest)
            step["status"] = "ok"
    except (OSError, tarfile.TarError) as exc:
        step["status"] = f"failed: {exc}"
    step["seconds"] = round(time.perf_counter() - started, 1)
    sweep.steps.append(step)
    sweep.log(f"-- unpack: {step['status']} in {step['seconds']} s")
    sweep.save()
    return source if str(step["status"]).startswith("ok") else None


def configure_argv(a: argparse.Namespace, source: Path) -> list[str]:
    """CMake's configure command: the server alone, no tests, examples, web UI or downloads."""
    argv = ["cmake", "-S", str(source), "-B", str(source / "build"),
            "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_CURL=OFF", "-DGGML_CCACHE=OFF"]
    if a.cpu_only:
        return [*argv, "-DGGML_CUDA=OFF"]
    argv += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={a.cuda_arch}"]
    nvcc = shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
    return argv + ([f"-DCMAKE_CUDA_COMPILER={nvcc}"] if nvcc else [])


def build(sweep: Sweep, source: Path) -> Path | None:
    """Configure and build `llama-server`; its path, or None when a step failed."""
    a = sweep.args
    jobs = str(a.jobs or os.cpu_count() or 2)
    if not run_step(sweep, "configure", configure_argv(a, source), a.configure_timeout):
        return None
    if not run_step(sweep, "build llama-server", ["cmake", "--build", str(source / "build"),
                    "--target", "llama-server", "-j", jobs], a.build_timeout):
        return None
    binary = source / "build" / "bin" / "llama-server"
    return binary if binary.is_file() else None


def gguf_path(sweep: Sweep, size_bytes: int) -> Path:
    """/dev/shm when it holds the file with 8 GiB to spare (no disk write-back), else --work."""
    a = sweep.args
    if a.gguf is not None:
        return Path(str(a.gguf))
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > size_bytes + (8 << 30):
        return shm / f"llama-peer-{a.tag}.gguf"
    return Path(a.work) / f"llama-peer-{a.tag}.gguf"


def start_gguf(sweep: Sweep) -> tuple[Background | None, Path]:
    """The GGUF writer in the background (None when the same file is already there)."""
    import dummy_gguf

    a = sweep.args
    spec = dummy_gguf.load_spec(a.model, a.num_layers, a.smoke)
    path = gguf_path(sweep, dummy_gguf.plan_bytes(spec, a.gguf_type))
    stamp = path.with_name(path.name + ".json")
    # The same shapes, seed, type and writer: the file on a warm machine is reused.
    writer_code = b"".join((_HERE / name).read_bytes() for name in ("dummy_gguf.py",
                                                                     "ggml_q8_0.py"))
    want = {"spec": hashlib.sha256(repr(spec).encode()).hexdigest(), "seed": a.seed,
            "gguf_type": a.gguf_type, "writer": hashlib.sha256(writer_code).hexdigest()}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        sweep.steps.append({"name": "gguf", "status": "ok (kept)", "path": str(path)})
        return None, path
    stamp.unlink(missing_ok=True)
    argv = [sys.executable, str(_HERE / "dummy_gguf.py"), a.model, "--num-layers",
            str(a.num_layers), "--seed", str(a.seed), "--gguf-type", a.gguf_type,
            "--out", str(path)]
    job = Background(sweep, f"gguf ({path})", argv + (["--smoke"] if a.smoke else []),
                     sweep.work / "gguf.log", lambda: _write(stamp, json.dumps(want)))
    return job, path


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_argv(a: argparse.Namespace, binary: Path, gguf: Path, port: int) -> list[str]:
    """llama-server's command: every layer on the GPU but the experts of the first
    `--n-cpu-moe` layers; a KV slot of `context_per_slot` tokens per concurrent request."""
    parallel = max(a.concurrency)
    argv = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--alias", a.model, "-ngl", "99", "--n-cpu-moe", str(a.n_cpu_moe),
            "-c", str(parallel * a.context_per_slot), "--parallel", str(parallel),
            "-fa", "on", "-fit", "off", "--load-mode", a.load_mode,
            # Every request prefills its whole prompt: the runs at each concurrency reuse the
            # same seeded prompts, which a prompt cache would serve without computing them.
            "--no-cache-prompt", "--cache-ram", "0", "--metrics", "--no-webui"]
    if a.threads:
        argv += ["-t", str(a.threads)]
    return argv + [str(v) for v in a.server_arg]


class LlamaServer:
    """llama-server as a child process: started, waited for (/health 200), stopped."""

    def __init__(self, argv: list[str], port: int, log_path: Path) -> None:
        self.argv, self.log_path = argv, log_path
        self.url = f"http://127.0.0.1:{port}/v1"
        self._log = log_path.open("a", encoding="utf-8")
        self._log.write(f"$ {' '.join(argv)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> str | None:
        """None once /health answers 200 (503 while the model loads); else why not."""
        return wait_healthy(self.proc, self.url, timeout_s, "llama-server")

    def stop(self, timeout_s: float = 30.0) -> str:
        """SIGTERM, then SIGKILL after `timeout_s`; the exit status as text."""
        return stop_child(self.proc, self._log, timeout_s)


def start_server(sweep: Sweep, binary: Path, gguf: Path) -> LlamaServer | None:
    """llama-server up and answering, or None (recorded)."""
    a = sweep.args
    port = _free_port()
    started = time.perf_counter()
    server = LlamaServer(server_argv(a, binary, gguf, port), port, sweep.work / "server.log")
    sweep.log(f"== server start: {' '.join(server.argv)}")
    problem = server.wait_ready(min(a.load_timeout, sweep.deadline_left_s - 10))
    step: dict[str, object] = {"name": "server start", "argv": server.argv,
                               "seconds": round(time.perf_counter() - started, 1)}
    if problem is None:
        step["status"], step["url"] = "ok", server.url
    else:
        step["status"] = f"failed: {problem}; {server.stop(10)}"
        sweep.log(_tail(server.log_path))
    sweep.steps.append(step)
    sweep.log(f"-- server start: {step['status']} in {step['seconds']} s")
    sweep.save()
    return server if problem is None else None


def label(a: argparse.Namespace) -> str:
    """The records' system name: llama.cpp, its commit, where its experts live."""
    commit = "unknown"
    versions = a.sources.with_name("VERSIONS.json")
    if versions.is_file():
        commit = str(json.loads(versions.read_text())["sources"]["llama_cpp_commit"])[:8]
    build = "CPU" if a.cpu_only else f"CUDA, --n-cpu-moe {a.n_cpu_moe}"
    weights = ", Q8_0 GGUF" if a.gguf_type == "q8_0" else ""
    return f"llama.cpp {commit} ({build}{weights})"


def _run_argv(sweep: Sweep, server: LlamaServer, record: Path, concurrency: int,
              num_requests: int, output_len: int, seed: int) -> list[str]:
    a = sweep.args
    argv = sweep.python("moe_cap", "run", "--url", server.url, "--model", a.model,
                        "--label", label(a), "--input-len", str(a.input_len),
                        "--output-len", str(output_len), "--num-prompts", str(num_requests),
                        "--requests", str(num_requests), "--max-tokens", str(output_len),
                        "--seed", str(seed), "--temperature", str(a.temperature),
                        "--concurrency", str(concurrency), "--out", str(record))
    return argv + (["--num-layers", str(a.num_layers)] if a.num_layers and not a.smoke else [])


def warm_up(sweep: Sweep, server: LlamaServer) -> None:
    """Requests at the largest concurrency whose record is not kept: the first requests after
    start-up pay one-time costs (first touch of buffers, kernels of each batch size) that
    belong to no concurrency's numbers. Other prompts (seed 1) than the measured ones."""
    a = sweep.args
    if a.warmup_requests > 0:
        n = a.warmup_requests
        argv = _run_argv(sweep, server, sweep.work / "warmup.json", min(n, max(a.concurrency)),
                         n, min(16, a.output_len), 1)
        run_step(sweep, f"warm-up ({n} requests, not measured)", argv, a.step_timeout)


def measure(sweep: Sweep, server: LlamaServer) -> None:
    """One `moe-cap run --url` per concurrency, the workload of serve_sweep.py."""
    a = sweep.args
    warm_up(sweep, server)
    for c, n in zip(a.concurrency, a.requests, strict=True):
        if sweep.deadline_left_s < 30:
            sweep.log(f"-- skipping http c={c}: out of time")
            break
        record = sweep.work / f"llama-c{c}.json"
        argv = _run_argv(sweep, server, record, c, n, a.output_len, 0)
        run_step(sweep, f"http c={c} ({n} requests)", argv, a.step_timeout, record)


def run(sweep: Sweep) -> None:
    """Every step in order; each failure is recorded and skips what depends on it."""
    a = sweep.args
    if not a.cpu_only:
        sweep.log(f"-- placement: {a.gguf_type} GGUF, --n-cpu-moe {a.n_cpu_moe}: "
                  f"{a.gpu_weight_bytes / 2**30:.2f} GiB of weights on the GPU")
    writer: Background | None = None
    gguf: Path | None = None
    try:
        writer, gguf = start_gguf(sweep)
    except Exception as exc:  # recorded; the build still runs (a kept GGUF may serve)
        sweep.steps.append({"name": "gguf", "status": f"failed: {exc}"})
    try:
        source = unpack(sweep)
        binary = build(sweep, source) if source is not None else None
        written = writer.finish(min(a.gguf_timeout, sweep.deadline_left_s - 10)) \
            if writer is not None else gguf is not None
    finally:  # stopped by SIGTERM during the build: the writer must not outlive the run
        if writer is not None and writer.proc.poll() is None:
            writer.proc.kill()
    if binary is None or gguf is None or not written:
        return
    server = start_server(sweep, binary, gguf)
    if server is None:
        return
    try:
        measure(sweep, server)
    finally:
        status = server.stop()
        sweep.steps.append({"name": "server stop", "status": status})
        sweep.log(f"-- server stopped: {status}")
        sweep.log(_tail(server.log_path, 2500))
        sweep.save()


def compare_records(sweep: Sweep) -> tuple[Path, ...]:
    """The `--compare` records: JSON files as given, and the run records inside a
    `runs.tar.gz` of serve_sweep.py (unpacked under the work folder)."""
    out: list[Path] = []
    for i, name in enumerate(sweep.args.compare):
        path = Path(name)
        if not name.endswith(".tar.gz"):
            out.append(path)
            continue
        folder = sweep.work / f"compare-{i}"
        try:
            with tarfile.open(path) as tar:
                tar.extractall(folder, filter="data")
        except (OSError, tarfile.TarError) as exc:
            sweep.log(f"-- --compare {name}: {exc} (left out of the report)")
            continue
        out += sorted(p for p in folder.rglob("*.json") if p.name != "warmup.json")
    return tuple(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the (few) result files")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny qwen3moe and a CPU build, tiny counts (proves the plumbing)")
    p.add_argument("--sources", type=Path, default=_ROOT / ".peer" / "llama.cpp.tar.gz")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llama-peer",
                   help="sources, build and (without room in /dev/shm) the GGUF; kept")
    p.add_argument("--gguf", type=Path, help="where to write the GGUF (default: /dev/shm or "
                   "--work)")
    p.add_argument("--cpu-only", action="store_true", help="build without CUDA")
    p.add_argument("--cuda-arch", default="90", help="CMAKE_CUDA_ARCHITECTURES (H200: 90)")
    p.add_argument("--jobs", type=int, default=0, help="build jobs (default: every core)")
    p.add_argument("--model", default="qwen3-30b-a3b")
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--seed", type=int, default=0, help="of the dummy weights")
    p.add_argument("--gguf-type", choices=("bf16", "q8_0"), default="bf16",
                   help="how the GGUF stores its weight matrices (q8_0: GGML's 8-bit blocks)")
    p.add_argument("--gpu-weights", default="16.1GiB",
                   help="GPU bytes for weights; --n-cpu-moe is the fewest layers whose experts "
                   "stay on the CPU so that the rest fits, counted in the GGUF's own bytes "
                   "(16.1GiB: the bf16 runs' --n-cpu-moe 11 of 24, 16.07 GiB; q8_0: 0)")
    p.add_argument("--n-cpu-moe", type=int, default=None,
                   help="layers whose experts stay on the CPU (default: from --gpu-weights)")
    p.add_argument("--context-per-slot", type=int, default=768,
                   help="KV tokens per concurrent request (prompt + output + margin)")
    p.add_argument("--load-mode", default="none",
                   help="llama-server --load-mode (none: weights copied into its own memory, "
                   "as llama.cpp advises when experts are overridden to the CPU; mmap: mapped)")
    p.add_argument("--threads", type=int, default=0, help="llama-server -t (default: its own)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="one more llama-server argument (repeat)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (1: tokens, so experts, vary step to step)")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int_list, default=[1, 4, 16])
    p.add_argument("--requests", type=int_list, default=[4, 8, 16],
                   help="requests at each concurrency")
    p.add_argument("--warmup-requests", type=int, default=16,
                   help="requests before the measured runs, at the largest concurrency "
                   "(0: none)")
    p.add_argument("--compare", nargs="*", default=[],
                   help="run records measured elsewhere for the report, or serve_sweep.py's "
                   "runs.tar.gz")
    p.add_argument("--configure-timeout", type=float, default=90.0)
    p.add_argument("--build-timeout", type=float, default=330.0)
    p.add_argument("--gguf-timeout", type=float, default=240.0,
                   help="seconds the GGUF may take after the build is done")
    p.add_argument("--load-timeout", type=float, default=150.0,
                   help="seconds for llama-server to load and answer /health")
    p.add_argument("--step-timeout", type=float, default=120.0)
    p.add_argument("--total-timeout", type=float, default=530.0,
                   help="no step starts once this is spent")
    args = p.parse_args(argv)
    args.tag = f"{args.model}-{args.num_layers}"
    if args.smoke:
        args.cpu_only, args.tag, args.n_cpu_moe = True, "smoke", 1
        args.input_len, args.output_len, args.context_per_slot = 32, 8, 64
        args.concurrency, args.requests, args.warmup_requests = [1, 2], [2, 4], 2
        args.build_timeout, args.load_timeout, args.step_timeout = 1800.0, 120.0, 120.0
        args.total_timeout = 2400.0
    if len(args.concurrency) != len(args.requests):
        p.error("--concurrency and --requests need as many values each")
    if args.gguf_type != "bf16":  # the bf16 file keeps its name (a warm machine's is reused)
        args.tag += f"-{args.gguf_type}"
    try:
        place(args)
    except ValueError as exc:  # a size that does not parse, or a budget nothing fits
        p.error(str(exc))
    return args


def place(a: argparse.Namespace) -> None:
    """Set `a.n_cpu_moe` (from `--gpu-weights` unless given) and `a.gpu_weight_bytes`, what
    llama.cpp then holds on the GPU, from the bytes of the GGUF's own tensors."""
    import dummy_gguf
    from moe_core import parse_bytes

    spec = dummy_gguf.load_spec(a.model, a.num_layers, a.smoke)
    plan = dummy_gguf.tensor_plan(spec, a.gguf_type)
    if a.n_cpu_moe is None:
        a.n_cpu_moe = n_cpu_moe_for(plan, spec.num_layers, parse_bytes(a.gpu_weights))
    a.gpu_weight_bytes = gpu_weight_bytes(plan, a.n_cpu_moe)


def _steps(sweep: Sweep) -> None:
    run(sweep)
    report(sweep, f"llama.cpp peer ({sweep.args.tag})", compare_records(sweep))


def main(argv: list[str] | None = None) -> int:
    return run_sweep(parse_args(argv), "llama-peer-", _steps)


if __name__ == "__main__":
    sys.exit(main())
