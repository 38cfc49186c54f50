"""What the moe-infinity tests share: the embedded tiny model (CPU, fp32), its traces of the
shipped sample prompts, a builder of synthetic traces of any shape, and a served tiny model
whose expert cache evicts (one per test module)."""

from __future__ import annotations

from collections.abc import Callable

import moe_core
import numpy as np
import pytest
import torch
from moe_core import MoEForCausalLM
from moe_infinity import (
    ModelShape,
    RequestTrace,
    TraceConfig,
    TraceSet,
    read_prompts,
    sample_prompts_path,
    trace_prompts,
)
from moe_infinity.serving.serving_model import ServingModel, load_serving_model

SyntheticTraces = Callable[..., TraceSet]


@pytest.fixture(scope="module")
def served() -> ServingModel:
    """The embedded model served on the CPU with 12 expert slots of 96 and the activation-aware
    policy: the cache evicts, so the policy and its feed do work. A module may define its own."""
    layout_bytes = 491_520  # one fp32 tiny-moe expert
    budget = moe_core.ModelSpec.from_pretrained(moe_core.tiny_model_path()).dense_bytes(
        torch.float32) + (8 << 20) + 12 * layout_bytes
    return load_serving_model("tiny-moe", "cpu", budget, "activation", max_batch=8,
                              kv_bytes=8 << 20)


@pytest.fixture(scope="session")
def tiny() -> MoEForCausalLM:
    return moe_core.load_model(moe_core.TINY_MODEL_NAME, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tokenizer() -> object:
    return moe_core.load_tokenizer(moe_core.tiny_model_path())


@pytest.fixture(scope="session")
def sample_traces(tiny: MoEForCausalLM, tokenizer: object) -> TraceSet:
    """The 28 sample prompts (all seven domains), 12 new tokens each, in a mixed order."""
    prompts = read_prompts(sample_prompts_path())
    order = np.random.default_rng(0).permutation(len(prompts))
    return trace_prompts(tiny, tokenizer, [prompts[i] for i in order],  # type: ignore[arg-type]
                         moe_core.TINY_MODEL_NAME, TraceConfig(max_new_tokens=12))


def make_shape(num_layers: int = 3, num_experts: int = 6, top_k: int = 2) -> ModelShape:
    return ModelShape("synthetic", tuple(range(num_layers)), num_experts, top_k, 1000)


def make_traces(seed: int, num_requests: int = 4, num_layers: int = 3, num_experts: int = 6,
                top_k: int = 2, max_steps: int = 6, prompt_tokens: int = 3) -> TraceSet:
    """Random routing: each token picks `top_k` distinct experts per layer; the lookahead is the
    next layer's true counts plus noise."""
    rng = np.random.default_rng(seed)
    shape = make_shape(num_layers, num_experts, top_k)
    traces = []
    for r in range(num_requests):
        steps = int(rng.integers(1, max_steps + 1))
        tokens = np.array([prompt_tokens] + [1] * (steps - 1), dtype=np.int64)
        counts = np.zeros((steps, num_layers, num_experts), dtype=np.int32)
        for s in range(steps):
            for layer in range(num_layers):
                for _ in range(tokens[s]):
                    counts[s, layer, rng.choice(num_experts, top_k, replace=False)] += 1
        look = np.zeros(counts.shape, dtype=np.float32)
        look[:, 1:] = counts[:, 1:] + rng.random((steps, num_layers - 1, num_experts))
        traces.append(RequestTrace(f"r{r}", None, counts, look, tokens))
    return TraceSet(shape, traces)


@pytest.fixture(scope="session")
def synthetic() -> SyntheticTraces:
    return make_traces
