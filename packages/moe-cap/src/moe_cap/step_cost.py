"""Bytes and FLOPs of one forward step of a MoE decoder, counted from its `ModelSpec`.

A step runs a batch of sequences; sequence `i` has `p_i` tokens in its KV cache and brings `n_i`
new ones (prefill: `p = 0, n = prompt`; decode: `p = context, n = 1`; chunked prefill: anything).
Letter key: `N = sum n_i` new tokens, `S` sequences, `D` hidden, `V` vocabulary, `E` routed
experts, `k` top-k, `F` expert width, `H` query heads.

FLOPs are those of the matrix products, 2 per multiply-add; norms, activations, softmax, rotary and
top-k selection are left out (under 1% here). Per token: every projection of attention, the dense
MLP of dense layers, the shared experts and the router of MoE layers, and `k` routed experts
(`2 * 3 * D * F` each). Attention scores are counted per (query, key) pair actually scored: a
chunk scores `n * p + n * (n + 1) / 2` pairs (causal: the queries see the cache, each earlier new
token and themselves), so prefill is averaged exactly over the triangle rather than charged
`n^2` or `n^2 / 2`. A pair costs `H * (head_dim + v_head_dim)` multiply-adds (scores, then the
weighted sum of values). MLA (DeepSeek) is charged the cheaper of its two standard forms per chunk:
re-expanding the cached latent through `kv_b_proj` (cheap for prefill) or absorbing `kv_b_proj`
into the query and output (`H * (2 * kv_lora_rank + rope_dim)` per pair, cheap for decode); the
per-token projections are the same in both. The LM head runs once per sequence per step (only
the last position's logits are needed).

Bytes are what must cross the GPU's memory bus: every non-expert weight once per step (the
embedding only for the rows gathered), each distinct routed expert the step uses once (expected
under uniform routing, or measured), the KV cache of the cached tokens each sequence attends (at
the cache's dtype; for MLA the compressed latent), and the KV entries the new tokens write.
Activations are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moe_core import ModelSpec

from moe_cap.activated_experts import ActivatedExperts, activated_experts
from moe_cap.precision import bits_per_element, parse_precision, storage_bytes

__all__ = ["Chunk", "StepCost", "decode_batch", "prefill_batch", "step_cost"]


@dataclass(frozen=True)
class Chunk:
    """One sequence's share of a step.

    Attributes:
        past_tokens: Tokens already in this sequence's KV cache.
        new_tokens: Tokens this step runs for it.
    """

    past_tokens: int
    new_tokens: int

    def __post_init__(self) -> None:
        if self.past_tokens < 0:
            raise ValueError(f"Chunk.past_tokens must be non-negative, got {self.past_tokens}")
        if self.new_tokens <= 0:
            raise ValueError(f"Chunk.new_tokens must be positive, got {self.new_tokens}")


def decode_batch(batch: int, context: int) -> tuple[Chunk, ...]:
    """`batch` sequences decoding one token each with `context` tokens already cached."""
    return (Chunk(context, 1),) * batch


def prefill_batch(batch: int, prompt: int) -> tuple[Chunk, ...]:
    """`batch` sequences prefilling a `prompt`-token prompt each from an empty cache."""
    return (Chunk(0, prompt),) * batch


@dataclass(frozen=True)
class StepCost:
    """FLOPs and bytes of one step, by part.

    Attributes:
        num_tokens: New tokens the step runs (`N`).
        num_sequences: Sequences in the step (`S`).
        attention_projection_flops: q/k/v/o projections (MLA: all its projections).
        attention_score_flops: Query-key scores and the weighted sum of values.
        dense_mlp_flops: MLPs of the dense (non-MoE) layers.
        shared_expert_flops: Shared experts of the MoE layers.
        router_flops: Router projections of the MoE layers.
        routed_expert_flops: The `k` routed experts of every token.
        lm_head_flops: Output projection, one position per sequence.
        dense_weight_bytes: Every weight but the routed experts, read once (embedding: the rows
            gathered).
        routed_expert_bytes: Weights of the distinct routed experts the step reads.
        kv_read_bytes: KV cache read for the cached tokens the sequences attend.
        kv_write_bytes: KV cache written for the new tokens.
        experts: Distinct routed experts per MoE layer, expected and measured.
    """

    num_tokens: int
    num_sequences: int
    attention_projection_flops: int
    attention_score_flops: int
    dense_mlp_flops: int
    shared_expert_flops: int
    router_flops: int
    routed_expert_flops: int
    lm_head_flops: int
    dense_weight_bytes: int
    routed_expert_bytes: float
    kv_read_bytes: int
    kv_write_bytes: int
    experts: ActivatedExperts

    @property
    def flops(self) -> int:
        """All matrix-product FLOPs of the step."""
        return (self.attention_projection_flops + self.attention_score_flops
                + self.dense_mlp_flops + self.shared_expert_flops + self.router_flops
                + self.routed_expert_flops + self.lm_head_flops)

    @property
    def weight_bytes(self) -> float:
        """Weight bytes the step reads (dense part and activated experts)."""
        return self.dense_weight_bytes + self.routed_expert_bytes

    @property
    def bytes(self) -> float:
        """All bytes the step moves through GPU memory: weights, KV reads and KV writes."""
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes

    def to_dict(self) -> dict[str, float | int | list[float] | list[int] | None]:
        """A JSON-ready dict of every field and total."""
        return {
            "num_tokens": self.num_tokens,
            "num_sequences": self.num_sequences,
            "flops": self.flops,
            "attention_projection_flops": self.attention_projection_flops,
            "attention_score_flops": self.attention_score_flops,
            "dense_mlp_flops": self.dense_mlp_flops,
            "shared_expert_flops": self.shared_expert_flops,
            "router_flops": self.router_flops,
            "routed_expert_flops": self.routed_expert_flops,
            "lm_head_flops": self.lm_head_flops,
            "bytes": self.bytes,
            "dense_weight_bytes": self.dense_weight_bytes,
            "routed_expert_bytes": self.routed_expert_bytes,
            "kv_read_bytes": self.kv_read_bytes,
            "kv_write_bytes": self.kv_write_bytes,
            "experts_expected_per_layer": self.experts.mean_expected,
            "experts_measured_per_layer": self.experts.mean_measured,
            "shared_experts_per_layer": self.experts.num_shared,
        }


def _pairs(past: int, new: int, window: int | None) -> int:
    """(query, key) pairs `new` causal queries after `past` cached tokens score: query at
    position `q` sees `q + 1` keys, or `min(q + 1, window)` in a sliding-window layer."""
    lo, hi = past + 1, past + new  # keys seen by the first and the last new query
    if window is None or hi <= window:
        return (lo + hi) * new // 2
    if lo > window:
        return new * window
    return (lo + window) * (window - lo + 1) // 2 + (hi - window) * window


def _cached_read(past: int, window: int | None) -> int:
    """Cached tokens a chunk's queries attend (read from the KV cache once per chunk)."""
    return past if window is None else min(past, window - 1)


def _projection_macs(spec: ModelSpec) -> int:
    """Multiply-adds of one token through one layer's attention projections."""
    a, d = spec.attention, spec.hidden_size
    if a.kind == "gqa":
        q, k, v = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, \
            a.num_kv_heads * a.v_head_dim
        return d * (q + k + v) + a.num_heads * a.v_head_dim * d
    rank, rope, nope = a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim
    assert rank is not None and rope is not None and nope is not None
    q_out = a.num_heads * a.head_dim
    q = d * q_out if a.q_lora_rank is None else d * a.q_lora_rank + a.q_lora_rank * q_out
    # kv_a (latent and rope key), kv_b (or, absorbed, the same weights on q and output), o_proj
    return q + d * (rank + rope) + rank * a.num_heads * (nope + a.v_head_dim) \
        + a.num_heads * a.v_head_dim * d


def _score_macs(spec: ModelSpec, chunk: Chunk, window: int | None) -> int:
    """Multiply-adds of one chunk's attention core in one layer."""
    a = spec.attention
    pairs = _pairs(chunk.past_tokens, chunk.new_tokens, window)
    expanded = pairs * a.num_heads * (a.head_dim + a.v_head_dim)
    if a.kind == "gqa":
        return expanded
    rank, rope, nope = a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim
    assert rank is not None and rope is not None and nope is not None
    # Naive MLA re-expands every cached latent through kv_b_proj; absorbed MLA scores in the
    # latent space. DeepSeek's inference runs the naive form for prefill and the absorbed one for
    # decode, which is the cheaper of the two in each phase: charge the cheaper.
    reexpand = _cached_read(chunk.past_tokens, window) * rank * a.num_heads * (nope + a.v_head_dim)
    absorbed = pairs * a.num_heads * (2 * rank + rope)
    return min(expanded + reexpand, absorbed)


def _windows(spec: ModelSpec) -> list[tuple[int | None, int]]:
    """`(window, number of layers)` for the full-attention and the sliding-window layers."""
    sliding = len(spec.sliding_layers)
    groups: list[tuple[int | None, int]] = [(None, spec.num_layers - sliding)]
    if sliding:
        groups.append((spec.attention.sliding_window, sliding))
    return [(w, n) for w, n in groups if n]


def step_cost(spec: ModelSpec, chunks: Sequence[Chunk], *, weight_dtype: str = "bf16",
              kv_dtype: str = "bf16", expert_dtype: str | None = None,
              measured_experts: Sequence[int] | None = None) -> StepCost:
    """FLOPs and bytes of one step of `spec` over `chunks` (see the module docstring).

    Args:
        spec: The model.
        chunks: One `Chunk` per sequence in the step.
        weight_dtype: Storage format of the weights (`bf16`, `fp8`, `int4`, ...).
        kv_dtype: Storage format of the KV cache.
        expert_dtype: Storage format of the routed experts, if it differs from `weight_dtype`.
        measured_experts: Distinct routed experts the step used per MoE layer; without it the
            uniform-routing expectation is charged.

    Raises:
        ValueError: no chunks, an unknown format, or bad measured counts.
    """
    if not chunks:
        raise ValueError("a step needs at least one sequence")
    weight_dtype, kv_dtype = parse_precision(weight_dtype), parse_precision(kv_dtype)
    expert_dtype = parse_precision(expert_dtype or weight_dtype)
    d, moe = spec.hidden_size, spec.moe
    n_tok, n_seq = sum(c.new_tokens for c in chunks), len(chunks)
    n_moe, n_dense = spec.num_moe_layers, len(spec.dense_layers)
    experts = activated_experts(spec, n_tok, measured_experts)

    score_macs = kv_read_tokens = 0
    for window, layers in _windows(spec):
        score_macs += layers * sum(_score_macs(spec, c, window) for c in chunks)
        kv_read_tokens += layers * sum(_cached_read(c.past_tokens, window) for c in chunks)
    kv_elements = spec.attention.kv_elements_per_token()  # per token per layer

    # Embedding rows gathered instead of the whole table; a tied table is read whole by the head.
    embed = spec.vocab_size * d
    gathered = embed if spec.tie_word_embeddings else min(n_tok, spec.vocab_size) * d
    return StepCost(
        num_tokens=n_tok,
        num_sequences=n_seq,
        attention_projection_flops=2 * n_tok * spec.num_layers * _projection_macs(spec),
        attention_score_flops=2 * score_macs,
        dense_mlp_flops=2 * n_tok * n_dense * 3 * d * spec.dense_intermediate_size,
        shared_expert_flops=2 * n_tok * n_moe * 3 * d * moe.shared_intermediate_size,
        router_flops=2 * n_tok * n_moe * d * moe.num_experts,
        routed_expert_flops=2 * n_tok * n_moe * moe.router.top_k * spec.expert_params,
        lm_head_flops=2 * n_seq * d * spec.vocab_size,
        dense_weight_bytes=storage_bytes(spec.dense_params - embed + gathered, weight_dtype),
        routed_expert_bytes=sum(experts.per_layer) * spec.expert_params
        * bits_per_element(expert_dtype) / 8,
        kv_read_bytes=storage_bytes(kv_read_tokens * kv_elements, kv_dtype),
        kv_write_bytes=storage_bytes(n_tok * spec.num_layers * kv_elements, kv_dtype),
        experts=experts,
    )
