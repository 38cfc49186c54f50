"""The cost model: predicted decode step time and memory of a candidate plan.

A decode step of B sequences at context C runs layer by layer (the engine's order of work):
- attention: the device attends its micro-batches (projections, attention, launches) while the
  host attends its planned share s from its own pages; the layer's MoE starts when both are done
  (it reads the routing back to the host, one sync per layer);
- MoE: every non-resident expert the batch activates crosses PCIe once while the previous one
  computes; meanwhile the KV of the next layer's device micro-batches crosses the same link on
  the KV mover's own stream (`staged`: gathered on the host ahead of time, then copied at the
  link's copy rate; `mapped`: read from the host pages by the device itself, at its measured
  rate, no host gather), so the phase takes the longer of the link's work (experts + next
  layer's KV; a staged gather holds it for the host gather and the copy in turn, both through
  host memory) and the expert products.
- lookahead: when the batch uses most experts, the streaming ring is filled with the layer's
  experts during its attention, before its routing is known (moe-core's `ExpertRing`): up to R
  of them (`cover`, their copy time) cross the link then instead of after it.
- dispatch: the main thread issues all of that (Python and a framework call per operation) and
  waits for each layer's routing, so a layer also takes at least its host dispatch time: per
  attention micro-batch, per streamed expert, per run of experts, per MoE block, in multiples
  of the profiled launch latency (calibrated below).
The first layer's KV has nothing to hide behind. Summed over layers:

    step = KV_0 + sum_l max(dispatch_l,
                            max(attention_l, host_l)
                            + max(experts_l + KV_l+1 + gather_l+1 - min(attention_l, cover),
                                  matmuls_l))

The bound is what no schedule can beat with this memory split: the bytes that must cross PCIe
(streamed experts and the batch's KV) over the measured bandwidth, or the FLOPs over the measured
matmul rate, whichever is larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moe_core import FP8, FP8_WORKSPACE_BYTES, ExpertLayout, ModelSpec

from moe_gen.plan import HostMemory, Prediction
from moe_gen.profile import DeviceProfile

__all__ = ["HOST_LAUNCHES_PER_EXPERT", "HOST_LAUNCHES_PER_MICRO_BATCH",
           "HOST_LAUNCHES_PER_MOE_LAYER", "HOST_LAUNCHES_PER_RUN", "LOOKAHEAD_MIN_SHARE",
           "Candidate", "HostMemory", "ModelCosts", "gpu_bytes", "host_memory", "kv_lookahead",
           "predict", "run_length"]

# moe-core's streaming ring copies a layer's experts ahead of its routing when the previous layer
# used at least this share of its experts (`ExpertRing.lookahead_min_share`); the engine installs
# the ring with it.
LOOKAHEAD_MIN_SHARE = 0.5

# The main thread's dispatch work in units of `DeviceProfile.launch_s` (7.4 us on the H200),
# calibrated from torch-profiler traces of DeepSeek-V2-Lite decode steps there (2026-11-29, B 256,
# micro-batches of 32 vs 128): an attention micro-batch costs ~2.2 ms of host time per layer (the
# module's Python and ~60 operations), a streamed expert ~0.15 ms (its copy submission and its
# share of a grouped product), an MoE block ~1.8 ms (routing read, grouping, shared experts).
# Without this term the planner chose micro-batches of 16 (the device side predicts them free),
# and steps ran 1.3x slower than with 128.
#
# A run of experts computed by one grouped product (`run_length`) costs its own host work beside
# its experts' (offsets, the products, the activation, FP8's dequantisation: ~25 operations):
# on the H200 (2026-12-03, Qwen3-30B-A3B x 24 FP8, B 512) a plan with a ring of 2 computed 960
# runs a step, one or two experts each, and its step took ~0.26 s longer than the per-expert
# terms alone predicted; the per-expert term itself dropped from 20 to 10 once runs were counted
# apart. Without the run term every ring size predicted the same dispatch and the planner's tie
# rule took the smallest ring, whose runs are shortest.
HOST_LAUNCHES_PER_MICRO_BATCH = 200
HOST_LAUNCHES_PER_EXPERT = 10
HOST_LAUNCHES_PER_RUN = 25
HOST_LAUNCHES_PER_MOE_LAYER = 250

# Device operations one micro-batch's attention issues per layer (norm, projections, rotary,
# gathers, concatenations, mask, attention, write-back): each pays the launch latency.
_OPS_PER_MICRO_BATCH = 40


@dataclass(frozen=True)
class Candidate:
    """The free choices of a plan.

    Attributes:
        batch: B.
        micro_batch: Sequences per attention micro-batch.
        num_resident: Routed experts resident on the GPU.
        prefill_tokens: Prompt tokens admitted per step.
        cpu_share: Share of the decode batch attended on the host.
        ring: Streaming ring slots.
        kv_gather: `"staged"` or `"mapped"` (`Plan.kv_gather`).
    """

    batch: int
    micro_batch: int
    num_resident: int
    prefill_tokens: int
    cpu_share: float = 0.0
    ring: int = 2
    kv_gather: str = "staged"


@dataclass(frozen=True)
class ModelCosts:
    """Sizes of `spec` the model needs (bytes in the run dtype).

    Attributes:
        spec: The model.
        dtype_bytes: Bytes per element.
        fp8_experts: Routed experts stored (and streamed) as FP8 with their scales.
    """

    spec: ModelSpec
    dtype_bytes: int
    fp8_experts: bool = False

    @classmethod
    def of(cls, spec: ModelSpec, dtype: torch.dtype, fp8_experts: bool = False) -> ModelCosts:
        """Costs of `spec` stored as `dtype` (its routed experts as FP8 with `fp8_experts`)."""
        return cls(spec, torch.empty(0, dtype=dtype).element_size(), fp8_experts)

    @property
    def expert_bytes(self) -> int:
        """One routed expert (FP8: its e4m3 weights and float32 scales)."""
        moe = self.spec.moe
        if self.fp8_experts:
            return ExpertLayout(self.spec.hidden_size, moe.expert_intermediate_size, FP8).nbytes
        return 3 * self.spec.hidden_size * moe.expert_intermediate_size * self.dtype_bytes

    @property
    def expert_run_bytes(self) -> int:
        """One routed expert in the run dtype (as the loaded model holds it)."""
        moe = self.spec.moe
        return 3 * self.spec.hidden_size * moe.expert_intermediate_size * self.dtype_bytes

    @property
    def dequantize_workspace_bytes(self) -> int:
        """Device memory FP8 experts are dequantised into before their products (moe-core's
        streaming executor dequantises a run of up to `FP8_WORKSPACE_BYTES`, at least one
        expert); 0 for other experts."""
        if not self.fp8_experts:
            return 0
        wide = 3 * self.spec.hidden_size * self.spec.moe.expert_intermediate_size * 2
        return max(wide, min(FP8_WORKSPACE_BYTES, 8 * wide))

    @property
    def num_experts(self) -> int:
        """Routed experts of the whole model."""
        return self.spec.num_moe_layers * self.spec.moe.num_experts

    @property
    def dense_bytes(self) -> int:
        """Everything but the routed experts."""
        return self.spec.dense_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV of one token over every layer."""
        return self.spec.num_layers * self.spec.attention.kv_elements_per_token() * self.dtype_bytes

    def active_share(self, batch: int) -> float:
        """Expected share of a layer's experts a step of `batch` tokens uses (uniform routing)."""
        moe = self.spec.moe
        return 1.0 - (1.0 - moe.router.top_k / moe.num_experts) ** batch

    def resident_experts(self, num_resident: int) -> list[int]:
        """Resident experts per decoder layer: spread over the MoE layers round-robin
        (`spread_residents`)."""
        out = [0] * self.spec.num_layers
        layers = max(self.spec.num_moe_layers, 1)
        for i, layer in enumerate(self.spec.moe_layers):
            out[layer] = min(num_resident // layers + (i < num_resident % layers),
                             self.spec.moe.num_experts)
        return out

    def streamed_experts(self, batch: int, num_resident: int) -> list[float]:
        """Expected non-resident experts a decode step of `batch` tokens activates, per decoder
        layer (uniform routing: the worst case for caching, and what dummy weights do)."""
        active = self.active_share(batch)
        return [(self.spec.moe.num_experts - resident) * active if layer in self.spec.moe_layers
                else 0.0 for layer, resident in enumerate(self.resident_experts(num_resident))]

    @property
    def fp8_run_cap(self) -> int:
        """Most FP8 experts one run dequantises (moe-core's workspace); no cap otherwise."""
        if not self.fp8_experts:
            return 1 << 30
        wide = 3 * self.spec.hidden_size * self.spec.moe.expert_intermediate_size * 2
        return max(1, FP8_WORKSPACE_BYTES // wide)

    def flops_per_token(self) -> float:
        """Matrix-product FLOPs of one token through the model (activated experts only)."""
        spec = self.spec
        embedding = spec.vocab_size * spec.hidden_size  # a lookup, not a product
        return 2.0 * (spec.active_params_per_token - embedding * (not spec.tie_word_embeddings))

    def expansion_flops_per_key(self) -> int:
        """Matrix-product FLOPs per cached key per step beyond the attention itself: MLA
        re-expands every cached latent into keys and values (`kv_b_proj`); GQA reads its keys as
        they are."""
        att = self.spec.attention
        if att.kind != "mla":
            return 0
        assert att.kv_lora_rank is not None
        return 2 * att.kv_lora_rank * att.num_heads * ((att.qk_nope_head_dim or 0)
                                                        + att.v_head_dim)

    def attention_work_bytes_per_key(self) -> int:
        """Device bytes one cached key costs while its micro-batch attends (gathered copy, the
        concatenation, the per-head expansion of GQA groups or of the MLA latent)."""
        att = self.spec.attention
        if att.kind == "mla":
            nope = att.qk_nope_head_dim or 0
            per_key = att.num_heads * (2 * nope + att.v_head_dim + att.head_dim)
        else:
            per_key = 2 * att.num_heads * att.head_dim
        return (per_key + 2 * att.kv_elements_per_token()) * self.dtype_bytes

    def activation_bytes(self, num_tokens: int, num_seqs: int) -> int:
        """Peak activations of a step of `num_tokens` tokens (hidden copies, one expert's
        intermediate products on every token in the worst case, the streaming executor's inputs
        and outputs per routed assignment, float32 logits)."""
        spec = self.spec
        width = max(spec.moe.expert_intermediate_size, spec.dense_intermediate_size or 0,
                    spec.moe.shared_intermediate_size or 0)
        routed = 2 * spec.moe.router.top_k * spec.hidden_size
        per_token = (8 * spec.hidden_size + 3 * width + routed) * self.dtype_bytes
        return num_tokens * per_token + 2 * num_seqs * spec.vocab_size * 4


def gpu_bytes(costs: ModelCosts, c: Candidate, context: int,
              max_context: int | None = None) -> int:
    """Device memory of a candidate: dense part, expert slots, activations, the attention work of
    one micro-batch at the mean `context`, and the KV gathered ahead (one layer's micro-batches,
    each up to `max_context` keys)."""
    slots = (c.num_resident + c.ring) * costs.expert_bytes
    act = costs.activation_bytes(c.batch + c.prefill_tokens, c.batch)
    work = c.micro_batch * context * costs.attention_work_bytes_per_key()
    ahead = (kv_lookahead(c) * c.micro_batch * (max_context or context)
             * costs.kv_bytes_per_token // costs.spec.num_layers)
    return costs.dense_bytes + slots + act + work + ahead + costs.dequantize_workspace_bytes


def host_memory(costs: ModelCosts, c: Candidate, max_tokens: int) -> HostMemory:
    """Host memory of candidate `c` whose sequences hold up to `max_tokens` tokens."""
    spec = costs.spec
    per_layer = costs.kv_bytes_per_token // max(spec.num_layers, 1)
    experts = costs.num_experts * costs.expert_bytes
    full = costs.dense_bytes + costs.num_experts * costs.expert_run_bytes
    return HostMemory(
        experts=experts, kv_pages=c.batch * max_tokens * costs.kv_bytes_per_token,
        staging=(0 if c.kv_gather == "mapped"
                 else 2 * kv_lookahead(c) * c.micro_batch * max_tokens * per_layer),
        host_attention=(spec.num_layers * spec.attention.num_params(spec.hidden_size)
                        * costs.dtype_bytes if c.cpu_share > 0 else 0),
        loading=full + spec.moe.num_experts * costs.expert_bytes)


def run_length(ring: int) -> int:
    """Most experts one grouped product computes with a ring of `ring` slots (moe-core's
    `ExpertRing.max_group`, set by `model_setup`): half the ring, so one run's copies land while
    the previous run computes, and at least 8 (a short ring's runs are cut by its end anyway).
    FP8 runs are further capped by their dequantisation workspace inside moe-core."""
    return max(8, ring // 2)


def _runs(streamed: float, resident: float, ring: int, fp8_cap: int) -> float:
    """Expected grouped products of one layer: streamed experts in runs cut by the ring's end
    and the run length, residents in runs of the run length."""
    length = min(run_length(ring), fp8_cap)
    streamed_runs = -(-streamed // min(length, ring)) if streamed else 0.0
    return streamed_runs + (-(-resident // length) if resident else 0.0)


def kv_lookahead(c: Candidate) -> int:
    """Micro-batches whose KV may be gathered before their attention: one layer's worth, so the
    next layer's KV crosses PCIe while this layer's experts stream."""
    return -(-c.batch // c.micro_batch)


def predict(costs: ModelCosts, profile: DeviceProfile, c: Candidate, context: int) -> Prediction:
    """Predicted decode step of candidate `c` at mean context `context`."""
    spec, share, layers = costs.spec, c.cpu_share, costs.spec.num_layers
    bandwidth = profile.h2d_bytes_per_s
    device_batch = (1 - share) * c.batch
    kv_bytes = device_batch * context * costs.kv_bytes_per_token  # crosses PCIe
    mapped = c.kv_gather == "mapped"
    kv_rate = profile.mapped_gather_bytes_per_s if mapped else bandwidth
    kv_layer = kv_bytes / kv_rate / layers if profile.device != "cpu" else 0.0
    gather_layer = 0.0 if mapped else kv_bytes / profile.gather_bytes_per_s / layers
    streamed = costs.streamed_experts(c.batch, c.num_resident)  # per layer
    streamed_bytes = sum(streamed) * costs.expert_bytes
    flops = c.batch * costs.flops_per_token()
    expert_flops = (c.batch * spec.num_moe_layers * spec.moe.router.top_k * 2 * 3
                    * spec.hidden_size * spec.moe.expert_intermediate_size)
    projection_flops = 2.0 * c.batch * layers * spec.attention.num_params(spec.hidden_size)
    expert_gpu = expert_flops / profile.matmul_flops_per_s
    other_gpu = (flops - expert_flops - share * projection_flops) / profile.matmul_flops_per_s
    device_micro_batches = -(-round(device_batch) // c.micro_batch)
    launches = device_micro_batches * layers * _OPS_PER_MICRO_BATCH
    keys = c.batch * context * layers  # (query, key, layer) triples of the step
    expansion = costs.expansion_flops_per_key()
    attention = ((1 - share) * keys * (1 / profile.attention_keys_per_s
                                       + expansion / profile.matmul_flops_per_s)
                 + other_gpu + launches * profile.launch_s)
    # torch's host path gathers its share's pages from the arenas first, then attends them; the
    # paged kernel reads them in place (its measured rate includes the reading).
    gathers = (c.batch * context * costs.kv_bytes_per_token / profile.gather_bytes_per_s
               if profile.cpu_attention_kernel == "torch" else 0.0)
    host = share * (keys * (1 / profile.cpu_attention_keys_per_s
                            + expansion / profile.cpu_matmul_flops_per_s)
                    + projection_flops / profile.cpu_matmul_flops_per_s + gathers)
    moe_gpu = expert_gpu / max(spec.num_moe_layers, 1)
    lookahead = costs.active_share(c.batch) >= LOOKAHEAD_MIN_SHARE and profile.device != "cpu"
    cover = c.ring * costs.expert_bytes / bandwidth if lookahead else 0.0
    micro_batches = device_micro_batches + -(-round(share * c.batch) // c.micro_batch)
    resident = costs.resident_experts(c.num_resident)  # per layer
    fp8_cap = costs.fp8_run_cap
    # A staged gather and the copy out of its staging both go through host memory (the gather
    # reads and writes every byte, the copy engine reads it again): on the H200 host they ran in
    # turn, not beside each other (staged 0.97 s against mapped 0.75 s a step, S3 FP8, same
    # plan, 2026-12-03), so the staged KV holds the link for both.
    kv_hold = kv_layer + gather_layer
    step = kv_hold  # the first layer's KV: nothing to hide behind
    dispatch_total = 0.0
    for layer in range(layers):
        last = layer + 1 == layers
        phase = max(attention, host) / layers
        experts = streamed[layer] * costs.expert_bytes / bandwidth
        link = experts - min(phase, cover, experts) + (0.0 if last else kv_hold)
        moe = layer in spec.moe_layers
        matmuls = moe_gpu if moe else 0.0
        runs = _runs(streamed[layer], resident[layer], c.ring, fp8_cap) if moe else 0.0
        dispatch = profile.launch_s * (micro_batches * HOST_LAUNCHES_PER_MICRO_BATCH
                                       + streamed[layer] * HOST_LAUNCHES_PER_EXPERT
                                       + runs * HOST_LAUNCHES_PER_RUN
                                       + moe * HOST_LAUNCHES_PER_MOE_LAYER)
        dispatch_total += dispatch
        step += max(dispatch, phase + max(link, matmuls))
    expert_pcie = streamed_bytes / bandwidth
    bound = max((streamed_bytes + kv_bytes) / bandwidth, flops / profile.matmul_flops_per_s)
    return Prediction(step_s=step, pcie_s=expert_pcie + kv_layer * layers,
                      expert_pcie_s=expert_pcie, kv_pcie_s=kv_layer * layers,
                      gpu_s=expert_gpu + attention, cpu_s=gather_layer * layers + host,
                      dispatch_s=dispatch_total,
                      bound_s=bound, tokens_per_s=c.batch / step,
                      bound_tokens_per_s=c.batch / bound)
