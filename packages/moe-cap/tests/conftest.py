"""Model specs and the hardware table the moe-cap tests share (config only: nothing is loaded)."""

from __future__ import annotations

import json

import pytest
from moe_cap import HardwareTable, load_hardware_table
from moe_core import ModelSpec, resolve_model_path


def known(name: str) -> ModelSpec:
    """The spec of a shape moe-core ships."""
    return ModelSpec.from_pretrained(resolve_model_path(name, weights=False))


def deepseek_v2() -> ModelSpec:
    """DeepSeek-V2 (236B): moe-core ships only the Lite shape, so take its config and set the
    fields where the full model differs (values of the published DeepSeek-V2 config.json)."""
    config = json.loads((resolve_model_path("deepseek-v2-lite", weights=False)
                         / "config.json").read_text())
    config.update(hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                  num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
                  n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
                  q_lora_rank=1536, n_group=8, topk_group=3, topk_method="group_limited_greedy",
                  routed_scaling_factor=16.0)
    return ModelSpec.from_config(config)


@pytest.fixture(scope="session")
def mixtral() -> ModelSpec:
    return known("mixtral-8x7b")


@pytest.fixture(scope="session")
def qwen3() -> ModelSpec:
    return known("qwen3-30b-a3b")


@pytest.fixture(scope="session")
def dsv3() -> ModelSpec:
    return known("deepseek-v3")


@pytest.fixture(scope="session")
def dsv2() -> ModelSpec:
    return deepseek_v2()


@pytest.fixture(scope="session")
def table(tmp_path_factory: pytest.TempPathFactory) -> HardwareTable:
    # An empty override path keeps a developer's $MOE_CAP_HARDWARE out of the tests.
    empty = tmp_path_factory.mktemp("hw") / "empty.yaml"
    empty.write_text("")
    return load_hardware_table(empty)
