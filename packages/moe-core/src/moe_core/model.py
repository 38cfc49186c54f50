"""`MoEForCausalLM`: one decoder for every supported architecture, configured by its `ModelSpec`.

Dimension key: B batch, T new tokens, S keys (cached + new), D hidden, V vocabulary.

Module names follow the common Hugging Face layout (`model.layers.3.self_attn.q_proj`), so the
loader maps checkpoint names with a few per-family renames (see `architectures`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from moe_core.attention_inputs import AttentionInputs, slot_mask
from moe_core.kv_cache import KVCache
from moe_core.kv_store import KVStore, SequenceKV
from moe_core.layers.attention import GQAAttention
from moe_core.layers.mla import MLAAttention
from moe_core.layers.mlp import GatedMLP
from moe_core.layers.norm import RMSNorm
from moe_core.layers.rotary import RotaryEmbedding
from moe_core.moe_block import MoEBlock
from moe_core.spec import ModelSpec

if TYPE_CHECKING:
    from moe_core.decode_runner import DecodeRunner
    from moe_core.generation import GenerationResult

_RUNNER_SLOT_ROUNDING = 256  # runners are sized in steps of this many slots, to be reused

__all__ = ["AttentionBranch", "DecoderLayer", "MixObserver", "MoEForCausalLM", "attention_mask_for"]


MixObserver = Callable[[int, torch.Tensor, torch.Tensor], None]
"""Called as `observer(layer, h, x)` when a layer's MLP half starts: `h` `[..., D]` is the
residual stream after attention, `x` the normalised input the MLP or MoE block receives."""


class AttentionBranch(nn.Module):
    """A layer's attention half, norm included: `attention(norm(h))`, the residual delta."""

    def __init__(self, norm: RMSNorm, attention: MLAAttention | GQAAttention,
                 sliding: bool) -> None:
        super().__init__()
        self.norm = norm
        self.attention = attention
        self.sliding = sliding

    def forward(self, h: torch.Tensor, inputs: AttentionInputs, kv: KVStore | None
                ) -> torch.Tensor:
        """`h` `[B, T, D]` -> the attention output `[B, T, D]` (not yet added to `h`)."""
        return self.attention(self.norm(h), inputs.rope, inputs.mask_for(self.sliding), kv)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then a dense MLP or a MoE block.

    Engines drive it through its two halves, each returning the delta the caller adds to the
    residual stream: `attend` and `mix`. `forward` is exactly `h + attend`, then `+ mix`.

    Attributes:
        index: Decoder-layer index.
        sliding: Whether this layer's attention uses the sliding window.
        mix_observer: Called at the start of every `mix` (see `MixObserver`); None: nothing.
    """

    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        d = spec.hidden_size
        self.index = layer
        self.sliding = layer in spec.sliding_layers
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
        self.mix_observer: MixObserver | None = None

    @property
    def moe(self) -> MoEBlock | None:
        """The layer's MoE block, or None for a dense layer."""
        return self.mlp if isinstance(self.mlp, MoEBlock) else None

    def attend(self, h: torch.Tensor, inputs: AttentionInputs, kv: KVStore | None
               ) -> torch.Tensor:
        """The attention half on `h` `[B, T, D]`: `attention(norm(h))` `[B, T, D]`, new keys and
        values stored in `kv`."""
        return self._attention(self.input_layernorm(h), inputs, kv)

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP half on `h` `[..., D]` (any leading shape): `mlp(norm(h))`."""
        return self._mlp(h, self.post_attention_layernorm(h))

    def attend_residual(self, h: torch.Tensor, delta: torch.Tensor | None,
                        inputs: AttentionInputs, kv: KVStore | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """`attend` after adding the previous half's pending `delta` to `h`, the add fused with
        this half's norm: `(h + delta, attention output)`."""
        if delta is None:
            return h, self.attend(h, inputs, kv)
        h, x = self.input_layernorm.add_forward(h, delta)
        return h, self._attention(x, inputs, kv)

    def mix_residual(self, h: torch.Tensor, delta: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """`mix` after adding the attention output `delta` to `h`, the add fused with the norm:
        `(h + delta, MLP output)`."""
        h, x = self.post_attention_layernorm.add_forward(h, delta)
        return h, self._mlp(h, x)

    def router_logits(self, h: torch.Tensor, *, normalised: bool = False) -> torch.Tensor:
        """This layer's router logits `[N, E]` for hidden states `h` `[..., D]`: the residual
        stream (normalised here with this layer's own norm first) or, with `normalised`, an
        input already normalised. Used to predict a later layer's experts from an earlier
        layer's state.

        Raises:
            ValueError: the layer is dense.
        """
        block = self.moe
        if block is None:
            raise ValueError(f"layer {self.index} is dense: it has no router")
        x = h if normalised else self.post_attention_layernorm(h)
        return block.gate.logits(x.reshape(-1, x.shape[-1]))

    def _attention(self, x: torch.Tensor, inputs: AttentionInputs, kv: KVStore | None
                   ) -> torch.Tensor:
        """Attention of the normalised input `x`."""
        return self.self_attn(x, inputs.rope, inputs.mask_for(self.sliding), kv)

    def _mlp(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The MLP or MoE block on the normalised input `x` of residual `h` (observer first)."""
        if self.mix_observer is not None:
            self.mix_observer(self.index, h, x)
        return self.mlp(x)

    def attention_on(self, device: torch.device | str) -> AttentionBranch:
        """A copy of this layer's attention half (norm included) on `device`: for engines that
        attend part of a batch elsewhere (moe-gen's host attention)."""
        branch = AttentionBranch(self.input_layernorm, self.self_attn, self.sliding)
        return copy.deepcopy(branch).to(device)

    def forward(self, h: torch.Tensor, inputs: AttentionInputs, kv: KVStore | None
                ) -> torch.Tensor:
        """`h` `[B, T, D]` -> `[B, T, D]`."""
        h = h + self.attend(h, inputs, kv)
        return h + self.mix(h)


class Decoder(nn.Module):
    """Embedding, decoder layers and final norm (transformers' `model.` prefix)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        # Built uninitialised (as every other weight here): the loader fills it. Embedding's
        # own normal_ init, run on the meta device, imported torch._dynamo: ~10 s per process.
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size,
                                         _weight=torch.empty(spec.vocab_size, spec.hidden_size))
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
    slots = torch.arange(num_past, num_past + num_new, device=key_valid.device)
    return slot_mask(key_valid, slots, sliding_window, dtype)


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
        self._runner: DecodeRunner | None = None

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
        return [block for layer in self.layers if (block := layer.moe) is not None]

    # The step interface: what engines drive instead of walking the module tree ----------------

    @property
    def layers(self) -> Sequence[DecoderLayer]:
        """The decoder layers in order; each has `attend` and `mix`."""
        return tuple(self.model.layers)  # type: ignore[arg-type]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings `[..., D]` of `input_ids` `[...]`."""
        return self.model.embed_tokens(input_ids)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables `(cos, sin)`, each `[B, T, R]`, for integer `positions` `[B, T]`."""
        return self.rotary(positions, dtype)

    def attention_inputs(self, positions: torch.Tensor, key_valid: torch.Tensor,
                         query_slots: torch.Tensor, dtype: torch.dtype) -> AttentionInputs:
        """Rotary tables and masks of a pass whose T queries sit at `query_slots` `[T]` of a
        slot axis whose keys `[B, S]` hold real tokens where `key_valid`, at `positions`
        `[B, T]`."""
        mask = slot_mask(key_valid, query_slots, None, dtype)
        window = None
        if self.spec.sliding_layers:
            window = slot_mask(key_valid, query_slots, self.spec.attention.sliding_window, dtype)
        return AttentionInputs(self.rope(positions, dtype), mask, window)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits `[..., V]` of final hidden states `h` `[..., D]` (final norm, then LM head)."""
        return self.lm_head(self.model.norm(h))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: SequenceKV | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits for `input_ids` `[B, T]`.

        Args:
            input_ids: Token ids `[B, T]`.
            attention_mask: `[B, T]`, 1 for real tokens and 0 for padding (left or right); the
                cache remembers earlier passes' padding.
            position_ids: `[B, T]`; by default each row counts its own real tokens, continuing
                from the cache (so padding does not shift positions).
            cache: Incremental-decoding cache (`KVCache`, or `StaticKVCache` for captured
                decoding); the T tokens are appended to it.
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
        h = self.embed(input_ids)  # [B, T, D]
        if cache is not None:
            key_valid, query_slots = cache.begin(new_valid)  # [B, S], [T]
        else:
            key_valid, query_slots = new_valid, torch.arange(t, device=input_ids.device)
        inputs = self.attention_inputs(position_ids, key_valid, query_slots, h.dtype)
        with _attention_backends(h.device):
            if h.is_cuda:  # each residual add fused with the norm after it (decode: launches)
                pending: torch.Tensor | None = None
                for layer in self.layers:
                    h, attended = layer.attend_residual(h, pending, inputs, cache)
                    h, pending = layer.mix_residual(h, attended)
                assert pending is not None
                h = h + pending
            else:
                for layer in self.layers:
                    h = h + layer.attend(h, inputs, cache)
                    h = h + layer.mix(h)
        if cache is not None:
            cache.commit(new_valid)
        if last_only:
            h = h[:, -1:]
        return self.logits(h)

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty `KVCache` on the model's device."""
        return KVCache(batch_size, capacity, self.device)

    def decode_runner(self, batch_size: int, slots: int) -> DecodeRunner:
        """The model's `DecodeRunner` (graph-captured decode on CUDA), built or grown to hold
        `batch_size` rows of `slots` slots; kept for the next generation (its captured graphs
        and static cache are reused while they fit)."""
        from moe_core.decode_runner import DecodeRunner

        runner = self._runner
        if runner is None or not runner.fits(batch_size, slots):
            self._runner = None  # free the old cache and graphs before the new ones
            rows = max(batch_size, runner.max_rows if runner is not None else 0)
            capacity = max(slots, runner.capacity if runner is not None else 0)
            capacity = -(-capacity // _RUNNER_SLOT_ROUNDING) * _RUNNER_SLOT_ROUNDING
            runner = self._runner = DecodeRunner(self, rows, capacity)
        return runner

    def release_decode_runner(self) -> None:
        """Free the decode runner's static cache and captured graphs (device memory)."""
        self._runner = None

    def generate(self, input_ids: torch.Tensor | list[list[int]], **kwargs: object) -> torch.Tensor:
        """New token ids `[B, N]`; see `moe_core.generation.generate` for the arguments."""
        return self.generate_full(input_ids, **kwargs).tokens

    def generate_full(self, input_ids: torch.Tensor | list[list[int]],
                      **kwargs: object) -> GenerationResult:
        """Like `generate`, but also returns each row's length and finish reason."""
        from moe_core.generation import generate

        return generate(self, input_ids, **kwargs)  # type: ignore[arg-type]
