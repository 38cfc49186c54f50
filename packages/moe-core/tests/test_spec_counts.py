"""ModelSpec's parameter counts equal the tensors transformers actually builds, per family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from moe_core import ModelSpec, load_model
from moe_core.tiny_checkpoints import TINY_KINDS, build_tiny_checkpoint
from transformers import AutoModelForCausalLM


def _transformers_count(folder: Path) -> int:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # DeepSeek-V3's score bias is a buffer in transformers but a weight of the checkpoint.
    extra = sum(b.numel() for n, b in model.named_buffers()
                if n.endswith("e_score_correction_bias"))
    return sum(p.numel() for p in model.parameters()) + extra


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_total_params_match_transformers_and_ours(kind: str, tie: bool, tmp_path: Path) -> None:
    folder = build_tiny_checkpoint(kind, tmp_path, tie_word_embeddings=tie)
    spec = ModelSpec.from_pretrained(folder)
    ours = sum(p.numel() for p in load_model(folder).parameters())
    assert spec.total_params == _transformers_count(folder) == ours


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_bytes_split_into_dense_and_experts(kind: str, tmp_path: Path) -> None:
    spec = ModelSpec.from_pretrained(build_tiny_checkpoint(kind, tmp_path))
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        assert spec.total_bytes(dtype) == spec.dense_bytes(dtype) + spec.routed_expert_bytes(dtype)
        assert spec.routed_expert_bytes(dtype) == (
            spec.expert_bytes(dtype) * spec.moe.num_experts * spec.num_moe_layers)
        assert spec.expert_bytes(dtype) == size * 3 * spec.hidden_size * (
            spec.moe.expert_intermediate_size)
    active = spec.dense_params + spec.num_moe_layers * spec.moe.router.top_k * spec.expert_params
    assert spec.active_params_per_token == active < spec.total_params
