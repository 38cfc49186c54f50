"""Config edge cases: group limits that cannot be satisfied, and rope settings read the way
transformers reads them."""

from __future__ import annotations

import pytest
from moe_core import ConfigError, ModelSpec
from moe_core.hf_config import HFConfig
from moe_core.spec import MoESpec, RouterSpec
from moe_core.tiny_checkpoints import tiny_config

_ARCH = {"mixtral": "MixtralForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
         "deepseek_v2": "DeepseekV2ForCausalLM"}


def _config(kind: str, **overrides: object) -> dict[str, object]:
    """The config.json transformers would write for a tiny model of `kind`."""
    data = tiny_config(kind, **overrides).to_dict()
    data["architectures"] = [_ARCH[kind]]
    return data


def test_top_k_larger_than_the_allowed_groups_is_rejected() -> None:
    router = RouterSpec("group_limited_greedy", top_k=5, normalize=False, num_groups=4,
                        topk_groups=2)
    with pytest.raises(ValueError, match=r"top_k \(5\) exceeds the experts of the 2 groups"):
        MoESpec(num_experts=8, expert_intermediate_size=4, router=router)


def test_noaux_tc_needs_two_experts_per_group() -> None:
    router = RouterSpec("noaux_tc", top_k=2, normalize=True, num_groups=8, topk_groups=4)
    with pytest.raises(ValueError, match="at least 2"):
        MoESpec(num_experts=8, expert_intermediate_size=4, router=router)


def test_config_with_impossible_groups_is_a_config_error() -> None:
    data = _config("deepseek_v3", n_group=8, topk_group=4)
    with pytest.raises(ConfigError, match="at least 2"):
        ModelSpec.from_config(HFConfig(data, "cfg.json"))


def test_mixtral_without_rope_theta_uses_its_own_default() -> None:
    data = _config("mixtral")
    data.pop("rope_parameters", None)
    data.pop("rope_theta", None)
    assert ModelSpec.from_config(HFConfig(data)).rope.theta == 1e6


def test_legacy_rope_scaling_wins_over_rope_parameters() -> None:
    data = _config("deepseek_v2")
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    data["rope_theta"] = 7000.0
    data["rope_scaling"] = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
    rope = ModelSpec.from_config(HFConfig(data)).rope
    assert (rope.scaling, rope.factor, rope.theta) == ("yarn", 2.0, 7000.0)
