"""`ModelSpec`: everything the tools need to plan a run, read from `config.json` alone.

Sizes are counted in parameters (elements) and converted to bytes for a storage dtype, so a
planner can ask "how many bytes is one routed expert in bf16?" before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from moe_core.dtypes import dtype_bytes
from moe_core.errors import SettingError
from moe_core.hf_config import HFConfig
from moe_core.model_path import resolve_model_path

__all__ = ["AttentionSpec", "MoESpec", "ModelSpec", "RopeSpec", "RouterSpec"]


def _positive(owner: str, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"{owner}.{name} must be positive, got {value}")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding settings.

    Attributes:
        theta: Base of the inverse frequencies.
        rotary_dim: How many channels of each head are rotated.
        interleaved: Pairs are adjacent channels (DeepSeek's layout) rather than the two halves.
        scaling: `"default"` (none), `"linear"` or `"yarn"`.
        factor: Context extension factor (linear and yarn).
        original_max_position_embeddings: Pre-extension context length (yarn).
        beta_fast: Yarn high-frequency boundary, in rotations.
        beta_slow: Yarn low-frequency boundary, in rotations.
        mscale: Yarn attention-scale coefficient (DeepSeek's `mscale`).
        mscale_all_dim: Yarn coefficient applied to the softmax scale (DeepSeek's `mscale_all_dim`).
        attention_factor: Explicit yarn factor on cos/sin (else derived from the mscales).
        truncate: Round yarn's correction range to whole channels.
    """

    theta: float
    rotary_dim: int
    interleaved: bool = False
    scaling: Literal["default", "linear", "yarn"] = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        _positive("RopeSpec", theta=self.theta, rotary_dim=self.rotary_dim, factor=self.factor)
        if self.rotary_dim % 2:
            raise ValueError(f"RopeSpec.rotary_dim must be even, got {self.rotary_dim}")


@dataclass(frozen=True)
class AttentionSpec:
    """Self-attention shape: grouped-query (`gqa`) or DeepSeek's multi-head latent (`mla`).

    Attributes:
        kind: `"gqa"` or `"mla"`.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (MLA: equal to `num_heads` once expanded).
        head_dim: Query/key channels per head (MLA: `qk_nope_head_dim + qk_rope_head_dim`).
        v_head_dim: Value channels per head (equals `head_dim` for GQA).
        qkv_bias: The q/k/v projections have a bias.
        o_bias: The output projection has a bias.
        qk_norm: RMSNorm on queries and keys: `"none"`, `"per_head"` (Qwen3, over `head_dim`) or
            `"full"` (OLMoE, over all heads at once).
        clip_qkv: Clamp q, k, v to `[-clip_qkv, clip_qkv]` after projection (OLMoE).
        sliding_window: Attend only to the last `sliding_window` positions (the query's own
            included), in the layers `ModelSpec.sliding_layers` lists.
        q_lora_rank: MLA query compression rank (`None`: a plain `q_proj`).
        kv_lora_rank: MLA key/value latent size.
        qk_nope_head_dim: MLA channels per head without rotary.
        qk_rope_head_dim: MLA rotary channels, shared by all heads for keys.
    """

    kind: Literal["gqa", "mla"]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: Literal["none", "per_head", "full"] = "none"
    clip_qkv: float | None = None
    sliding_window: int | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None

    def __post_init__(self) -> None:
        _positive("AttentionSpec", num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                  head_dim=self.head_dim, v_head_dim=self.v_head_dim,
                  sliding_window=self.sliding_window, q_lora_rank=self.q_lora_rank)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"AttentionSpec.num_kv_heads ({self.num_kv_heads}) must divide "
                             f"num_heads ({self.num_heads})")
        if self.kind == "mla":
            if None in (self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim):
                raise ValueError("AttentionSpec: MLA needs kv_lora_rank, qk_nope_head_dim, "
                                 "qk_rope_head_dim")
            if self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:  # type: ignore[operator]
                raise ValueError("AttentionSpec.head_dim must be "
                                 "qk_nope_head_dim + qk_rope_head_dim")

    def num_params(self, hidden_size: int) -> int:
        """Weights of one attention layer (projections and norms)."""
        h, d = self.num_heads, hidden_size
        if self.kind == "gqa":
            q = h * self.head_dim
            kv = self.num_kv_heads * self.head_dim
            n = d * (q + 2 * kv) + q * d
            n += (q + 2 * kv) * self.qkv_bias + d * self.o_bias
            n += {"none": 0, "per_head": 2 * self.head_dim, "full": q + kv}[self.qk_norm]
            return n
        rank, rope, nope = self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim
        assert rank is not None and rope is not None and nope is not None
        q_out = h * self.head_dim
        if self.q_lora_rank is None:
            n = d * q_out
        else:
            n = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * q_out
        n += d * (rank + rope) + rank  # kv_a_proj_with_mqa and its norm
        n += rank * h * (nope + self.v_head_dim)  # kv_b_proj
        n += h * self.v_head_dim * d  # o_proj
        return n

    def kv_elements_per_token(self) -> int:
        """Cache elements one token adds in one layer (MLA: the compressed latent and rope key)."""
        if self.kind == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim  # type: ignore[operator]
        return 2 * self.num_kv_heads * self.head_dim

    def kv_token_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-token shapes of the tensors one layer caches: GQA keys and values
        `(H_kv, d)` each; MLA the latent `(kv_lora_rank,)` and the rotary key
        `(qk_rope_head_dim,)`."""
        if self.kind == "mla":
            assert self.kv_lora_rank is not None and self.qk_rope_head_dim is not None
            return (self.kv_lora_rank,), (self.qk_rope_head_dim,)
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)


@dataclass(frozen=True)
class RouterSpec:
    """How a MoE layer picks its experts and weighs them.

    Attributes:
        method: `"softmax_topk"` (Mixtral, Qwen, OLMoE, DeepSeek-V2 `greedy`),
            `"group_limited_greedy"` (DeepSeek-V2) or `"noaux_tc"` (DeepSeek-V3).
        top_k: Experts per token.
        normalize: Rescale the chosen weights to sum to one.
        scaling_factor: Multiplier on the routed weights (DeepSeek's `routed_scaling_factor`).
        num_groups: Expert groups for group-limited routing.
        topk_groups: Groups a token may draw from.
        fp32_gate: The router's weight and logits stay in float32 whatever the model dtype
            (DeepSeek).
    """

    method: Literal["softmax_topk", "group_limited_greedy", "noaux_tc"]
    top_k: int
    normalize: bool
    scaling_factor: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    fp32_gate: bool = False

    def __post_init__(self) -> None:
        _positive("RouterSpec", top_k=self.top_k, scaling_factor=self.scaling_factor,
                  num_groups=self.num_groups, topk_groups=self.topk_groups)
        if self.topk_groups > self.num_groups:
            raise ValueError(f"RouterSpec.topk_groups ({self.topk_groups}) exceeds num_groups "
                             f"({self.num_groups})")


@dataclass(frozen=True)
class MoESpec:
    """The MoE block of every MoE layer.

    Attributes:
        num_experts: Routed experts per MoE layer.
        expert_intermediate_size: Hidden width of one routed expert.
        router: Routing rule.
        shared_intermediate_size: Width of the shared-expert MLP (0: none). DeepSeek's
            `n_shared_experts` experts are one MLP of `n_shared_experts * moe_intermediate_size`.
        num_shared_experts: How many experts the shared MLP stands for (for reporting).
        shared_gate: The shared MLP's output is scaled by a sigmoid gate (Qwen2-MoE).
        score_bias: The router has DeepSeek-V3's `e_score_correction_bias`.
        shared_bias: The shared MLP's projections have biases (DeepSeek-V2 `mlp_bias`).
    """

    num_experts: int
    expert_intermediate_size: int
    router: RouterSpec
    shared_intermediate_size: int = 0
    num_shared_experts: int = 0
    shared_gate: bool = False
    score_bias: bool = False
    shared_bias: bool = False

    def __post_init__(self) -> None:
        _positive("MoESpec", num_experts=self.num_experts,
                  expert_intermediate_size=self.expert_intermediate_size)
        if self.router.top_k > self.num_experts:
            raise ValueError(f"MoESpec: top_k ({self.router.top_k}) exceeds num_experts "
                             f"({self.num_experts})")
        router = self.router
        if self.num_experts % router.num_groups:
            raise ValueError(f"MoESpec: num_groups ({router.num_groups}) must divide "
                             f"num_experts ({self.num_experts})")
        per_group = self.num_experts // router.num_groups
        if router.num_groups > 1 and router.top_k > router.topk_groups * per_group:
            raise ValueError(f"MoESpec: top_k ({router.top_k}) exceeds the experts of the "
                             f"{router.topk_groups} groups a token may use ({per_group} each)")
        if router.method == "noaux_tc" and router.num_groups > 1 and per_group < 2:
            raise ValueError("MoESpec: noaux_tc scores a group by its two best experts, so "
                             f"each group needs at least 2 (got {per_group})")


@dataclass(frozen=True)
class ModelSpec:
    """A MoE decoder's shape and sizes, from its `config.json`.

    Build one with `ModelSpec.from_pretrained(path)`; architecture-specific parsing lives in
    `moe_core.architectures`.

    Attributes:
        architecture: The Hugging Face class name (`"MixtralForCausalLM"`).
        model_type: The `model_type` field (`"mixtral"`).
        vocab_size: Vocabulary size.
        hidden_size: Residual stream width.
        num_layers: Decoder layers.
        moe_layers: Indices of the layers whose MLP is a MoE block; the rest are dense.
        dense_intermediate_size: Width of the dense MLP of non-MoE layers.
        attention: Attention shape.
        rope: Rotary settings.
        moe: MoE block shape.
        rms_norm_eps: Epsilon of every RMSNorm.
        tie_word_embeddings: The LM head reuses the input embedding.
        max_position_embeddings: Context length the model was built for.
        bos_token_id: Beginning-of-sequence token, if any.
        eos_token_ids: End-of-sequence tokens.
        pad_token_id: Padding token, if any.
        torch_dtype: The checkpoint's stored dtype name, if the config says.
        initializer_range: Std of random weights in dummy mode.
        mlp_bias: The dense MLPs' projections have biases (DeepSeek-V2 `mlp_bias`).
        sliding_layers: Layers whose attention is limited to `attention.sliding_window`.
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    moe_layers: tuple[int, ...]
    dense_intermediate_size: int
    attention: AttentionSpec
    rope: RopeSpec
    moe: MoESpec
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    initializer_range: float = 0.02
    mlp_bias: bool = False
    sliding_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _positive("ModelSpec", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                  num_layers=self.num_layers, rms_norm_eps=self.rms_norm_eps)
        bad = [i for i in self.moe_layers + self.sliding_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"ModelSpec: layer indices outside 0..{self.num_layers - 1}: {bad}")
        if self.sliding_layers and self.attention.sliding_window is None:
            raise ValueError("ModelSpec.sliding_layers needs attention.sliding_window")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelSpec:
        """Read the spec of a model from its `config.json` alone.

        Args:
            path: A checkpoint folder or a `config.json`, or any name `load_model` takes:
                `tiny-moe`, a shipped shape (`known_shapes()`) or a hub id (its small files
                are fetched when the machine is online).

        Raises:
            ConfigError: no such model, or `config.json` is missing, unreadable, or lacks a
                needed field.
            UnsupportedArchitectureError: the architecture is not implemented.
        """
        return cls.from_config(HFConfig.from_file(resolve_model_path(path, weights=False)))

    @classmethod
    def from_config(cls, config: HFConfig | dict[str, object]) -> ModelSpec:
        """Build the spec from an already parsed config (see `from_pretrained`)."""
        from moe_core.architectures import get_architecture

        if not isinstance(config, HFConfig):
            config = HFConfig(dict(config))
        return get_architecture(config.architecture()).spec_from_config(config)

    def truncated(self, num_layers: int) -> ModelSpec:
        """The same model with only its first `num_layers` decoder layers.

        Raises:
            SettingError: `num_layers` is not in 1..`self.num_layers` (a `ValueError`).
        """
        if not 1 <= num_layers <= self.num_layers:
            raise SettingError(f"num_layers must be in 1..{self.num_layers}, got {num_layers}")
        return replace(self, num_layers=num_layers,
                       moe_layers=tuple(i for i in self.moe_layers if i < num_layers),
                       sliding_layers=tuple(i for i in self.sliding_layers if i < num_layers))

    # Layers --------------------------------------------------------------------------------

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` has a MoE block (else a dense MLP)."""
        return layer in self.moe_layers

    @property
    def num_moe_layers(self) -> int:
        """How many layers have a MoE block."""
        return len(self.moe_layers)

    @property
    def dense_layers(self) -> tuple[int, ...]:
        """Indices of the layers with a dense MLP."""
        return tuple(i for i in range(self.num_layers) if i not in self.moe_layers)

    # Parameter counts ----------------------------------------------------------------------

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe.expert_intermediate_size

    @property
    def routed_expert_params(self) -> int:
        """Weights of every routed expert of the model."""
        return self.expert_params * self.moe.num_experts * self.num_moe_layers

    @property
    def moe_block_dense_params(self) -> int:
        """Weights of one MoE block outside its routed experts: router, shared MLP and gate."""
        d, moe = self.hidden_size, self.moe
        n = moe.num_experts * d + moe.num_experts * moe.score_bias
        n += 3 * d * moe.shared_intermediate_size + d * moe.shared_gate
        if moe.shared_bias and moe.shared_intermediate_size:
            n += 2 * moe.shared_intermediate_size + d
        return n

    @property
    def dense_params(self) -> int:
        """Every weight that is not a routed expert (the part that stays resident on the GPU)."""
        d = self.hidden_size
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        per_layer = self.attention.num_params(d) + 2 * d  # attention and the two norms
        n = embed + head + d + self.num_layers * per_layer
        dense_mlp = 3 * d * self.dense_intermediate_size
        dense_mlp += (2 * self.dense_intermediate_size + d) * self.mlp_bias
        n += len(self.dense_layers) * dense_mlp
        n += self.num_moe_layers * self.moe_block_dense_params
        return n

    @property
    def total_params(self) -> int:
        """Every weight of the model."""
        return self.dense_params + self.routed_expert_params

    @property
    def active_params_per_token(self) -> int:
        """Weights one token reads: everything dense, plus `top_k` routed experts per MoE layer."""
        return self.dense_params + self.num_moe_layers * self.moe.router.top_k * self.expert_params

    # Bytes ---------------------------------------------------------------------------------

    def expert_bytes(self, dtype: str | torch.dtype = "bfloat16") -> int:
        """Bytes of one routed expert stored in `dtype`."""
        return self.expert_params * dtype_bytes(dtype)

    def routed_expert_bytes(self, dtype: str | torch.dtype = "bfloat16") -> int:
        """Bytes of all routed experts stored in `dtype`."""
        return self.routed_expert_params * dtype_bytes(dtype)

    def dense_bytes(self, dtype: str | torch.dtype = "bfloat16") -> int:
        """Bytes of everything but the routed experts, stored in `dtype`."""
        return self.dense_params * dtype_bytes(dtype)

    def total_bytes(self, dtype: str | torch.dtype = "bfloat16") -> int:
        """Bytes of the whole model stored in `dtype`."""
        return self.total_params * dtype_bytes(dtype)

    def kv_bytes_per_token(self, dtype: str | torch.dtype = "bfloat16") -> int:
        """KV-cache bytes one token adds over all layers (MLA: the compressed latent)."""
        return self.num_layers * self.attention.kv_elements_per_token() * dtype_bytes(dtype)
