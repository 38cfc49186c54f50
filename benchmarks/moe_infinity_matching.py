"""Matching cost of the trace collection: microseconds per query against 1,000 stored traces.

    .venv/bin/python benchmarks/moe_infinity_matching.py [--stored 1000] [--queries 2000]

For each model shape (the embedded tiny model and shipped shapes of real models), it fills a
`TraceCollection` with `--stored` synthetic EAMs (each request's routing drawn from a Dirichlet
per layer, 64 tokens x top-k), then times `match(partial, top=8)` for partial EAMs of random
depth (the layers a request has reached), one query at a time as the predictor calls it. It
prints one JSON line per shape (median and 99th percentile per query) on stdout. The acceptance
line of issue #6 is the tiny model's median (under 1 ms on CPU); larger shapes are reported for
scale. Not a timed test: CI machines vary too much.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
from moe_core import TINY_MODEL_NAME, ModelSpec, resolve_model_path
from moe_infinity import ModelShape, TraceCollection

SHAPES = (TINY_MODEL_NAME, "mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3")


def _eam(rng: np.random.Generator, shape: ModelShape, depth: int) -> np.ndarray:
    """A request's counts in its first `depth` layers: 64 tokens, top-k, skewed routing."""
    out = np.zeros((shape.num_moe_layers, shape.num_experts), dtype=np.float32)
    for layer in range(depth):
        probs = rng.dirichlet(np.full(shape.num_experts, 0.3))
        out[layer] = rng.multinomial(64 * shape.top_k, probs)
    return out


def bench(name: str, stored: int, queries: int, seed: int) -> dict[str, object]:
    """Per-query matching times for one model shape."""
    spec = ModelSpec.from_pretrained(resolve_model_path(name, weights=False))
    shape = ModelShape.from_spec(name, spec)
    rng = np.random.default_rng(seed)
    collection = TraceCollection(shape, stored)
    for _ in range(stored):
        collection.add(_eam(rng, shape, shape.num_moe_layers))
    partials = [_eam(rng, shape, int(rng.integers(1, shape.num_moe_layers + 1)))
                for _ in range(queries)]
    for query in partials[:50]:  # warm-up
        collection.match(query, top=8)
    times = []
    for query in partials:
        start = time.perf_counter()
        collection.match(query, top=8)
        times.append(time.perf_counter() - start)
    return {"shape": name, "layers": shape.num_moe_layers, "experts": shape.num_experts,
            "stored": stored, "queries": queries,
            "median_us": float(np.median(times) * 1e6),
            "p99_us": float(np.percentile(times, 99) * 1e6)}


def main() -> None:
    """Run every shape and print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stored", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps({"cpu": platform.processor() or platform.machine(),
                      "numpy": np.__version__}))
    for name in SHAPES:
        print(json.dumps(bench(name, args.stored, args.queries, args.seed)), flush=True)


if __name__ == "__main__":
    main()
