"""DeepSeek-V2 (arXiv:2405.04434) and DeepSeek-V3 (arXiv:2412.19437): multi-head latent
attention, the first `first_k_dense_replace` layers dense, fine-grained routed experts plus
shared experts, and their group-limited routers, as transformers implements them.

Where transformers departs from DeepSeek's own code we follow transformers (it is our reference):
V2 never renormalises its top-k weights and always applies `routed_scaling_factor`; `moe_layer_freq`
is not read; V3's router masks dropped groups with -inf.
"""

from __future__ import annotations

from moe_core.architectures.base import Architecture
from moe_core.architectures.config_parts import common_fields, rope, spec_errors
from moe_core.errors import ConfigError
from moe_core.hf_config import HFConfig
from moe_core.spec import AttentionSpec, ModelSpec, MoESpec, RouterSpec

__all__ = ["ARCHITECTURES"]


def _attention(config: HFConfig) -> AttentionSpec:
    heads = config.get_int("num_attention_heads")
    nope = config.get_int("qk_nope_head_dim")
    rope_dim = config.get_int("qk_rope_head_dim")
    bias = config.get_bool("attention_bias", default=False)
    return AttentionSpec(
        kind="mla",
        num_heads=heads,
        num_kv_heads=heads,  # MLA expands the latent into every head
        head_dim=nope + rope_dim,
        v_head_dim=config.get_int("v_head_dim"),
        qkv_bias=bias,
        o_bias=bias,
        q_lora_rank=config.get("q_lora_rank"),
        kv_lora_rank=config.get_int("kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
    )


def _router(config: HFConfig, v3: bool) -> RouterSpec:
    top_k = config.get_int("num_experts_per_tok")
    scaling = config.get_float("routed_scaling_factor", default=1.0)
    if v3:  # transformers always runs noaux_tc for V3, whatever `topk_method` says
        return RouterSpec("noaux_tc", top_k=top_k,
                          normalize=config.get_bool("norm_topk_prob", default=True),
                          scaling_factor=scaling, num_groups=config.get_int("n_group", default=8),
                          topk_groups=config.get_int("topk_group", default=4), fp32_gate=True)
    method = config.get("topk_method", default="greedy")
    if method == "greedy":
        return RouterSpec("softmax_topk", top_k=top_k, normalize=False, scaling_factor=scaling,
                          fp32_gate=True)
    if method == "group_limited_greedy":
        return RouterSpec("group_limited_greedy", top_k=top_k, normalize=False,
                          scaling_factor=scaling, num_groups=config.get_int("n_group"),
                          topk_groups=config.get_int("topk_group"), fp32_gate=True)
    raise ConfigError(f"{config.source}: DeepSeek-V2 topk_method {method!r} is not supported "
                      "(supported: greedy, group_limited_greedy)")


def _spec(config: HFConfig, v3: bool) -> ModelSpec:
    with spec_errors(config):
        attention = _attention(config)
        expert_width = config.get_int("moe_intermediate_size")
        num_shared = config.get_int("n_shared_experts", default=1 if v3 else 2)
        mlp_bias = False if v3 else config.get_bool("mlp_bias", default=False)
        moe = MoESpec(
            num_experts=config.get_int("n_routed_experts", "num_experts", "num_local_experts"),
            expert_intermediate_size=expert_width,
            router=_router(config, v3),
            shared_intermediate_size=num_shared * expert_width,
            num_shared_experts=num_shared,
            score_bias=v3,
            shared_bias=mlp_bias,
        )
        num_layers = config.get_int("num_hidden_layers")
        first_moe = config.get_int("first_k_dense_replace", default=3 if v3 else 0)
        interleaved = config.get_bool("rope_interleave", default=True) if v3 else True
        return ModelSpec(
            **common_fields(config),
            moe_layers=tuple(range(first_moe, num_layers)),
            dense_intermediate_size=config.get_int("intermediate_size"),
            attention=attention,
            rope=rope(config, attention.qk_rope_head_dim or 0, interleaved=interleaved),
            moe=moe,
            mlp_bias=mlp_bias,
        )


def spec_v2(config: HFConfig) -> ModelSpec:
    """DeepSeek-V2's spec (softmax routing: `greedy` or `group_limited_greedy`)."""
    return _spec(config, v3=False)


def spec_v3(config: HFConfig) -> ModelSpec:
    """DeepSeek-V3's spec (sigmoid routing with score bias, `noaux_tc`)."""
    return _spec(config, v3=True)


ARCHITECTURES = (
    Architecture(name="DeepseekV2ForCausalLM", spec_from_config=spec_v2),
    Architecture(name="DeepseekV3ForCausalLM", spec_from_config=spec_v3),
)
