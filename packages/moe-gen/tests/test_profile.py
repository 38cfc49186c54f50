"""The device profile measures decode attention the way the engine attends: through moe-core's
own `attend` (which the attention modules call, and which runs the GQA decode kernel on CUDA),
after joining the cached keys with the new one. On the CPU that is the same work as before:
groups expanded per query head, SDPA with the additive mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moe_core import ModelSpec, attend, resolve_model_path
from moe_gen import profile


def shape(name: str) -> ModelSpec:
    return ModelSpec.from_pretrained(resolve_model_path(name, weights=False))


def test_gqa_attention_is_timed_through_the_engines_attend(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    spec = shape("qwen3-30b-a3b")
    att = spec.attention
    calls: list[tuple[tuple[int, ...], tuple[int, ...], float]] = []

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            scale: float) -> torch.Tensor:
        calls.append((tuple(q.shape), tuple(k.shape), scale))
        return attend(q, k, v, mask, scale)

    monkeypatch.setattr(profile, "attend", spy)
    rate = profile._attention_rate(spec, torch.device("cpu"), torch.float32, 2, 16)
    assert rate > 0 and calls
    q_shape, k_shape, scale = calls[0]
    assert q_shape == (2, att.num_heads, 1, att.head_dim)  # one query per sequence
    assert k_shape == (2, att.num_kv_heads, 16, att.head_dim)  # the groups, not expanded
    assert scale == pytest.approx(att.head_dim**-0.5)


def test_mla_attention_is_not_timed_through_attend(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object) -> torch.Tensor:
        raise AssertionError("MLA decodes through its absorbed products, not attend")

    monkeypatch.setattr(profile, "attend", fail)
    assert profile._attention_rate(shape("deepseek-v2-lite"), torch.device("cpu"),
                                   torch.float32, 2, 8) > 0


def test_attend_on_the_cpu_is_the_expanded_sdpa_the_profile_timed_before() -> None:
    """On the CPU `attend` does exactly what the profile used to spell out, so the host's
    rates (and every CPU plan) are unchanged."""
    torch.manual_seed(0)
    b, h, g, s, e = 3, 8, 2, 20, 16
    q = torch.randn(b, h, 1, e)
    k, v = torch.randn(b, g, s, e), torch.randn(b, g, s, e)
    mask = torch.zeros(b, 1, 1, s)
    mask[0, ..., :5] = -1e9
    old = F.scaled_dot_product_attention(q, k.repeat_interleave(h // g, dim=1),
                                         v.repeat_interleave(h // g, dim=1), attn_mask=mask)
    assert torch.equal(attend(q, k, v, mask, e**-0.5), old)
