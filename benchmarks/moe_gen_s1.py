"""Scenario S1 of BENCHMARKS.md: moe-gen's module-based batching against transformers + accelerate
(`device_map="auto"`, same GPU budget, its largest batch that fits), with the planner's bound.

Mixtral-8x7B shapes truncated to 8 layers (12 GiB budget) and DeepSeek-V2-Lite shapes (10 GiB),
bf16 dummy weights (random, tiled: routing is near-uniform, the worst case for caching), random
512-token prompts, EOS ignored. The budget is the whole process's GPU memory, enforced with
`torch.cuda.set_per_process_memory_fraction` for both systems.

    PYTHONPATH=packages/moe-core/src:packages/moe-gen/src python3 benchmarks/moe_gen_s1.py \
        --out results/ [--new-tokens 256] [--num-prompts 512]

Writes one JSON per scenario into --out and prints a compact table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from moe_core import (
    ExpertLayout,
    HostExpertStore,
    ModelSpec,
    load_model,
    parse_bytes,
    resolve_model_path,
)
from moe_gen import Defaults, GenRequest
from moe_gen.api import run_requests
from moe_gen.batch_loop import StepStats
from moe_gen.engine import BatchEngine
from moe_gen.micro_batch import SequenceInput
from moe_gen.model_setup import install_streaming
from moe_gen.planner import Budget, make_plan
from moe_gen.profile import profile_device
from moe_gen.summary import summarise

SCENARIOS = {"mixtral": ("mixtral-8x7b", 8, "12GiB"),
             "dsv2-lite": ("deepseek-v2-lite", None, "10GiB"),
             "tiny": ("tiny-moe", None, "1GiB")}  # CPU smoke test of the script itself
_NOISE = 32 << 20


def noise() -> torch.Tensor:
    """One block of uniform bf16 noise, tiled into every weight (drawing tens of billions of
    numbers on the host would take minutes; speed does not depend on the values)."""
    return torch.empty(_NOISE, dtype=torch.bfloat16).uniform_(
        -0.02, 0.02, generator=torch.Generator().manual_seed(0))


def tile_into(flat: torch.Tensor, block: torch.Tensor) -> None:
    for start in range(0, flat.numel(), block.numel()):
        chunk = flat[start : start + block.numel()]
        chunk.copy_(block[: chunk.numel()].to(chunk.dtype))


def dummy_store(spec: ModelSpec, dtype: torch.dtype, pin: bool) -> HostExpertStore:
    """A pinned host store of random experts for `spec`."""
    layout = ExpertLayout(spec.hidden_size, spec.moe.expert_intermediate_size, dtype)
    store = HostExpertStore.empty(layout, spec.moe_layers, spec.moe.num_experts, pin)
    block = noise()
    for layer in spec.moe_layers:
        tile_into(store.arena(layer), block)
    return store


def set_budget(budget: str) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(parse_bytes(budget) / total, 1.0))


def run_ours(args: argparse.Namespace, name: str, layers: int | None, budget: str,
             device: str) -> dict[str, Any]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = load_model(name, "cpu", dtype, dummy=True, num_layers=layers, load_experts=False)
    store = dummy_store(model.spec, dtype, pin=device == "cuda")
    load_s = time.perf_counter() - t0
    profile = profile_device(model.spec, device, dtype)
    reserve = parse_bytes("1.5GiB") if device == "cuda" else 0
    plan = make_plan(model.spec, dtype, profile,
                     Budget(gpu_bytes=parse_bytes(budget), host_bytes=parse_bytes(args.host_memory),
                            prompt_tokens=args.prompt_tokens, max_new_tokens=args.new_tokens,
                            num_requests=args.num_prompts, reserve_bytes=reserve,
                            max_cpu_attention_share=args.max_cpu_attention_share))
    print(f"ours {name}: plan {plan.to_dict()}", flush=True)
    loaded = install_streaming(model, plan, device, store)
    runtime = loaded.runtime
    counters = runtime.stats if runtime is not None else None
    generator = torch.Generator().manual_seed(1)
    vocab = model.spec.vocab_size
    requests = [(i, GenRequest(str(i), token_ids=tuple(torch.randint(
        3, vocab, (args.prompt_tokens,), generator=generator).tolist())))
        for i in range(args.num_prompts)]
    steps: list[StepStats] = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = run_requests(loaded.model, requests, plan, Defaults(max_new_tokens=args.new_tokens),
                          None, lambda _: None, steps.append,
                          lambda: counters.bytes_copied if counters is not None else 0)
    wall = time.perf_counter() - t0
    context = args.prompt_tokens + args.new_tokens // 2
    trace = (trace_decode(engine, plan.max_batch_size, context,
                          args.out / f"trace-{name}.json.gz")
             if args.trace and device == "cuda" else None)
    offload = runtime.summary() if runtime else {}
    summary = summarise(args.num_prompts, steps, wall, offload, plan).to_dict()
    decode = [s for s in steps if s.phase == "decode" and len(s.chunks) == plan.max_batch_size]
    out = {"load_s": load_s, "profile": profile.to_dict(), "plan": plan.to_dict(),
           "summary": summary, "offload": offload,
           "decode_steps": len(decode),
           "decode_step_median_s": statistics.median(s.seconds for s in decode) if decode else None,
           "decode_attention_median_s": (statistics.median(s.attention_s for s in decode)
                                         if decode else None),
           "decode_moe_median_s": statistics.median(s.moe_s for s in decode) if decode else None,
           "decode_h2d_median_bytes": (statistics.median(s.h2d_bytes for s in decode)
                                       if decode else None),
           # The context grows through the run: the median step of each quarter of it.
           "decode_step_median_s_by_quarter": [
               statistics.median(s.seconds for s in q)
               for q in (decode[i * len(decode) // 4 : (i + 1) * len(decode) // 4]
                         for i in range(4)) if q],
           "peak_allocated_bytes": (torch.cuda.max_memory_allocated() if device == "cuda"
                                    else None),
           "trace_context": context if trace is not None else None, "trace": trace}
    loaded = model = store = runtime = counters = engine = None  # free before the peer loads
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch._C._host_emptyCache()
    return out


def trace_decode(engine: BatchEngine, batch: int, context: int, path: Path) -> dict[str, Any]:
    """Profile two full-batch decode steps at `context` with the run's own engine (after the run:
    the profiler's own cost stays out of the run's timings), on fresh page tables over the KV
    the run left in the arenas."""
    pages = engine.pages
    tables = [pages.allocate(context + 1) for _ in range(batch)]
    if any(t is None for t in tables):
        return {"error": "too few free KV pages to trace"}
    seqs = [SequenceInput(t, context, [3 + i % 100], i)  # type: ignore[arg-type]
            for i, t in enumerate(tables)]
    engine.step(seqs)  # warm-up
    summary = profile_steps(lambda: [engine.step(seqs) for _ in range(2)], 2, path)
    for table in tables:
        pages.release(table)  # type: ignore[arg-type]
    return summary


def random_peer_model(config: Any) -> Any:
    """transformers' model with tiled random bf16 weights on the host (as offload_decode.py)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    block = noise()
    for name, param in list(model.named_parameters()):
        value = torch.empty(param.shape, dtype=torch.bfloat16)
        tile_into(value.view(-1), block)
        set_module_tensor_to_device(model, name, "cpu", value=value)
    return model.eval()


def run_peer(args: argparse.Namespace, name: str, layers: int | None,
             budget: str) -> dict[str, Any]:
    """Largest batch (of --peer-batches) that fits, prefill then timed decode steps."""
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(name, weights=False))
    config.num_hidden_layers = layers or config.num_hidden_layers
    model = random_peer_model(config)
    weights_budget = parse_bytes(budget) - 2 * 2**30  # 2 GiB left for KV and activations
    device_map = infer_auto_device_map(model, max_memory={0: weights_budget, "cpu": "120GiB"},
                                       no_split_module_classes=model._no_split_modules)
    model = dispatch_model(model, device_map=device_map)
    out: dict[str, Any] = {"system": "transformers+accelerate device_map=auto",
                           "weights_budget": weights_budget, "tried": {}}
    for batch in args.peer_batches:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            prompt = torch.randint(3, config.vocab_size, (batch, args.prompt_tokens),
                                   device="cuda")
            with torch.inference_mode():
                t0 = time.perf_counter()
                res = model(prompt, use_cache=True)
                torch.cuda.synchronize()
                prefill_s = time.perf_counter() - t0
                past, token = res.past_key_values, res.logits[:, -1:].argmax(-1)
                del res
                times = []
                for _ in range(args.peer_steps):
                    t0 = time.perf_counter()
                    res = model(token, past_key_values=past, use_cache=True)
                    past, token = res.past_key_values, res.logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    del res
            step = statistics.median(times)
            out.update(batch=batch, prefill_s=prefill_s, prefill_tokens_per_s=batch
                       * args.prompt_tokens / prefill_s, decode_step_median_s=step,
                       decode_tokens_per_s=batch / step,
                       peak_allocated_bytes=torch.cuda.max_memory_allocated())
            del past, token
            break
        except torch.OutOfMemoryError as exc:
            out["tried"][batch] = f"OOM: {str(exc).splitlines()[0][:120]}"
            gc.collect()
            torch.cuda.empty_cache()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _union_s(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of `(start_us, end_us)` spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e6


def _overlap_s(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Seconds where some span of `a` and some span of `b` run at once."""
    marks = sorted([(s, 0, 1) for s, _ in a] + [(e, 0, -1) for _, e in a]
                   + [(s, 1, 1) for s, _ in b] + [(e, 1, -1) for _, e in b])
    depth, total, last = [0, 0], 0.0, 0.0
    for t, which, delta in marks:
        if depth[0] > 0 and depth[1] > 0:
            total += t - last
        depth[which] += delta
        last = t
    return total / 1e6


def trace_summary(trace: dict[str, Any], num_steps: int) -> dict[str, Any]:
    """Where the time of `num_steps` profiled steps went, from a chrome trace of
    `torch.profiler` (CUDA activity and the host's runtime calls), per step: how long the
    host-to-device link was busy and with what (KV on the KV mover's stream, experts on the copy
    engine's), how long kernels ran, how long both lanes overlapped, and where the host blocked."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {"error": "no device activity in the trace"}

    def spans(evs: list[dict[str, Any]]) -> list[tuple[float, float]]:
        return [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in evs]

    h2d = [e for e in gpu if e["cat"] == "gpu_memcpy" and "HtoD" in e["name"]]
    kernels = [e for e in gpu if e["cat"] == "kernel"]
    span_s = _union_s([(min(s for s, _ in spans(gpu)), max(e for _, e in spans(gpu)))])
    streams: dict[str, dict[str, float]] = {}
    for e in h2d:
        row = streams.setdefault(str(e.get("args", {}).get("stream")),
                                 {"busy_s": 0.0, "bytes": 0.0, "copies": 0})
        row["busy_s"] += e["dur"] / 1e6 / num_steps
        row["bytes"] += float(e.get("args", {}).get("bytes", 0)) / num_steps
        row["copies"] += 1 / num_steps
    by_stream = {k: spans([e for e in h2d if str(e.get("args", {}).get("stream")) == k])
                 for k in streams}
    heavy = sorted(streams, key=lambda k: -streams[k]["bytes"])[:2]
    host: dict[str, float] = {}
    for e in events:
        name = e["name"]
        if e.get("cat") == "cuda_runtime" and ("Synchronize" in name or "Memcpy" in name):
            host[name] = host.get(name, 0.0) + e["dur"] / 1e6 / num_steps
        if e.get("cat") == "cpu_op" and name in ("aten::index_select", "aten::nonzero",
                                                 "aten::_local_scalar_dense", "aten::item",
                                                 "aten::pin_memory", "aten::index_copy_"):
            host[name] = host.get(name, 0.0) + e["dur"] / 1e6 / num_steps
    h2d_bytes = sum(r["bytes"] for r in streams.values())
    busy = _union_s(spans(h2d)) / num_steps
    # Link idle gaps: many short ones point at the host issuing copies too slowly (per-expert
    # work), long ones at phases with nothing to copy (attention, step boundaries).
    gaps, reach = [], None
    for start, end in sorted(spans(h2d)):
        if reach is not None and start > reach:
            gaps.append((start - reach) / 1e6)
        reach = end if reach is None else max(reach, end)
    short = [g for g in gaps if g < 1e-3]
    return {"steps": num_steps, "gpu_span_s": span_s / num_steps,
            "h2d_busy_s": busy, "h2d_busy_share": busy * num_steps / span_s,
            "h2d_bytes": h2d_bytes, "h2d_rate_while_busy": h2d_bytes / busy if busy else None,
            "h2d_streams": streams,
            "h2d_idle_under_1ms_s": sum(short) / num_steps,
            "h2d_idle_gaps_under_1ms": len(short) / num_steps,
            "h2d_idle_over_1ms_s": (sum(gaps) - sum(short)) / num_steps,
            "two_heaviest_h2d_streams_overlap_s": (
                _overlap_s(by_stream[heavy[0]], by_stream[heavy[1]]) / num_steps
                if len(heavy) == 2 else 0.0),
            "kernel_busy_s": _union_s(spans(kernels)) / num_steps,
            "device_idle_s": (span_s - _union_s(spans(gpu))) / num_steps,
            "host_s": host}


def profile_steps(run: Any, num_steps: int, path: Path | None = None) -> dict[str, Any]:
    """Run `run()` (which runs `num_steps` steps) under `torch.profiler`; summarise the trace
    (and keep it gzipped at `path`)."""
    import gzip
    import tempfile

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(file))
        raw = file.read_bytes()
    if path is not None:
        path.write_bytes(gzip.compress(raw))
    return trace_summary(json.loads(raw), num_steps)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenarios", default="mixtral,dsv2-lite")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--host-memory", default="100GiB")
    parser.add_argument("--peer-batches", type=lambda s: [int(x) for x in s.split(",")],
                        default=[64, 32, 16, 8, 4, 1])
    parser.add_argument("--peer-steps", type=int, default=3)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--trace", action="store_true",
                        help="after the run, profile two decode steps (CUDA) and summarise them")
    parser.add_argument("--max-cpu-attention-share", type=float, default=0.75)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--commit", default=None,
                        help="the commit that runs (default: git rev-parse; a device copy's "
                             "git metadata can lag the working tree)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in args.scenarios.split(","):
        name, layers, budget = SCENARIOS[key]
        record: dict[str, Any] = {
            "scenario": f"S1 {key}", "model": name, "num_layers": layers, "gpu_budget": budget,
            "commit": args.commit or commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": (torch.cuda.get_device_name() if args.device == "cuda" else "cpu"),
            "workload": {k: getattr(args, k) for k in ("num_prompts", "prompt_tokens",
                                                      "new_tokens")}}
        if args.device == "cuda":
            set_budget(budget)
        try:
            record["ours"] = run_ours(args, name, layers, budget, args.device)
        except torch.OutOfMemoryError as exc:
            record["ours"] = {"error": f"OOM: {str(exc).splitlines()[0][:200]}"}
        path = args.out / f"moe-gen-s1-{key}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")  # kept if the peer never ends
        if not args.skip_peer and args.device == "cuda":
            try:
                record["peer"] = run_peer(args, name, layers, budget)
            except Exception as exc:  # report, keep the other scenarios
                record["peer"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        path.write_text(json.dumps(record, indent=1) + "\n")
        rows.append(record)
        print(json.dumps(record)[:2000], flush=True)
    print_table(rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'scenario':<12} {'ours dec tok/s':>14} {'pred tok/s':>10} {'bound tok/s':>11} "
          f"{'step ms meas/pred':>17} {'prefill tok/s':>13} {'peer dec tok/s':>14} {'x peer':>7}")
    for r in rows:
        ours, peer = r.get("ours", {}), r.get("peer", {})
        s = ours.get("summary", {})
        pred = (ours.get("plan") or {}).get("prediction") or {}
        dec = s.get("decode_tokens_per_s", 0.0)
        peer_dec = peer.get("decode_tokens_per_s")
        meas = ours.get("decode_step_median_s")
        print(f"{r['scenario']:<12} {dec:>14,.0f} {pred.get('tokens_per_s', 0):>10,.0f} "
              f"{pred.get('bound_tokens_per_s', 0):>11,.0f} "
              f"{(meas or 0) * 1e3:>8,.0f}/{pred.get('step_s', 0) * 1e3:<8,.0f} "
              f"{s.get('prefill_tokens_per_s', 0):>13,.0f} "
              f"{peer_dec if peer_dec is None else round(peer_dec, 1)!s:>14} "
              f"{(dec / peer_dec) if peer_dec else float('nan'):>7.1f}")


if __name__ == "__main__":
    main()
