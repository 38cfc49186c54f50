"""Hit rates of the real on-demand runtime on the CPU: LRU against lookahead prefetch and the
activation-aware plan, under the tiny model's own routing and under routing set by hand.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/prefetch_hit_rates.py \
        [--prompts 14] [--new-tokens 32] [--cache 0.1,0.25,0.5] [--json out.json]

Not a simulation: the embedded tiny model (6 MoE layers x 16 experts, top-2) is offloaded into a
CPU slot pool through `CpuCopyEngine` (the same cache, policies, executors and prefetchers as on
the GPU; copies are instant, so only counts are measured, not time), and generates greedily,
batch 1, one request after another (`OffloadRuntime.begin_sequence` between them), from the
shipped sample prompts (seven domains, interleaved). Every plan sees the same routing:

- `real`: the model's own routers (the trained tiny model: the routing the predictor was built
  for);
- `zipf`: `zipf:s=1.1,reuse=0.5`, skewed with temporal re-use (`moe_core.routing_for`);
- `replay`: the tiny model's own decode routing traced first (`moe-infinity`'s tracer on the same
  prompts), then replayed as a tape in place of the routers;
- `uniform`: uniform random top-k (the worst case for any cache).

Under set routing the router no longer decides, so the lookahead (the next layer's router on
this layer's input) guesses from a router that is not used: what it is worth there is what the
numbers show. Plans: `lru`, `lru+lookahead`, `activation` (activation-aware eviction fed live,
no prefetch), `activation+lookahead` (and its predictor's prefetches). Prints a table (hit rate,
prefetches used / wasted, experts copied per decoded token (demand and prefetch, cancelled ones
excluded: what PCIe would carry), host wall time per token) and writes the raw numbers as JSON
with `--json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import moe_core
import numpy as np
import torch
from moe_core import (
    CpuCopyEngine,
    GpuSlotPool,
    HostExpertStore,
    MoEForCausalLM,
    cache_plan,
    install_offloading,
    load_model,
    load_tokenizer,
    replay_routing,
    routing_for,
    tiny_model_path,
)
from moe_infinity import TraceConfig, read_prompts, routing_tape, sample_prompts_path, trace_prompts

PLANS = {"lru": ("lru", "none"), "lru+lookahead": ("lru", "lookahead"),
         "activation": ("activation", "none"),
         "activation+lookahead": ("activation", "lookahead")}
WORKLOADS = ("real", "zipf", "replay", "uniform")


def prompt_ids(count: int) -> list[list[int]]:
    """`count` sample prompts, the domains interleaved (seed 0), as token ids."""
    tokenizer = load_tokenizer(tiny_model_path())
    prompts = read_prompts(sample_prompts_path())
    order = np.random.default_rng(0).permutation(len(prompts))[:count]
    out = []
    for i in order:
        p = prompts[int(i)]
        if p.text is not None:
            out.append(tokenizer(p.text)["input_ids"])
        else:
            messages = [{"role": r, "content": c} for r, c in p.messages or ()]
            out.append(moe_core.render_chat(tokenizer, messages))
    return out


def routing(model: MoEForCausalLM, workload: str, tape: moe_core.RoutingTape | None
            ) -> AbstractContextManager[None]:
    if workload == "real":
        return nullcontext()
    if workload == "replay":
        assert tape is not None
        return replay_routing(model, tape, row_stride=1)
    return routing_for(model, "uniform" if workload == "uniform" else "zipf:s=1.1,reuse=0.5")


def run(plan_name: str, workload: str, num_slots: int, prompts: list[list[int]],
        new_tokens: int, tape: moe_core.RoutingTape | None) -> dict[str, object]:
    model = load_model(tiny_model_path(), dtype="float32")
    policy, prefetch = PLANS[plan_name]
    plan = cache_plan(policy, prefetch, model.spec)
    store = HostExpertStore.from_model(model, pin=False)
    pool = GpuSlotPool(store.layout, num_slots, device="cpu")
    runtime = install_offloading(
        model, store, pool, CpuCopyEngine(), plan.policy, drop_local_experts=True,
        prefetcher=plan.prefetcher(model) if plan.prefetcher is not None else None)
    torch.manual_seed(0)  # the same draws for every plan
    tokens = 0
    started = time.perf_counter()
    with routing(model, workload, tape):
        for ids in prompts:
            runtime.begin_sequence()
            out = model.generate([ids], max_new_tokens=new_tokens, eos_token_id=[])
            tokens += out.shape[1]
    seconds = time.perf_counter() - started
    stats = runtime.snapshot()
    return {"plan": plan_name, "routing": workload, "num_slots": num_slots,
            "hit_rate": stats.hit_rate, "hits": stats.hits, "misses": stats.misses,
            "prefetches_issued": stats.prefetches_issued,
            "prefetches_used": stats.prefetches_used,
            "prefetches_wasted": stats.prefetches_wasted,
            "prefetches_cancelled": stats.prefetches_cancelled,
            "fetches_per_token": stats.bytes_copied / store.layout.nbytes / tokens,
            "tokens": tokens,
            "host_ms_per_token": 1e3 * seconds / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=14)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cache", default="0.1,0.25,0.5", help="shares of the 96 experts")
    parser.add_argument("--routing", default=",".join(WORKLOADS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()  # the code that runs
    torch.set_num_threads(1)  # steadier on a shared 2-core machine; counts do not depend on it
    prompts = prompt_ids(args.prompts)
    tiny = load_model(tiny_model_path(), dtype="float32")
    tokenizer = load_tokenizer(tiny_model_path())
    traced = trace_prompts(tiny, tokenizer,  # type: ignore[arg-type]
                           [moe_core_prompt(ids, i) for i, ids in enumerate(prompts)],
                           moe_core.TINY_MODEL_NAME, TraceConfig(max_new_tokens=args.new_tokens))
    tape = routing_tape(traced)
    total = len(tiny.moe_blocks()) * tiny.spec.moe.num_experts
    rows = []
    for workload in args.routing.split(","):
        for share in (float(x) for x in args.cache.split(",")):
            slots = max(2, round(share * total))
            for plan_name in PLANS:
                row = run(plan_name, workload, slots, prompts, args.new_tokens, tape)
                row["cache_share"] = share
                rows.append(row)
                print(f"{workload:8s} {share:5.0%} {plan_name:22s} hit {row['hit_rate']:6.1%}  "
                      f"prefetch used/wasted {row['prefetches_used']}/"
                      f"{row['prefetches_wasted']}  fetches/token "
                      f"{row['fetches_per_token']:.2f}  {row['host_ms_per_token']:.2f} ms/token",
                      flush=True)
    record = {"date": time.strftime("%Y-%m-%d"), "commit": commit,
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} torch thread(s), CPU only",
              "model": "tiny-moe (6 MoE layers x 16 experts, top-2), fp32, CpuCopyEngine",
              "prompts": len(prompts), "new_tokens": args.new_tokens, "results": rows}
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=1) + "\n")


def moe_core_prompt(ids: list[int], index: int) -> object:
    """A moe-infinity `Prompt` carrying already-tokenised ids (traced as they are)."""
    from moe_infinity import Prompt

    return Prompt(f"p{index}", text="", token_ids=tuple(ids))


if __name__ == "__main__":
    main()
