"""`MoEForCausalLM`: one decoder for every supported architecture, configured by its `ModelSpec`.

Dimension key: B batch, T new tokens, S keys (cached + new), D hidden, V vocabulary.

Module names follow the common Hugging Face layout (`model.layers.3.self_attn.q_proj`), so the
loader maps checkpoint names with a few per-family renames (see `architectures`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from moe_core.kv_cache import KVCache
from moe_core.layers.attention import GQAAttention
from moe_core.layers.mla import MLAAttention
from moe_core.layers.mlp import GatedMLP
from moe_core.layers.norm import RMSNorm
from moe_core.layers.rotary import RotaryEmbedding
from moe_core.moe_block import MoEBlock
from moe_core.spec import ModelSpec

if TYPE_CHECKING:
    from moe_core.generation import GenerationResult

__all__ = ["DecoderLayer", "MoEForCausalLM", "attention_mask_for"]


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then a dense MLP or a MoE block."""

    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        d = spec.hidden_size
        self.input_layernorm = RMSNorm(d, spec.rms_norm_eps)
        self.self_attn: MLAAttention | GQAAttention
        if spec.attention.kind == "mla":
            self.self_attn = MLAAttention(spec.attention, d, spec.rms_norm_eps, layer, spec.rope,
                                          spec.rope.interleaved)
        else:
            self.self_attn = GQAAttention(spec.attention, d, spec.rms_norm_eps, layer)
        self.post_attention_layernorm = RMSNorm(d, spec.rms_norm_eps)
        self.mlp: MoEBlock | GatedMLP
        if spec.is_moe_layer(layer):
            self.mlp = MoEBlock(spec.moe, d, layer)
        else:
            self.mlp = GatedMLP(d, spec.dense_intermediate_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """`x` `[B, T, D]` -> `[B, T, D]`."""
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, decoder layers and final norm (transformers' `model.` prefix)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


def attention_mask_for(key_valid: torch.Tensor, num_past: int, num_new: int,
                       sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask `[B, 1, T, S]`: causal by slot, padding keys hidden, optional window.

    Args:
        key_valid: `[B, S]` whether each key slot holds a real token.
        num_past: Slots already cached; the T queries sit at slots `num_past + t`.
        num_new: T.
        sliding_window: Keys more than this many slots back are hidden, if set.
        dtype: The activation dtype (the mask uses its most negative finite value).
    """
    device = key_valid.device
    q_slot = torch.arange(num_past, num_past + num_new, device=device)[:, None]  # [T, 1]
    k_slot = torch.arange(key_valid.shape[1], device=device)[None, :]  # [1, S]
    allowed = k_slot <= q_slot  # [T, S]
    if sliding_window is not None:
        allowed = allowed & (q_slot - k_slot < sliding_window)
    allowed = allowed[None] & key_valid[:, None, :]  # [B, T, S]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]  # [B, 1, T, S]


def _attention_backends(device: torch.device) -> AbstractContextManager[object]:
    """SDPA without the cuDNN backend on CUDA.

    cuDNN builds an execution plan per key length, and decoding meets a new key length every
    step: on the H200 that cost 1.3 ms of CPU per layer per token (60 ms per token for
    Qwen3-30B-A3B), against 60 us for the memory-efficient kernel, which takes the same additive
    mask.
    """
    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


class MoEForCausalLM(nn.Module):
    """A MoE decoder-only language model.

    Call it like a transformers model without cache: `model(input_ids)` gives logits `[B, T, V]`.
    Pass a `KVCache` to decode incrementally; use `generate` for whole generations.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = Decoder(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(spec.rope)
        self.tie_weights()
        self.generation_defaults: dict[str, object] = {}
        self.source: Path | None = None  # the checkpoint folder, once loaded

    def tie_weights(self) -> None:
        """Share the input embedding with the LM head where the config ties them."""
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        """Where the embedding lives (and so where inputs should be)."""
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype."""
        return self.model.embed_tokens.weight.dtype

    def moe_blocks(self) -> list[MoEBlock]:
        """The MoE blocks, in layer order."""
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoEBlock)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits for `input_ids` `[B, T]`.

        Args:
            input_ids: Token ids `[B, T]`.
            attention_mask: `[B, T]`, 1 for real tokens and 0 for padding (left or right); the
                cache remembers earlier passes' padding.
            position_ids: `[B, T]`; by default each row counts its own real tokens, continuing
                from the cache (so padding does not shift positions).
            cache: Incremental-decoding cache; the T tokens are appended to it.
            last_only: Compute logits for the last position only (`[B, 1, V]`).

        Returns:
            Logits `[B, T, V]` (or `[B, 1, V]`) in the model dtype.
        """
        b, t = input_ids.shape
        new_valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                     else attention_mask.to(torch.bool))
        if position_ids is None:
            start = cache.next_position if cache is not None else torch.zeros(
                b, dtype=torch.long, device=input_ids.device)
            position_ids = start[:, None] + (new_valid.long().cumsum(dim=1) - 1).clamp(min=0)
        h = self.model.embed_tokens(input_ids)  # [B, T, D]
        key_valid = cache.key_valid(new_valid) if cache is not None else new_valid  # [B, S]
        num_past = cache.num_slots if cache is not None else 0
        mask = attention_mask_for(key_valid, num_past, t, None, h.dtype)
        window_mask = mask
        if self.spec.sliding_layers:
            window_mask = attention_mask_for(key_valid, num_past, t,
                                             self.spec.attention.sliding_window, h.dtype)
        rope = self.rotary(position_ids, h.dtype)
        with _attention_backends(h.device):
            for i, layer in enumerate(self.model.layers):
                h = layer(h, rope, window_mask if i in self.spec.sliding_layers else mask, cache)
        if cache is not None:
            cache.commit(new_valid)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.model.norm(h))

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty `KVCache` on the model's device."""
        return KVCache(batch_size, capacity, self.device)

    def generate(self, input_ids: torch.Tensor | list[list[int]], **kwargs: object) -> torch.Tensor:
        """New token ids `[B, N]`; see `moe_core.generation.generate` for the arguments."""
        return self.generate_full(input_ids, **kwargs).tokens

    def generate_full(self, input_ids: torch.Tensor | list[list[int]],
                      **kwargs: object) -> GenerationResult:
        """Like `generate`, but also returns each row's length and finish reason."""
        from moe_core.generation import generate

        return generate(self, input_ids, **kwargs)  # type: ignore[arg-type]
