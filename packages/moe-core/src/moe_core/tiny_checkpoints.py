"""Tiny random checkpoints of every supported architecture, written by transformers itself.

Tests across the workspace build these in a temporary folder (nothing is downloaded): the
reference model is transformers' own class, saved with `save_pretrained`, so the files have the
real checkpoint naming and config fields of each family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_core.errors import OutputError, SettingError

__all__ = ["TINY_KINDS", "TINY_VOCAB", "build_tiny_checkpoint", "ragged_batch", "tiny_config"]

TINY_VOCAB = 96
"""Vocabulary size of every tiny checkpoint (ids 0-2 are pad, BOS and EOS)."""

_COMMON: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}

_KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", {"intermediate_size": 48, "num_local_experts": 4}),
    "qwen2_moe": ("Qwen2MoeConfig", {
        "intermediate_size": 48, "moe_intermediate_size": 16, "num_experts": 6,
        "shared_expert_intermediate_size": 24, "norm_topk_prob": False,
        "decoder_sparse_step": 1, "mlp_only_layers": [1]}),
    "qwen3_moe": ("Qwen3MoeConfig", {
        "intermediate_size": 48, "moe_intermediate_size": 16, "num_experts": 6, "head_dim": 16,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [0]}),
    "olmoe": ("OlmoeConfig", {"intermediate_size": 16, "num_experts": 6, "clip_qkv": 4.0}),
    "deepseek_v2": ("DeepseekV2Config", {
        "num_key_value_heads": 4, "intermediate_size": 48, "moe_intermediate_size": 16,
        "n_routed_experts": 8, "n_shared_experts": 2, "q_lora_rank": None, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
        "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
        "topk_method": "group_limited_greedy", "routed_scaling_factor": 1.5,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                         "mscale_all_dim": 0.707}}),
    "deepseek_v3": ("DeepseekV3Config", {
        "num_key_value_heads": 4, "intermediate_size": 48, "moe_intermediate_size": 16,
        "n_routed_experts": 8, "n_shared_experts": 1, "q_lora_rank": 12, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
        "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}),
}

TINY_KINDS: tuple[str, ...] = tuple(_KINDS)
"""The names `build_tiny_checkpoint` accepts, one per supported architecture."""


def tiny_config(kind: str, **overrides: Any) -> Any:
    """A transformers config object of a tiny model of `kind` (see `TINY_KINDS`)."""
    import transformers

    if kind not in _KINDS:
        raise SettingError(f"unknown tiny kind {kind!r}; choose from {', '.join(_KINDS)}")
    class_name, fields = _KINDS[kind]
    values = {**_COMMON, **fields, **overrides}
    return getattr(transformers, class_name)(**values)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    """Weights with enough spread that routing and logits are far from uniform; norms and biases
    random too, so a mapping mistake cannot hide behind a 1 or a 0."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.dim() == 1 and "norm" in name:
            param.copy_(1.0 + 0.2 * noise)
        elif param.dim() == 1:
            param.copy_(0.1 * noise)
        else:
            param.copy_(std * noise)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(0.05 * torch.randn(buffer.shape, generator=generator))


def build_tiny_checkpoint(kind: str, folder: str | Path, *, seed: int = 0, std: float = 0.15,
                          **overrides: Any) -> Path:
    """Write a tiny random checkpoint of `kind` into `folder` with transformers' `save_pretrained`.

    Args:
        kind: One of `TINY_KINDS`.
        folder: Where to write: a new or empty folder (created if needed).
        seed: Seed of the random weights.
        std: Standard deviation of the weight matrices.
        **overrides: Config fields to change (e.g. `num_hidden_layers=2`).

    Returns:
        The folder.

    Raises:
        SettingError: an unknown `kind`.
        OutputError: `folder` is a file, or a folder that is not empty (nothing is overwritten).
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind, **overrides)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file, not a folder; give a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise OutputError(f"{folder}: the folder is not empty; give a new or empty folder")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed, std)
    model.save_pretrained(folder)
    return folder


def ragged_batch(lengths: tuple[int, ...], width: int, side: str = "left", *,
                 vocab: int = TINY_VOCAB, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids [B, T], attention_mask [B, T])` with rows of `lengths` real tokens in `width`
    slots, padded on `side` (`"left"` or `"right"`).

    The padding slots hold random ids too (not the pad id), so a model that let padding leak into
    attention, or found padding by its id, gives different results; each row's real tokens are the
    same whichever the side. Token ids are drawn from 3..vocab-1 (clear of pad, BOS and EOS).
    """
    if side not in ("left", "right") or max(lengths) > width:
        raise ValueError(f"need side left/right and lengths <= width, got {side}, {lengths}")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (len(lengths), width), generator=generator)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=generator)  # filler
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        real = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, real] = tokens[row, :n]
        mask[row, real] = 1
    return ids, mask
