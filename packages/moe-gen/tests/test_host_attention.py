"""The host's share attended by the paged kernel: the kernel is what runs, through moe-core's
`DecodeAttentionStore` seam, and the new entries still reach the pages."""

from __future__ import annotations

import pytest
import torch
from moe_core import load_model, tiny_model_path
from moe_gen import Plan, generate
from moe_gen.host_attention import HostAttention, host_attention_kernel
from moe_gen.paged_attention import NumbaPagedAttention
from moe_gen.paged_kv import PagedKV

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43]]


def run(kernel: str) -> list[list[int]]:
    model = load_model(tiny_model_path(), dtype="float32")
    plan = Plan(max_batch_size=3, micro_batch_size=2, max_prefill_tokens=64, page_tokens=4,
                num_kv_pages=12, cpu_attention_share=1.0, host_attention_kernel=kernel)
    return [list(r.token_ids) for r in generate(model, PROMPTS, max_new_tokens=6,
                                                 eos_token_id=[], plan=plan)]


def test_the_numba_kernel_attends_every_host_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = NumbaPagedAttention.__call__

    def counted(self: NumbaPagedAttention, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(NumbaPagedAttention, "__call__", counted)
    tokens = run("numba")
    layers = load_model(tiny_model_path(), dtype="float32").spec.num_layers
    # 5 decode steps after the prefill, each in two host micro-batches (2 + 1), every layer.
    assert len(calls) == 5 * 2 * layers
    assert tokens == run("torch")


def test_host_micro_batches_use_the_kernels_cache() -> None:
    model = load_model(tiny_model_path(), dtype="float32")
    pages = PagedKV(model.spec, 4, 4, torch.float32)
    assert isinstance(HostAttention(model, pages, 0.5, "numba").kernel, NumbaPagedAttention)
    assert HostAttention(model, pages, 0.5, "torch").kernel is None
    with pytest.raises(ValueError, match="unknown host attention kernel"):
        host_attention_kernel("triton")
    with pytest.raises(ValueError, match="host_attention_kernel"):
        Plan(max_batch_size=1, micro_batch_size=1, max_prefill_tokens=1, page_tokens=1,
             num_kv_pages=1, host_attention_kernel="triton")
