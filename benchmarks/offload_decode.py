"""Batch-1 decode of a Qwen3-30B-A3B-shaped model (bf16 dummy weights) through the offload
runtime: every expert resident in the LocalExperts executor against every expert cached in GPU
slots (on-demand executor, all hits), timed in turn; then every expert offloaded with nothing
cached, with each fetch mode (`copy`: into slots, one host read per layer; `mapped`: the GPU reads
host memory, no host read), and with CPU compute for every miss; plus the peer baseline
(transformers + accelerate, `device_map="auto"` under the same GPU budget).

Run on the GPU machine (needs CuPy, ~120 GB of GPU memory and ~60 GB of host memory):
    PYTHONPATH=packages/moe-core/src python3 benchmarks/offload_decode.py --out $OUT/decode.json

Acceptance lines of issue #4 measured here:
- nothing cached: time per token <= 1.2 x (expert bytes per token / measured pinned bandwidth);
- everything cached: within 10% of the resident executor.
Routing on dummy weights is near-uniform: the worst case for any cache (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MB = 2**20


def pinned_bandwidth_gbps(block_bytes: int, count: int = 32, repeats: int = 5) -> float:
    """Median GB/s of `count` back-to-back pinned host->device copies of `block_bytes`."""
    src = torch.empty(block_bytes * count, dtype=torch.uint8, pin_memory=True).random_(0, 256)
    dst = torch.empty_like(src, device="cuda")
    rates = []
    for _ in range(repeats + 1):
        torch.cuda._sleep(50_000_000)  # gate: the host enqueues all copies before any starts
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(count):
            dst[i * block_bytes : (i + 1) * block_bytes].copy_(
                src[i * block_bytes : (i + 1) * block_bytes], non_blocking=True)
        end.record()
        end.synchronize()
        rates.append(block_bytes * count / (start.elapsed_time(end) / 1e3) / 1e9)
    return statistics.median(rates[1:])


def decode_times(step: Callable[[torch.Tensor], torch.Tensor], first: torch.Tensor,
                 tokens: int, warmup: int = 2) -> list[float]:
    """Seconds per decode step (host clock around a synchronised step), after `warmup`."""
    times = []
    token = first
    for i in range(warmup + tokens):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        token = step(token)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def ours_decoder(model: Any, prompt: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                            torch.Tensor]:
    """A greedy step function over a fresh cache, and the first token after `prompt`."""
    cache = model.new_cache(1, prompt.shape[1] + 256)
    with torch.inference_mode():
        logits = model(prompt, cache=cache, last_only=True)

    def step(token: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)

    return step, logits[:, -1].argmax(-1, keepdim=True)


def summarise(times: list[float]) -> dict[str, float]:
    """Median / p90 / mean milliseconds."""
    ms = sorted(t * 1e3 for t in times)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))],
            "mean_ms": statistics.fmean(ms), "tokens": len(ms)}


def profile_step(step: Callable[[torch.Tensor], torch.Tensor], token: torch.Tensor,
                 rows: int = 12) -> str:
    """A torch profiler table of one decode step (top ops by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(token)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    print(table, flush=True)  # at once: a later failure must not lose it
    return table


def interleaved(steps: dict[str, tuple[Callable[[], None], Callable[[torch.Tensor], torch.Tensor],
                                       torch.Tensor]], tokens: int,
                warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per decode step of several configurations, one step of each in turn.

    The host of the lent machine changes speed by up to 40% between minutes (measured: the
    same resident step took 12.9 to 24.0 ms in one process), and batch-1 decode is bound by
    the host: configurations timed one after another would compare host speeds. Each entry
    is `(activate, step, first_token)`; `activate` installs that configuration's executors.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    current = {name: first for name, (_, _, first) in steps.items()}
    for i in range(warmup + tokens):
        for name, (activate, step, _) in steps.items():
            activate()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            current[name] = step(current[name])
            torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def mapped_gbps(store: Any, pool: Any, top_k: int, repeats: int = 10) -> float:
    """GB/s of the mapped fetch reading `top_k` distinct experts of one layer from the host."""
    from moe_core.offload.mapped_fetch import MappedFetcher

    fetcher = MappedFetcher(store, pool)
    layer = store.moe_layers[0]
    lut = torch.full((store.num_experts,), -1, dtype=torch.long, device="cuda")
    ids = torch.randperm(store.num_experts, generator=torch.Generator().manual_seed(0))[:top_k]
    ids = ids.cuda()
    fetcher.fetch_rows(layer, ids, lut)
    rates = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fetcher.fetch_rows(layer, ids, lut)
        end.record()
        end.synchronize()
        rates.append(top_k * store.layout.nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
    return statistics.median(rates)


def run_ours(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """Resident vs all-cached (interleaved), then nothing cached with each fetch mode."""
    from moe_core import (
        GpuSlotPool,
        HostExpertStore,
        install_offloading,
        load_model,
        make_copy_engine,
    )

    t0 = time.perf_counter()
    model = load_model(args.model, "cuda", torch.bfloat16, dummy=True, seed=0,
                       num_layers=args.num_layers)
    record["load_s"] = time.perf_counter() - t0
    spec = model.spec
    torch.manual_seed(0)
    prompt = torch.randint(0, spec.vocab_size, (1, args.prompt_tokens), device="cuda")
    block_bytes = 3 * spec.hidden_size * spec.moe.expert_intermediate_size * 2  # bf16
    top_k = spec.moe.router.top_k
    expert_bytes_per_token = len(model.moe_blocks()) * top_k * block_bytes
    bandwidth = pinned_bandwidth_gbps(block_bytes)
    peak = pinned_bandwidth_gbps(64 * MB, count=8)
    record["bound"] = {
        "expert_bytes_per_token": expert_bytes_per_token, "expert_block_bytes": block_bytes,
        "pinned_gbps_64mb": peak, "pinned_gbps_expert_block": bandwidth,
        "bound_ms": expert_bytes_per_token / (peak * 1e9) * 1e3,
        "bound_ms_at_block_bandwidth": expert_bytes_per_token / (bandwidth * 1e9) * 1e3,
    }
    save(args.out, record)

    t0 = time.perf_counter()
    store = HostExpertStore.from_model(model)
    record["store_build_s"] = time.perf_counter() - t0
    record["store_bytes"] = store.nbytes
    record["store_pinned"] = store.is_pinned
    layout = store.layout
    blocks = model.moe_blocks()

    # Resident vs everything cached (one slot per expert, all loaded before timing), one step
    # of each in turn. The model keeps its own experts for the resident steps.
    pool = GpuSlotPool(layout, len(store.experts()), "cuda")
    runtime = install_offloading(model, store, pool, make_copy_engine("cuda"))
    runtime.prefetch(store.experts())
    runtime.drain()

    def use_resident() -> None:
        for block in blocks:
            block.set_executor(block.experts)

    cached_executors = dict(runtime.executors)

    def use_cached() -> None:
        for block in blocks:
            block.set_executor(cached_executors[block.layer])

    use_resident()
    resident_step, resident_first = ours_decoder(model, prompt)
    use_cached()
    cached_step, cached_first = ours_decoder(model, prompt)
    before = runtime.snapshot(block=True)
    times = interleaved({"resident": (use_resident, resident_step, resident_first),
                         "all_cached": (use_cached, cached_step, cached_first)}, args.tokens)
    after = runtime.snapshot(block=True)
    record["resident"] = summarise(times["resident"])
    record["all_cached"] = summarise(times["all_cached"])
    record["all_cached"]["misses"] = after.misses - before.misses
    record["all_cached"]["hits"] = after.hits - before.hits
    ratios = [c / r for c, r in zip(times["all_cached"], times["resident"], strict=True)]
    record["all_cached"]["median_step_ratio_to_resident"] = statistics.median(ratios)
    print(f"resident {record['resident']['median_ms']:.2f} ms/token, all cached "
          f"{record['all_cached']['median_ms']:.2f}", flush=True)
    use_resident()
    record["resident_profile"] = profile_step(resident_step, resident_first)
    use_cached()
    record["all_cached_profile"] = profile_step(cached_step, cached_first)
    save(args.out, record)
    runtime.drain()
    cached_executors.clear()
    del runtime, pool
    use_resident()  # the nothing-cached runtimes install their own executors
    for block in blocks:  # the experts now live in the store only
        for param in block.experts.parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    gc.collect()
    torch.cuda.empty_cache()
    record["mapped_gbps_top_k_blocks"] = mapped_gbps(
        store, GpuSlotPool(layout, top_k, "cuda"), top_k)

    # Nothing cached: top_k slots, nothing loaded; "copy" copies every expert into a slot (each
    # layer evicts the previous layer's), "mapped" reads every expert from host memory.
    configs = (("nothing_cached_copy", "copy", None),
               ("nothing_cached_mapped", "mapped", None),
               ("nothing_cached_cpu_compute", "copy", (lambda _e, _n: True)))
    for label, fetch, rule in configs:
        pool = GpuSlotPool(layout, top_k, "cuda")
        engine = make_copy_engine("cuda")
        runtime = install_offloading(model, store, pool, engine, cpu_compute_rule=rule,
                                     fetch=fetch)
        step, first = ours_decoder(model, prompt)
        tokens = args.tokens if rule is None else max(4, args.tokens // 4)
        before = runtime.snapshot(block=True)
        times_one = decode_times(step, first, tokens)
        after = runtime.snapshot(block=True)
        steps = tokens + 2  # the warm-up steps count in the snapshot delta
        entry = summarise(times_one)
        entry.update({
            "fetch": fetch,
            "bytes_copied_per_token": (after.bytes_copied - before.bytes_copied) / steps,
            "mapped_bytes_per_token": (after.mapped_bytes - before.mapped_bytes) / steps,
            "copy_s_per_token": (after.copy_seconds - before.copy_seconds) / steps,
            "stall_s_per_token": (after.stall_seconds - before.stall_seconds) / steps,
            "hit_rate": (after.hits - before.hits) / max(1, (after.hits + after.misses)
                                                         - (before.hits + before.misses)),
            "cpu_experts_per_token": (after.cpu_experts - before.cpu_experts) / steps,
        })
        if rule is None:
            record[f"{label}_profile"] = profile_step(step, first)
        record[label] = entry
        print(f"{label}: {entry['median_ms']:.2f} ms/token", flush=True)
        save(args.out, record)
        del runtime, pool, engine
        gc.collect()
        torch.cuda.empty_cache()

    bound_ms = record["bound"]["bound_ms"]
    best = min(record["nothing_cached_copy"]["median_ms"],
               record["nothing_cached_mapped"]["median_ms"])
    record["acceptance"] = {
        "nothing_cached_over_bound": best / bound_ms,
        "nothing_cached_met": best <= 1.2 * bound_ms,
        "all_cached_over_resident": (record["all_cached"]["median_ms"]
                                     / record["resident"]["median_ms"]),
        "all_cached_met": (record["all_cached"]["median_ms"]
                           <= 1.1 * record["resident"]["median_ms"]),
    }
    del model, store
    gc.collect()
    torch.cuda.empty_cache()
    torch._C._host_emptyCache()  # give pinned memory back to the OS before the peer loads


def random_peer_model(config: Any) -> Any:
    """transformers' model for `config` with uniform random bf16 weights on the host.

    Parameters start on the meta device (buffers such as rotary frequencies stay real) and are
    materialised one at a time with tiled uniform noise: transformers' own initialisation of
    30 B parameters on the CPU would dominate the run.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    # Random values, cheaply: one 64 MiB block of uniform noise tiled into every parameter
    # (drawing 30 B numbers on the host would take minutes; speed does not depend on them).
    noise = torch.empty(32 * 2**20, dtype=torch.bfloat16).uniform_(
        -0.02, 0.02, generator=torch.Generator().manual_seed(0))
    for name, param in list(model.named_parameters()):
        value = torch.empty(param.shape, dtype=torch.bfloat16)
        flat = value.view(-1)
        for start in range(0, flat.numel(), noise.numel()):
            chunk = flat[start : start + noise.numel()]
            chunk.copy_(noise[: chunk.numel()])
        set_module_tensor_to_device(model, name, "cpu", value=value)
    model.eval()
    return model


def run_peer(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """transformers + accelerate with the same dummy shapes and `max_memory` = the budget."""
    try:
        import accelerate  # noqa: F401
        from transformers import AutoConfig
    except ImportError as exc:
        record["peer"] = {"error": f"not installed: {exc}"}
        return
    from moe_core import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    config.num_hidden_layers = args.num_layers or config.num_hidden_layers
    budget = args.peer_gpu_memory
    t0 = time.perf_counter()
    model = random_peer_model(config)
    from accelerate import dispatch_model, infer_auto_device_map
    from moe_core import parse_bytes

    # The budget is the whole process's GPU memory (BENCHMARKS.md): enforce it, and leave the
    # peer 2 GiB of it for activations, KV cache and workspace.
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(parse_bytes(budget) / total)
    weights_budget = parse_bytes(budget) - 2 * 2**30
    device_map = infer_auto_device_map(model, max_memory={0: weights_budget, "cpu": "120GiB"},
                                       no_split_module_classes=model._no_split_modules)
    model = dispatch_model(model, device_map=device_map)
    load_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), device="cuda")
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True)
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(args.peer_tokens):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    on_gpu = sum(1 for v in device_map.values() if v == 0)
    record["peer"] = {"system": "transformers+accelerate device_map (infer_auto_device_map)",
                      "gpu_budget": budget, "max_memory_gpu_weights": weights_budget,
                      "load_s": load_s, "ttft_s": ttft,
                      "modules_on_gpu": on_gpu, "modules": len(device_map),
                      "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                      **summarise(times)}
    print(f"peer: {record['peer']['median_ms']:.1f} ms/token", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def save(path: Path | None, record: dict[str, Any]) -> None:
    """Write `record` as JSON to `path` (if any)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    """Parse arguments, run, write JSON, print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=24, help="timed decode steps")
    parser.add_argument("--peer-tokens", type=int, default=3)
    parser.add_argument("--peer-gpu-memory", default="16GiB")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("offload_decode: needs a CUDA GPU")
    record: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "model": args.model, "num_layers": args.num_layers,
                              "prompt_tokens": args.prompt_tokens, "dtype": "bfloat16"}
    started = time.perf_counter()
    run_ours(args, record)
    save(args.out, record)  # before the peer, whose host memory may get the process killed
    if not args.skip_peer:
        run_peer(args, record)
    record["wall_s"] = time.perf_counter() - started
    save(args.out, record)
    print(json.dumps({k: v for k, v in record.items() if not k.endswith("_profile")}, indent=1))


if __name__ == "__main__":
    main()
