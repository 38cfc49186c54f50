"""Full-batch decode steps of moe-gen's engine with streaming-executor variants swapped in, on one
loaded model and resident set (fake contexts: KV pages filled with noise, every sequence at the
same context). Where a decode step's time goes, variant by variant, without a generation run.

    PYTHONPATH=packages/moe-core/src:packages/moe-gen/src python3 benchmarks/moe_gen_variants.py \
        --out $OUT --model deepseek-v2-lite --budget 10GiB \
        --variants new-r16-m128,new-r32-m128,new-r16-m64 --trace new-r16-m128

A variant is `KIND-rR-mM[-noahead]`: the streaming executor KIND (`new`: this checkout's;
`old`: one loaded from --old-executor), a ring of R slots, attention micro-batches of M
sequences, `-noahead` without copies ahead of the routing. The resident set is the planner's for
the budget. An old executor is a folder holding `old_streaming.py` and `old_token_groups.py`,
e.g. commit 08db317's:

    mkdir old && git show 08db317:packages/moe-core/src/moe_core/offload/token_groups.py \
        > old/old_token_groups.py && git show \
        08db317:packages/moe-core/src/moe_core/offload/streaming_executor.py | sed \
        's/from moe_core.offload.token_groups import/from old_token_groups import/' \
        > old/old_streaming.py

Writes `variants-<model>.json` into --out (after every variant) and, for traced variants, the
gzipped chrome trace.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from moe_core import GpuSlotPool, install_offloading, load_model, make_copy_engine, parse_bytes
from moe_core.offload.stall_timer import StallTimer
from moe_core.offload.stats import OffloadStats
from moe_gen.cost_model import Candidate, ModelCosts, predict
from moe_gen.engine import BatchEngine, StepTiming
from moe_gen.micro_batch import SequenceInput
from moe_gen.model_setup import install_streaming
from moe_gen.paged_kv import PagedKV
from moe_gen.planner import Budget, make_plan
from moe_gen.profile import profile_device

sys.path.insert(0, str(Path(__file__).parent))
from dummy_weights import dummy_store, noise, tile_into
from moe_gen_s1 import set_budget
from step_trace import profile_steps

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--model", default="deepseek-v2-lite")
parser.add_argument("--num-layers", type=int, default=0, help="0: all")
parser.add_argument("--budget", default="10GiB")
parser.add_argument("--variants", default="new-r16-m128")
parser.add_argument("--trace", default="", help="variants to profile too (comma-separated)")
parser.add_argument("--context", type=int, default=512)
parser.add_argument("--old-executor", type=Path, default=None)
args = parser.parse_args()
out_dir: Path = args.out
NAME, LAYERS, BUDGET = args.model, args.num_layers, args.budget
VARIANTS = args.variants.split(",")
TRACE = set(filter(None, args.trace.split(",")))
CONTEXT = args.context
old_streaming: Any = None
if args.old_executor is not None:
    sys.path.insert(0, str(args.old_executor))
    old_streaming = importlib.import_module("old_streaming")
out_dir.mkdir(parents=True, exist_ok=True)
result: dict[str, Any] = {"name": NAME, "layers": LAYERS, "budget": BUDGET, "context": CONTEXT}


def save() -> None:
    (out_dir / f"variants-{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")


t0 = time.perf_counter()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = DEV == "cuda"
if CUDA:
    set_budget(BUDGET)
dtype = torch.bfloat16 if CUDA else torch.float32
model = load_model(NAME, "cpu", dtype, dummy=True, num_layers=LAYERS or None, load_experts=False)
store = dummy_store(model.spec, dtype, pin=CUDA)
profile = profile_device(model.spec, DEV, dtype)
budget = Budget(gpu_bytes=parse_bytes(BUDGET), host_bytes=parse_bytes("100GiB"),
                prompt_tokens=CONTEXT, max_new_tokens=256, num_requests=256,
                reserve_bytes=parse_bytes("1.5GiB") * CUDA, max_cpu_attention_share=0.75)
plan = make_plan(model.spec, dtype, profile, budget)
loaded = install_streaming(model, plan, DEV, store)
model, runtime = loaded.model, loaded.runtime
loaded = None
result.update(load_s=time.perf_counter() - t0, profile=profile.to_dict(), plan=plan.to_dict())
print("plan", plan.to_dict(), flush=True)
save()
pages = PagedKV(model.spec, plan.num_kv_pages, plan.page_tokens, dtype, pin=CUDA)
block = noise()
for tensors in pages.arenas.values():
    for arena in tensors:
        tile_into(arena.view(-1), block)
B = plan.max_batch_size
tables = [pages.allocate(CONTEXT + 256) for _ in range(B)]
costs = ModelCosts.of(model.spec, dtype)
residents = runtime.ring.resident
blocks = model.moe_blocks()


def install(kind: str, ring: int, ahead: bool):
    global runtime
    runtime = None
    for b in blocks:
        b.set_executor(b.experts)
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    pool = GpuSlotPool(store.layout, len(residents) + ring, DEV)
    engine = make_copy_engine(DEV)
    if kind == "old":
        if old_streaming is None:
            raise ValueError("an 'old' variant needs --old-executor")
        stats = OffloadStats()
        stalls = StallTimer(pool.device)
        r = old_streaming.ExpertRing(store, pool, engine, stats, stalls, residents, ring)
        for b in blocks:
            b.set_executor(old_streaming.StreamingExecutor(r, b.layer))
        return stats
    runtime = install_offloading(model, store, pool, engine, kind="streaming",
                                 resident=residents, ring_size=ring,
                                 lookahead_min_share=0.5 if ahead else None)
    return runtime.stats


def variant(name: str) -> None:
    parts = name.split("-")
    kind, ring, micro = parts[0], int(parts[1][1:]), int(parts[2][1:])
    ahead = "noahead" not in name
    stats = install(kind, ring, ahead)
    pairs = plan.max_attention_pairs * micro // plan.micro_batch_size
    engine = BatchEngine(model, pages, micro, pairs, 0.0, -(-B // micro))
    seqs = [SequenceInput(t, CONTEXT, [5 + i % 100], i) for i, t in enumerate(tables)]
    for _ in range(2):
        engine.step(seqs)
    timings = []
    for _ in range(4):
        t = StepTiming()
        engine.step(seqs, t)
        timings.append(t)
    before = stats.bytes_copied
    summary = None
    if name in TRACE and CUDA:
        summary = profile_steps(lambda: [engine.step(seqs) for _ in range(2)], 2,
                                out_dir / f"trace-{NAME}-{name}.json.gz")
    c = Candidate(B, micro, len(residents), plan.max_prefill_tokens, ring=ring)
    row = {"step_s": statistics.median(t.total_s for t in timings),
           "steps_s": [t.total_s for t in timings],
           "attention_host_s": statistics.median(t.attention_s for t in timings),
           "moe_host_s": statistics.median(t.moe_s for t in timings),
           "expert_bytes_per_step": (stats.bytes_copied - before) / 2 if summary else None,
           "stats": {k: getattr(stats, k) for k in ("misses", "hits", "prefetches_issued",
                                                    "prefetches_used", "bytes_copied")},
           "predicted": predict(costs, profile, c, CONTEXT + 1).to_dict(), "trace": summary}
    result.setdefault("variants", {})[name] = row
    print(name, json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    if summary:
        print("  trace", json.dumps(summary)[:1500], flush=True)
    save()


for v in VARIANTS:
    try:
        variant(v)
    except Exception as exc:
        result.setdefault("errors", {})[v] = repr(exc)[:500]
        print("ERROR", v, repr(exc)[:500], flush=True)
        save()
result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated() if CUDA else None
result["total_s"] = time.perf_counter() - t0
save()
print("done", result["total_s"], flush=True)
