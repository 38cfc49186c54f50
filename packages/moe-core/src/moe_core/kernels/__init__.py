"""Fused decode kernels (Triton) with torch references: routed experts read in place, grouped-query
decode attention, RMSNorm with a fused residual add, the softmax top-k router and rotary
embeddings, and offloaded experts read from their slots or from host memory in place.

Each public function runs its Triton kernel for CUDA tensors when Triton imports (or under
Triton's interpreter, `TRITON_INTERPRET=1`) and its torch reference otherwise; the references
are exported as the oracles the kernels are tested against. Importing this package never imports
Triton: kernels are built on first use (see `backend`).
"""

from moe_core.kernels.attention import decode_attention, decode_attention_supported
from moe_core.kernels.experts import moe_experts, moe_experts_supported
from moe_core.kernels.mapped_experts import mapped_experts, mapped_experts_supported
from moe_core.kernels.norm import add_rms_norm, rms_norm, rms_norm_supported
from moe_core.kernels.reference import (
    add_rms_norm_reference,
    decode_attention_reference,
    moe_experts_reference,
    rms_norm_reference,
    softmax_topk_reference,
)
from moe_core.kernels.rotary import rotary, rotary_reference, rotary_supported
from moe_core.kernels.routing import softmax_topk

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_supported",
    "mapped_experts",
    "mapped_experts_supported",
    "moe_experts",
    "moe_experts_reference",
    "moe_experts_supported",
    "rms_norm",
    "rms_norm_reference",
    "rms_norm_supported",
    "rotary",
    "rotary_reference",
    "rotary_supported",
    "softmax_topk",
    "softmax_topk_reference",
]
