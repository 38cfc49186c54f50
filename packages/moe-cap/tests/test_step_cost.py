"""Bytes and FLOPs of one step, worked by hand for four real MoE shapes.

Every expected number below is derived in the comments from the model's config.json, so a change
in the counting conventions (docs/moe-cap.md) shows up here as a precise failure.
"""

from __future__ import annotations

import dataclasses

import pytest
from moe_cap import Chunk, decode_batch, prefill_batch, step_cost
from moe_core import ModelSpec


def test_mixtral_decode_batch1(mixtral: ModelSpec) -> None:
    # Mixtral-8x7B: D=4096, 32 layers (all MoE), V=32000, 8 experts top-2, F=14336,
    # GQA 32 query heads / 8 kv heads of 128.
    c = step_cost(mixtral, decode_batch(1, 1024))
    # Attention projections per token per layer: q 4096x4096 + k,v 4096x1024 each + o 4096x4096
    #   = 4096 * 6144 + 4096 * 4096 = 41,943,040 MACs; x32 layers x2 FLOPs = 2,684,354,560.
    assert c.attention_projection_flops == 2_684_354_560
    # Decode at 1024 cached: the query scores 1024 + 1 (itself) = 1025 keys; each pair costs
    #   32 heads x (128 + 128) MACs = 8192; 1025 * 8192 * 32 layers * 2 = 537,395,200.
    assert c.attention_score_flops == 537_395_200
    # Top-2 (not one!) experts of 3 * 4096 * 14336 = 176,160,768 weights:
    #   2 * 176,160,768 * 32 layers * 2 FLOPs = 22,548,578,304.
    assert c.routed_expert_flops == 22_548_578_304
    assert c.router_flops == 2 * 32 * 4096 * 8 == 2_097_152
    assert c.lm_head_flops == 2 * 4096 * 32000 == 262_144_000
    assert c.dense_mlp_flops == c.shared_expert_flops == 0
    assert c.flops == 26_034_569_216
    # Bytes in bf16: non-expert weights 1,605,636,096 less the unused embedding rows
    #   (32000 - 1) * 4096 = 131,067,904 -> 1,474,568,192 params = 2,949,136,384 B.
    assert c.dense_weight_bytes == 2_949_136_384
    # One token activates exactly k = 2 experts per layer: 8 * (1 - (1 - 2/8)^1) = 2.
    assert c.experts.expected == (2.0,) * 32
    assert c.routed_expert_bytes == 64 * 176_160_768 * 2 == 22_548_578_304
    # KV: 2 * 8 heads * 128 = 2048 elements per token per layer, bf16:
    #   read 1024 tokens * 32 layers * 2048 * 2 B = 134,217,728; write one token = 131,072.
    assert c.kv_read_bytes == 134_217_728
    assert c.kv_write_bytes == 131_072
    assert c.bytes == 25_632_063_488


def test_mixtral_decode_batch32_expected_experts(mixtral: ModelSpec) -> None:
    c = step_cost(mixtral, decode_batch(32, 1024))
    # 32 tokens: 8 * (1 - 0.75^32) = 8 - 8 * 1.00452e-4 = 7.999196 distinct experts per layer.
    assert c.experts.mean_expected == pytest.approx(7.999196, abs=1e-6)
    # FLOPs scale with tokens (32x), weight bytes barely move; KV reads scale 32x.
    assert c.routed_expert_flops == 32 * 22_548_578_304
    assert c.kv_read_bytes == 32 * 134_217_728


def test_mixtral_prefill_causal_average(mixtral: ModelSpec) -> None:
    c = step_cost(mixtral, prefill_batch(1, 1024))
    # A 1024-token prompt scores 1024 * 1025 / 2 = 524,800 pairs (causal, diagonal included),
    #   not 1024^2: 524,800 * 8192 MACs * 32 layers * 2 = 275,146,342,400.
    assert c.attention_score_flops == 275_146_342_400
    # Every expert is read: 8 * (1 - 0.75^1024) = 8 to float precision.
    assert c.experts.mean_expected == pytest.approx(8.0)
    assert c.lm_head_flops == 262_144_000  # last position only
    assert c.kv_read_bytes == 0 and c.kv_write_bytes == 134_217_728


def test_qwen3_decode(qwen3: ModelSpec) -> None:
    # Qwen3-30B-A3B: D=2048, 48 layers, V=151936, 128 experts top-8, F=768, GQA 32/4 of 128.
    c = step_cost(qwen3, decode_batch(1, 1024))
    # Projections: 2048 * (4096 + 512 + 512) + 4096 * 2048 = 18,874,368 MACs per layer;
    #   x48 x2 = 1,811,939,328.
    assert c.attention_projection_flops == 1_811_939_328
    assert c.attention_score_flops == 1025 * 32 * 256 * 48 * 2 == 806_092_800
    # Experts: 3 * 2048 * 768 = 4,718,592 weights; 8 per token: 8 * 4,718,592 * 48 * 2.
    assert c.routed_expert_flops == 3_623_878_656
    assert c.router_flops == 2 * 48 * 2048 * 128 == 25_165_824
    assert c.lm_head_flops == 2 * 2048 * 151936 == 622_329_856
    assert c.flops == 6_889_406_464
    # KV: 2 * 4 * 128 = 1024 elements per token per layer -> 1024 * 48 * 1024 * 2 B read.
    assert c.kv_read_bytes == 100_663_296
    # Weights: 1,541,093,376 non-expert params less (151936 - 1) * 2048 unused embedding rows
    #   = 1,229,930,496 params = 2,459,860,992 B; experts 8 * 48 * 4,718,592 * 2 B.
    assert c.dense_weight_bytes == 2_459_860_992
    assert c.routed_expert_bytes == 3_623_878_656


def test_qwen3_decode_batch32_experts(qwen3: ModelSpec) -> None:
    c = step_cost(qwen3, decode_batch(32, 1024))
    # 128 * (1 - (1 - 8/128)^32) = 128 * (1 - 0.9375^32) = 128 * (1 - 0.126788) = 111.771.
    assert c.experts.mean_expected == pytest.approx(111.771035, abs=1e-5)
    assert c.routed_expert_bytes == pytest.approx(111.771035 * 48 * 4_718_592 * 2, rel=1e-7)


def test_deepseek_v3_decode_absorbed_mla(dsv3: ModelSpec) -> None:
    # DeepSeek-V3: D=7168, 61 layers (3 dense, 58 MoE), V=129280, 256 experts top-8 of F=2048,
    # one shared expert, dense MLP 18432; MLA with 128 heads, q_lora 1536, kv_lora R=512,
    # nope 128, rope 64, v 128.
    c = step_cost(dsv3, decode_batch(1, 1024))
    # Projections per token per layer: q_a 7168*1536 + q_b 1536*128*192 + kv_a 7168*576
    #   + kv_b 512*128*256 + o 128*128*7168 = 187,105,280 MACs; x61 x2 = 22,826,844,160.
    assert c.attention_projection_flops == 22_826_844_160
    # 1025 pairs. Expanded MLA would re-expand 1024 cached latents through kv_b every step:
    #   1024*512*128*256 = 17.2 G MACs. Absorbed: 1025 * 128 heads * (2*512 + 64) = 142,745,600
    #   MACs per layer, the cheaper: x61 x2 = 17,414,963,200.
    assert c.attention_score_flops == 17_414_963_200
    assert c.dense_mlp_flops == 2 * 3 * 3 * 7168 * 18432 == 2_378_170_368
    assert c.shared_expert_flops == 2 * 58 * 3 * 7168 * 2048 == 5_108_662_272
    assert c.routed_expert_flops == 2 * 58 * 8 * 3 * 7168 * 2048 == 40_869_298_176
    assert c.router_flops == 2 * 58 * 7168 * 256 == 212_860_928
    # KV is the latent: 512 + 64 = 576 elements per token per layer, not 2*128*192.
    assert c.kv_read_bytes == 1024 * 61 * 576 * 2 == 71_958_528
    assert c.experts.num_shared == 1


def test_deepseek_v3_prefill_expanded_mla(dsv3: ModelSpec) -> None:
    c = step_cost(dsv3, prefill_batch(1, 1024))
    # 524,800 pairs; expanded costs 128 * (192 + 128) = 40,960 MACs a pair (nothing cached to
    #   re-expand), absorbed 128 * 1088 = 139,264: expanded wins.
    #   524,800 * 40,960 * 61 * 2 = 2,622,488,576,000.
    assert c.attention_score_flops == 2_622_488_576_000


def test_deepseek_v2_decode(dsv2: ModelSpec) -> None:
    # DeepSeek-V2: D=5120, 60 layers (1 dense), V=102400, 160 experts top-6 of F=1536, 2 shared
    # experts (one MLP of 3072), dense MLP 12288, MLA 128 heads, q_lora 1536, R=512.
    # Its published totals, 236B parameters and 21B activated, come out of the spec:
    assert round(dsv2.total_params / 1e9) == 236
    assert round(dsv2.active_params_per_token / 1e9) == 21
    c = step_cost(dsv2, decode_batch(1, 4096))
    # Projections: 5120*1536 + 1536*128*192 + 5120*576 + 512*128*256 + 128*128*5120
    #   = 149,225,472 MACs; x60 x2 = 17,907,056,640.
    assert c.attention_projection_flops == 17_907_056_640
    # Absorbed: 4097 pairs * 128 * 1088 = 570,564,608 MACs per layer; x60 x2.
    assert c.attention_score_flops == 68_467_752_960
    assert c.routed_expert_flops == 2 * 59 * 6 * 3 * 5120 * 1536 == 16_703_815_680
    assert c.shared_expert_flops == 2 * 59 * 3 * 5120 * 3072 == 5_567_938_560
    assert c.dense_mlp_flops == 2 * 3 * 5120 * 12288 == 377_487_360
    assert c.kv_read_bytes == 4096 * 60 * 576 * 2 == 283_115_520


def test_dense_bytes_agree_with_the_spec(mixtral: ModelSpec, dsv3: ModelSpec) -> None:
    for spec in (mixtral, dsv3):
        v = spec.vocab_size
        c = step_cost(spec, decode_batch(v, 1))  # V tokens gather every embedding row
        assert c.dense_weight_bytes == spec.dense_bytes("bfloat16")


def test_storage_formats_scale_bytes_not_flops(mixtral: ModelSpec) -> None:
    bf16 = step_cost(mixtral, decode_batch(4, 512))
    fp8 = step_cost(mixtral, decode_batch(4, 512), weight_dtype="fp8", kv_dtype="fp8")
    int4 = step_cost(mixtral, decode_batch(4, 512), expert_dtype="int4")
    assert fp8.flops == bf16.flops
    assert fp8.weight_bytes == bf16.weight_bytes / 2
    assert fp8.kv_read_bytes == bf16.kv_read_bytes / 2
    assert int4.routed_expert_bytes == bf16.routed_expert_bytes / 4
    assert int4.dense_weight_bytes == bf16.dense_weight_bytes


def test_measured_experts_replace_the_expectation(mixtral: ModelSpec) -> None:
    c = step_cost(mixtral, decode_batch(32, 100), measured_experts=[5] * 32)
    assert c.routed_expert_bytes == 5 * 32 * 176_160_768 * 2
    assert c.experts.mean_measured == 5 and c.experts.mean_expected > 7.99
    with pytest.raises(ValueError, match="9"):
        step_cost(mixtral, decode_batch(32, 100), measured_experts=[9] * 32)
    with pytest.raises(ValueError, match="layers"):
        step_cost(mixtral, decode_batch(32, 100), measured_experts=[5] * 31)


def test_chunked_prefill_pairs(mixtral: ModelSpec) -> None:
    # 4 new tokens after 10 cached: 4 * 10 + 4 * 5 / 2 = 50 pairs; equals 4 decode steps'
    # 11 + 12 + 13 + 14 = 50.
    one = step_cost(mixtral, [Chunk(10, 4)]).attention_score_flops
    steps = sum(step_cost(mixtral, [Chunk(p, 1)]).attention_score_flops for p in range(10, 14))
    assert one == steps == 50 * 8192 * 32 * 2


def test_sliding_window_layers(mixtral: ModelSpec) -> None:
    spec = dataclasses.replace(
        mixtral, attention=dataclasses.replace(mixtral.attention, sliding_window=4),
        sliding_layers=tuple(range(32)))
    # Window 4: a query at position q sees min(q + 1, 4) keys. Prefill of 6: 1+2+3+4+4+4 = 18.
    assert step_cost(spec, prefill_batch(1, 6)).attention_score_flops == 18 * 8192 * 32 * 2
    # Decode at 100 cached reads only the last 3 cached tokens (4 with itself).
    c = step_cost(spec, decode_batch(1, 100))
    assert c.attention_score_flops == 4 * 8192 * 32 * 2
    assert c.kv_read_bytes == 3 * 32 * 2048 * 2


def test_bad_steps_are_rejected(mixtral: ModelSpec) -> None:
    with pytest.raises(ValueError, match="at least one"):
        step_cost(mixtral, [])
    with pytest.raises(ValueError, match="new_tokens"):
        Chunk(0, 0)
    with pytest.raises(ValueError, match="precision"):
        step_cost(mixtral, decode_batch(1, 1), kv_dtype="fp7")


def test_truncated_model_costs_fewer_layers(mixtral: ModelSpec) -> None:
    full, eight = mixtral, mixtral.truncated(8)
    a, b = step_cost(full, decode_batch(1, 64)), step_cost(eight, decode_batch(1, 64))
    assert b.routed_expert_flops * 4 == a.routed_expert_flops
    assert b.lm_head_flops == a.lm_head_flops
