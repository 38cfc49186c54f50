"""The compiled kernels on a GPU (marked `gpu`; skipped without CUDA): real model shapes, bf16
rounding bit for bit (the CPU interpreter truncates bf16, the GPU rounds to nearest), and
capture in a CUDA graph with inputs changed in place between replays.

Dimension key: T tokens, K experts per token, D hidden, I expert width, W stacked weights,
B batch, H query heads, G key/value heads, S keys, E head channels / routed experts.
"""

from __future__ import annotations

import pytest
import torch
from moe_core.kernels import (
    add_rms_norm,
    add_rms_norm_reference,
    decode_attention,
    decode_attention_reference,
    decode_attention_supported,
    moe_experts,
    moe_experts_reference,
    moe_experts_supported,
    rms_norm,
    rms_norm_reference,
    softmax_topk,
    softmax_topk_reference,
)
from moe_core.offload.layout import ExpertLayout

pytestmark = pytest.mark.gpu

SHAPES = {  # name: (D, I, K, W)
    "qwen3-30b-a3b": (2048, 768, 8, 128),
    "mixtral": (4096, 14336, 2, 8),
    "deepseek-v2-lite": (2048, 1408, 6, 64),
}


@pytest.fixture(autouse=True)
def compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled kernels, never the interpreter."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference over the largest magnitude, in float64."""
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / expected.double().abs().max().item()


def slot_pool(d: int, i: int, w: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Gate, up, down strided views of a `[W, 3*I*D]` slot pool on the GPU."""
    layout = ExpertLayout(hidden_size=d, intermediate_size=i, dtype=dtype)
    rows = torch.randn(w, layout.numel, device="cuda", dtype=dtype) * 0.05
    return layout.stacked_views(rows)


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("tokens", [1, 4])
def test_moe_experts_at_model_shapes(name: str, tokens: int) -> None:
    torch.manual_seed(0)
    d, i, k, w = SHAPES[name]
    stacks = slot_pool(d, i, w, torch.bfloat16)
    hidden = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    index = torch.stack([torch.randperm(w)[:k] for _ in range(tokens)]).cuda()
    weights = torch.rand(tokens, k, device="cuda")
    assert moe_experts_supported(hidden, stacks[0])
    out = moe_experts(hidden, index, weights, *stacks)
    expected = moe_experts_reference(hidden.float(), index, weights,
                                     *(s.float() for s in stacks))
    assert relative_error(out, expected) <= 1e-2
    fp32 = moe_experts(hidden.float(), index, weights, *(s.float() for s in stacks))
    assert relative_error(fp32, expected) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch", [1, 4, 64])
def test_decode_attention_at_qwen3_shapes(dtype: torch.dtype, batch: int) -> None:
    torch.manual_seed(1)
    h, g, e, s = 32, 4, 128, 1024
    cache = torch.randn(batch, 2 * s, 2, g, e, device="cuda").to(dtype)  # [B, slots, k|v, G, E]
    k, v = cache[:, :s, 0], cache[:, :s, 1]
    q = torch.randn(batch, h, e, device="cuda").to(dtype)
    mask = torch.zeros(batch, s, device="cuda")
    mask[:, s // 2 :] = torch.finfo(torch.float32).min
    assert decode_attention_supported(q, k)
    out = decode_attention(q, k, v, mask, e**-0.5)
    expected = decode_attention_reference(q.float(), k.float(), v.float(), mask, e**-0.5)
    assert relative_error(out, expected) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_norms_round_bf16_like_torch() -> None:
    torch.manual_seed(2)
    x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    delta = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    summed, normed = add_rms_norm(x, delta, weight, 1e-6)
    expected_sum, expected_norm = add_rms_norm_reference(x, delta, weight, 1e-6)
    assert torch.equal(summed, expected_sum)
    same = (normed == expected_norm).float().mean().item()
    assert same >= 0.99 and relative_error(normed, expected_norm) <= 1e-2
    alone = rms_norm(x, weight, 1e-6)
    assert (alone == rms_norm_reference(x, weight, 1e-6)).float().mean().item() >= 0.99


def test_softmax_topk_at_64_tokens() -> None:
    torch.manual_seed(3)
    logits = torch.randn(64, 128, device="cuda")
    ids, weights = softmax_topk(logits, 8, True, 1.0)
    expected_ids, expected_weights = softmax_topk_reference(logits, 8, True, 1.0)
    order, expected_order = ids.argsort(dim=-1), expected_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), expected_ids.gather(1, expected_order))
    gap = weights.gather(1, order) - expected_weights.gather(1, expected_order)
    assert gap.abs().max().item() <= 1e-6


def test_a_decode_step_of_kernels_replays_as_a_cuda_graph() -> None:
    torch.manual_seed(4)
    d, i, k, w = SHAPES["qwen3-30b-a3b"]
    stacks = slot_pool(d, i, w, torch.bfloat16)
    hidden = torch.randn(2, d, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(2, w, device="cuda")
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, 512, 2, 4, 128, device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros(2, 512, device="cuda")
    norm_weight = torch.randn(d, device="cuda", dtype=torch.bfloat16)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = softmax_topk(logits, k, True, 1.0)
        _, normed = add_rms_norm(hidden, hidden, norm_weight, 1e-6)
        experts = moe_experts(normed, ids, weights, *stacks)
        attention = decode_attention(q, kv[:, :, 0], kv[:, :, 1], mask, 128**-0.5)
        return experts, attention

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        for tensor in (hidden, logits, q, kv):
            tensor.copy_(torch.randn_like(tensor))
        mask[:, torch.randint(0, 512, (64,))] = torch.finfo(torch.float32).min
        graph.replay()
        eager = step()
        assert torch.equal(captured[0], eager[0])
        assert torch.equal(captured[1], eager[1])
