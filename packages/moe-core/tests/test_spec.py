"""`ModelSpec.from_config` on the public `config.json` of six real checkpoints, checked against
sizes derived by hand, and the field aliases of the transformers releases.

The configs are written inline in the transformers-4 style of the hub files (`rope_theta`,
`rope_scaling`, `num_experts`, `torch_dtype`). Every expected number is worked out in the comment
above it from the config alone: p = parameters; d = hidden_size, V = vocab_size, L = layers.
"""

from __future__ import annotations

import copy
from typing import Any

import moe_core
import pytest
from moe_core import ConfigError, ModelSpec, RopeSpec
from moe_core.hf_config import HFConfig

MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.02, "torch_dtype": "bfloat16",
}

QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "max_position_embeddings": 40960, "max_window_layers": 48, "rms_norm_eps": 1e-6,
    "rope_theta": 1e6, "rope_scaling": None, "sliding_window": None, "use_sliding_window": False,
    "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

QWEN15_MOE_A27B: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
    "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
    "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False,
    "decoder_sparse_step": 1, "max_position_embeddings": 8192, "max_window_layers": 21,
    "rms_norm_eps": 1e-6, "rope_theta": 1e6, "sliding_window": 32768,
    "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

OLMOE_1B_7B: dict[str, Any] = {
    "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
    "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
    "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
    "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "clip_qkv": None,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "rope_scaling": None, "attention_bias": False, "eos_token_id": 50279, "pad_token_id": 1,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

DEEPSEEK_V2_LITE: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
    "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "q_lora_rank": None,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "attention_bias": False, "bos_token_id": 100000, "eos_token_id": 100001,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "num_nextn_predict_layers": 1, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

ALL_CONFIGS = [MIXTRAL_8X7B, QWEN3_30B_A3B, QWEN15_MOE_A27B, OLMOE_1B_7B, DEEPSEEK_V2_LITE,
               DEEPSEEK_V3]


def edited(config: dict[str, Any], drop: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
    """A deep copy of `config` without the `drop` fields and with `changes` applied."""
    out = copy.deepcopy(config)
    for key in drop:
        del out[key]
    out.update(changes)
    return out


# --- Mixtral-8x7B -----------------------------------------------------------------------------


def test_mixtral_8x7b_sizes() -> None:
    spec = ModelSpec.from_config(MIXTRAL_8X7B)
    # head_dim = 4096 / 32 = 128; attention: q and o 4096*4096 each, k and v 4096*(8*128) each
    #   = 2*16,777,216 + 2*4,194,304 = 41,943,040 p
    # expert: gate, up, down of 4096 x 14336 = 3*58,720,256 = 176,160,768 p
    assert spec.expert_params == 176_160_768
    # bf16: 2 bytes each
    assert spec.expert_bytes("bfloat16") == 352_321_536
    # per layer: attention + 2 norms (8,192) + router (8*4096 = 32,768) + 8 experts
    #   = 41,943,040 + 8,192 + 32,768 + 1,409,286,144 = 1,451,270,144
    # total: 32 layers = 46,440,644,608; + embed and head 2*32000*4096 = 262,144,000;
    #   + final norm 4,096
    assert spec.total_params == 46_702_792_704  # "46.7B"
    # active: everything but 6 of the 8 experts in each layer:
    #   46,702,792,704 - 32*6*176,160,768 (= 33,822,867,456)
    assert spec.active_params_per_token == 12_879_925_248  # "12.9B"
    assert spec.dense_params == 1_605_636_096
    # KV cache: 32 layers * (k and v) * 8 kv heads * 128 * 2 bytes
    assert spec.kv_bytes_per_token("bfloat16") == 131_072
    assert spec.kv_bytes_per_token("float32") == 262_144


def test_mixtral_8x7b_shape() -> None:
    spec = ModelSpec.from_config(MIXTRAL_8X7B)
    assert spec.moe_layers == tuple(range(32)) and spec.dense_layers == ()
    assert spec.moe.num_experts == 8 and spec.moe.expert_intermediate_size == 14336
    assert spec.moe.router.method == "softmax_topk"
    assert spec.moe.router.top_k == 2 and spec.moe.router.normalize  # always renormalised
    assert spec.moe.shared_intermediate_size == 0 and not spec.moe.shared_gate
    assert (spec.attention.kind, spec.attention.num_heads, spec.attention.num_kv_heads,
            spec.attention.head_dim) == ("gqa", 32, 8, 128)
    assert spec.attention.sliding_window is None and spec.sliding_layers == ()
    assert spec.rope == RopeSpec(theta=1e6, rotary_dim=128)
    assert spec.rms_norm_eps == 1e-5 and spec.eos_token_ids == (2,) and spec.bos_token_id == 1
    assert spec.torch_dtype == "bfloat16"


# --- Qwen3-30B-A3B ----------------------------------------------------------------------------


def test_qwen3_30b_a3b_honours_head_dim() -> None:
    spec = ModelSpec.from_config(QWEN3_30B_A3B)
    # head_dim is 128 although 2048 / 32 heads would give 64.
    assert spec.attention.head_dim == 128 and spec.attention.v_head_dim == 128
    assert spec.rope.rotary_dim == 128
    assert spec.attention.qk_norm == "per_head"
    # KV cache: 48 layers * 2 * 4 kv heads * 128 * 2 bytes
    assert spec.kv_bytes_per_token("bfloat16") == 98_304


def test_qwen3_30b_a3b_sizes() -> None:
    spec = ModelSpec.from_config(QWEN3_30B_A3B)
    # expert: 3 * 2048 * 768 = 4,718,592 p; bf16 9,437,184 bytes
    assert spec.expert_bytes("bf16") == 9_437_184
    # attention: q 2048*(32*128) = 8,388,608, k and v 2048*(4*128) = 1,048,576 each,
    #   o 8,388,608, q/k norms 2*128 = 18,874,624 p
    # per layer: attention + 2 norms 4,096 + router 128*2048 = 262,144 + 128 experts
    #   603,979,776 = 623,120,640; 48 layers = 29,909,790,720
    # + embed and head 2*151936*2048 = 622,329,856 + final norm 2,048
    assert spec.total_params == 30_532_122_624  # "30.5B"
    # active: 48 * (18,874,624 + 4,096 + 262,144 + 8*4,718,592) + 622,331,904
    assert spec.active_params_per_token == 3_353_032_704  # "3.3B"
    assert spec.moe.router.method == "softmax_topk" and spec.moe.router.normalize
    assert spec.moe.router.top_k == 8 and spec.moe.num_experts == 128
    assert spec.moe_layers == tuple(range(48))
    assert spec.eos_token_ids == (151645,)


def test_qwen_moe_layers_follow_sparse_step_and_mlp_only_layers() -> None:
    # MoE where (i + 1) % step == 0 and i is not in mlp_only_layers: with step 2 the odd
    # layers, less 5.
    spec = ModelSpec.from_config(edited(QWEN3_30B_A3B, num_hidden_layers=8,
                                        decoder_sparse_step=2, mlp_only_layers=[5]))
    assert spec.moe_layers == (1, 3, 7)
    assert spec.dense_layers == (0, 2, 4, 5, 6)
    assert spec.dense_intermediate_size == 6144
    spec = ModelSpec.from_config(edited(QWEN15_MOE_A27B, num_hidden_layers=4,
                                        mlp_only_layers=[0, 2]))
    assert spec.moe_layers == (1, 3) and spec.dense_intermediate_size == 5632


# --- Qwen1.5-MoE-A2.7B ------------------------------------------------------------------------


def test_qwen15_moe_a27b_shared_expert_and_sizes() -> None:
    spec = ModelSpec.from_config(QWEN15_MOE_A27B)
    # One shared expert of width 5632 behind a sigmoid gate (a 2048 -> 1 linear).
    assert spec.moe.shared_intermediate_size == 5632 and spec.moe.num_shared_experts == 1
    assert spec.moe.shared_gate
    # Qwen2 has q/k/v biases and no qkv_bias field in the config.
    assert spec.attention.qkv_bias and not spec.attention.o_bias
    # use_sliding_window is false: the 32768 window is not used.
    assert spec.attention.sliding_window is None and spec.sliding_layers == ()
    assert spec.moe.router.method == "softmax_topk" and not spec.moe.router.normalize
    # expert: 3 * 2048 * 1408 = 8,650,752 p
    assert spec.expert_bytes("bfloat16") == 17_301_504
    # MoE block outside the routed experts: router 60*2048 = 122,880 + shared MLP
    #   3*2048*5632 = 34,603,008 + gate 2,048 = 34,727,936
    assert spec.moe_block_dense_params == 34_727_936
    # attention: 4 * 2048*2048 + q/k/v biases 3*2048 = 16,783,360
    # per layer: 16,783,360 + 4,096 + 34,727,936 + 60 * 8,650,752 (= 519,045,120)
    #   = 570,560,512; 24 layers = 13,693,452,288
    # + embed and head 2*151936*2048 = 622,329,856 + final norm 2,048
    assert spec.total_params == 14_315_784_192  # "14.3B"
    # active: total - 24 * 56 * 8,650,752
    assert spec.active_params_per_token == 2_689_173_504  # "2.7B"
    # KV: 24 * 2 * 16 * 128 * 2
    assert spec.kv_bytes_per_token() == 196_608


# --- OLMoE-1B-7B ------------------------------------------------------------------------------


def test_olmoe_1b_7b_sizes() -> None:
    spec = ModelSpec.from_config(OLMOE_1B_7B)
    # OLMoE's experts are `intermediate_size` wide; there is no dense MLP.
    assert spec.moe.expert_intermediate_size == 1024 and spec.moe_layers == tuple(range(16))
    assert spec.attention.qk_norm == "full" and spec.attention.clip_qkv is None
    assert spec.moe.router.top_k == 8 and not spec.moe.router.normalize
    # expert: 3 * 2048 * 1024 = 6,291,456 p
    assert spec.expert_bytes() == 12_582_912
    # attention: 4 * 2048*2048 + q and k norms over all heads 2*2048 = 16,781,312
    # per layer: 16,781,312 + 4,096 + router 64*2048 = 131,072 + 64 * 6,291,456
    #   (= 402,653,184) = 419,569,664; 16 layers = 6,713,114,624
    # + embed and head 2*50304*2048 = 206,045,184 + final norm 2,048
    assert spec.total_params == 6_919_161_856  # "6.9B"
    # active: total - 16 * 56 * 6,291,456
    assert spec.active_params_per_token == 1_282_017_280  # "1.3B"
    assert spec.pad_token_id == 1 and spec.eos_token_ids == (50279,)


def test_olmoe_clip_qkv_is_read() -> None:
    assert ModelSpec.from_config(edited(OLMOE_1B_7B, clip_qkv=8)).attention.clip_qkv == 8.0


# --- DeepSeek-V2-Lite -------------------------------------------------------------------------


def test_deepseek_v2_lite_layers_and_shared_experts() -> None:
    spec = ModelSpec.from_config(DEEPSEEK_V2_LITE)
    # first_k_dense_replace = 1: layer 0 is dense (width 10944), layers 1..26 are MoE.
    assert spec.dense_layers == (0,) and spec.moe_layers == tuple(range(1, 27))
    assert spec.dense_intermediate_size == 10944
    # Two shared experts are one MLP of 2 * 1408.
    assert spec.moe.shared_intermediate_size == 2816 and spec.moe.num_shared_experts == 2
    assert not spec.moe.shared_gate and not spec.moe.score_bias
    # topk_method greedy is a plain softmax top-k, never renormalised in V2.
    router = spec.moe.router
    assert (router.method, router.top_k, router.normalize, router.scaling_factor,
            router.fp32_gate) == ("softmax_topk", 6, False, 1.0, True)


def test_deepseek_v2_lite_mla_and_sizes() -> None:
    spec = ModelSpec.from_config(DEEPSEEK_V2_LITE)
    att = spec.attention
    assert (att.kind, att.q_lora_rank, att.kv_lora_rank) == ("mla", None, 512)
    assert att.head_dim == 192 and att.v_head_dim == 128  # 128 nope + 64 rope
    # KV cache holds the 512-wide latent and the 64-wide rope key:
    #   27 layers * (512 + 64) * 2 bytes
    assert spec.kv_bytes_per_token("bfloat16") == 27 * (512 + 64) * 2 == 31_104
    # attention: q_proj 2048 * 16*192 = 6,291,456; kv_a 2048 * 576 = 1,179,648; its norm 512;
    #   kv_b 512 * 16*(128+128) = 2,097,152; o 16*128 * 2048 = 4,194,304 -> 13,763,072
    assert att.num_params(2048) == 13_763_072
    # 27 * (attention + 2 norms) = 371,713,536; dense MLP 3*2048*10944 = 67,239,936;
    # 26 MoE blocks * (router 131,072 + shared 3*2048*2816 = 17,301,504
    #   + 64 experts * 3*2048*1408 = 553,648,128) = 14,848,098,304;
    # embed and head 2*102400*2048 = 419,430,400; final norm 2,048
    assert spec.total_params == 15_706_484_224  # "15.7B"
    # active: total - 26 * 58 * 8,650,752
    assert spec.active_params_per_token == 2_661_150_208


def test_deepseek_v2_lite_yarn_rope() -> None:
    rope = ModelSpec.from_config(DEEPSEEK_V2_LITE).rope
    assert rope == RopeSpec(theta=10000.0, rotary_dim=64, interleaved=True, scaling="yarn",
                            factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                            beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)


def test_deepseek_v2_router_methods() -> None:
    spec = ModelSpec.from_config(edited(DEEPSEEK_V2_LITE, topk_method="group_limited_greedy",
                                        n_group=8, topk_group=3, routed_scaling_factor=16.0))
    router = spec.moe.router
    assert (router.method, router.num_groups, router.topk_groups, router.scaling_factor,
            router.normalize) == ("group_limited_greedy", 8, 3, 16.0, False)
    # V2 ignores norm_topk_prob (transformers never renormalises V2's weights).
    spec = ModelSpec.from_config(edited(DEEPSEEK_V2_LITE, norm_topk_prob=True))
    assert not spec.moe.router.normalize
    with pytest.raises(ConfigError, match="topk_method 'noaux_tc' is not supported"):
        ModelSpec.from_config(edited(DEEPSEEK_V2_LITE, topk_method="noaux_tc"))


# --- DeepSeek-V3 ------------------------------------------------------------------------------


def test_deepseek_v3_router_and_layers() -> None:
    spec = ModelSpec.from_config(DEEPSEEK_V3)
    router = spec.moe.router
    assert (router.method, router.top_k, router.num_groups, router.topk_groups,
            router.normalize, router.scaling_factor) == ("noaux_tc", 8, 8, 4, True, 2.5)
    assert spec.moe.score_bias and spec.moe.num_experts == 256
    # first_k_dense_replace = 3: layers 0-2 dense, 58 MoE layers.
    assert spec.dense_layers == (0, 1, 2) and spec.moe_layers == tuple(range(3, 61))
    assert spec.moe.shared_intermediate_size == 2048  # one shared expert


def test_deepseek_v3_sizes() -> None:
    spec = ModelSpec.from_config(DEEPSEEK_V3)
    # expert: 3 * 7168 * 2048 = 44,040,192 p
    assert spec.expert_bytes("bfloat16") == 88_080_384
    # KV: 61 layers * (512 + 64) * 2 bytes
    assert spec.kv_bytes_per_token() == 70_272
    # attention: q_a 7168*1536 = 11,010,048 + norm 1,536 + q_b 1536 * 128*192 = 37,748,736;
    #   kv_a 7168 * 576 = 4,128,768 + norm 512; kv_b 512 * 128*256 = 16,777,216;
    #   o 128*128 * 7168 = 117,440,512 -> 187,107,328
    # 61 * (attention + 2 norms 14,336) = 11,414,421,504; 3 dense MLPs 3 * 3*7168*18432
    #   = 1,189,085,184; 58 MoE blocks * (router 256*7168 + bias 256 + shared 3*7168*2048)
    #   = 58 * 45,875,456 = 2,660,776,448; embed and head 2*129280*7168 = 1,853,358,080;
    #   final norm 7,168 -> 17,117,648,384 outside the routed experts
    assert spec.dense_params == 17_117_648_384
    # + 58 * 256 * 44,040,192 = 653,908,770,816 routed
    assert spec.total_params == 671_026_419_200  # "671B" (without the MTP layer)
    # + 58 * 8 * 44,040,192 = 20,434,649,088 active routed
    assert spec.active_params_per_token == 37_552_297_472  # "37B"


def test_deepseek_v3_yarn_factor_from_the_two_lengths() -> None:
    scaling = {k: v for k, v in DEEPSEEK_V3["rope_scaling"].items() if k != "factor"}
    rope = ModelSpec.from_config(edited(DEEPSEEK_V3, rope_scaling=scaling)).rope
    assert rope.scaling == "yarn" and rope.factor == 163840 / 4096 == 40.0
    assert (rope.mscale, rope.mscale_all_dim) == (1.0, 1.0)


def test_deepseek_v3_rope_interleave_flag() -> None:
    assert ModelSpec.from_config(DEEPSEEK_V3).rope.interleaved
    assert not ModelSpec.from_config(edited(DEEPSEEK_V3, rope_interleave=False)).rope.interleaved


# --- Aliases across transformers releases -----------------------------------------------------


@pytest.mark.parametrize(("config", "old", "new"), [
    (MIXTRAL_8X7B, "num_local_experts", "num_experts"),
    (QWEN3_30B_A3B, "num_experts", "num_local_experts"),  # what transformers 5 saves
    (QWEN15_MOE_A27B, "num_experts", "num_local_experts"),
    (OLMOE_1B_7B, "num_experts", "num_local_experts"),
    (DEEPSEEK_V3, "n_routed_experts", "num_experts"),
    (DEEPSEEK_V2_LITE, "n_routed_experts", "num_local_experts"),
    (MIXTRAL_8X7B, "torch_dtype", "dtype"),
], ids=lambda v: v if isinstance(v, str) else v["architectures"][0])
def test_renamed_field_gives_the_same_spec(config: dict[str, Any], old: str, new: str) -> None:
    renamed = edited(config, drop=(old,), **{new: config[old]})
    assert ModelSpec.from_config(renamed) == ModelSpec.from_config(config)


@pytest.mark.parametrize("config", [MIXTRAL_8X7B, QWEN3_30B_A3B, DEEPSEEK_V3],
                         ids=lambda c: c["architectures"][0])
def test_rope_parameters_spelling_gives_the_same_spec(config: dict[str, Any]) -> None:
    # transformers 5 writes one `rope_parameters` dict and no top-level rope_theta.
    params = {"rope_theta": config["rope_theta"], "rope_type": "default"}
    if config.get("rope_scaling"):
        params.update(config["rope_scaling"])
        params["rope_type"] = params.pop("type")
    modern = edited(config, drop=("rope_theta",), rope_parameters=params)
    modern.pop("rope_scaling", None)  # Mixtral's config never had one
    assert ModelSpec.from_config(modern) == ModelSpec.from_config(config)


def test_rope_theta_inside_rope_parameters_wins_over_the_top_level_one() -> None:
    config = edited(MIXTRAL_8X7B, rope_theta=1e4,
                    rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    assert ModelSpec.from_config(config).rope.theta == 5e5


def test_missing_rope_theta_defaults_to_ten_thousand() -> None:
    config = edited(OLMOE_1B_7B, drop=("rope_theta",))
    assert ModelSpec.from_config(config).rope.theta == 10000.0


def test_eos_token_id_list() -> None:
    spec = ModelSpec.from_config(edited(QWEN3_30B_A3B, eos_token_id=[151645, 151643]))
    assert spec.eos_token_ids == (151645, 151643)


def test_dtype_absent_is_none() -> None:
    assert ModelSpec.from_config(edited(OLMOE_1B_7B, drop=("torch_dtype",))).torch_dtype is None


# --- The registry -----------------------------------------------------------------------------


def test_supported_architectures() -> None:
    assert set(moe_core.supported_architectures()) == {
        "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
        "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}
    assert {c["architectures"][0] for c in ALL_CONFIGS} == set(moe_core.supported_architectures())


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: c["architectures"][0])
def test_spec_from_dict_and_from_hf_config_agree(config: dict[str, Any]) -> None:
    spec = ModelSpec.from_config(config)
    assert spec == ModelSpec.from_config(HFConfig(config))
    assert spec.architecture == config["architectures"][0]
    assert spec.model_type == config["model_type"]
    assert spec.num_layers == config["num_hidden_layers"]
    assert spec.total_bytes("bfloat16") == 2 * spec.total_params
    assert spec.total_bytes("float32") == 4 * spec.total_params


def test_truncated_keeps_only_the_first_layers() -> None:
    spec = ModelSpec.from_config(DEEPSEEK_V3).truncated(5)
    assert spec.num_layers == 5 and spec.moe_layers == (3, 4) and spec.dense_layers == (0, 1, 2)
    with pytest.raises(ValueError, match=r"num_layers must be in 1\.\.61"):
        ModelSpec.from_config(DEEPSEEK_V3).truncated(62)


# --- Model names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [moe_core.TINY_MODEL_NAME, *moe_core.known_shapes()])
def test_from_pretrained_takes_every_name_a_folder_does(name: str) -> None:
    """The README's promise: a name works wherever a folder does, `from_pretrained` included."""
    folder = moe_core.resolve_model_path(name, weights=False)
    assert ModelSpec.from_pretrained(name) == ModelSpec.from_pretrained(folder)
    assert ModelSpec.from_pretrained(name) == ModelSpec.from_pretrained(folder / "config.json")


def test_from_pretrained_mixtral_8x7b_by_name_is_mixtral() -> None:
    assert ModelSpec.from_pretrained("mixtral-8x7b") == ModelSpec.from_config(MIXTRAL_8X7B)


def test_from_pretrained_of_an_unknown_name_says_so() -> None:
    with pytest.raises(ConfigError, match="no-such-model: no such model folder"):
        ModelSpec.from_pretrained("no-such-model")
