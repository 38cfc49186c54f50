"""Greedy outputs of the module-based batching engine equal transformers' greedy `generate`,
token for token per request: ragged prompts, EOS stops, continuous refill, at several batch and
micro-batch sizes, with experts local or streamed through moe-core's ring (CPU, float32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from moe_core import TINY_MODEL_NAME, MoEForCausalLM, load_model, tiny_model_path
from moe_gen import Plan, generate
from moe_gen.model_setup import install_streaming

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48], [7],
           [20, 21, 22, 23], [60, 61], [30, 31, 32, 33, 34, 35], [70, 71, 72]]
NUM_NEW = 10

# (batch, micro-batch, prefill tokens per step, page tokens)
SIZES = [(1, 1, 64, 4), (3, 2, 6, 4), (8, 3, 64, 16), (8, 8, 12, 3)]


def plan(batch: int, micro: int, prefill: int, page: int, offload: bool = False,
         pairs: int = 1 << 62, cpu_share: float = 0.0, kernel: str = "torch",
         kv_gather: str = "staged") -> Plan:
    return Plan(max_batch_size=batch, micro_batch_size=micro, max_prefill_tokens=prefill,
                page_tokens=page, num_kv_pages=batch * (-(-(9 + NUM_NEW) // page)),
                num_resident_experts=3, max_attention_pairs=pairs,
                cpu_attention_share=cpu_share, host_attention_kernel=kernel,
                kv_gather=kv_gather, offload=offload)


def eos_for(free: list[list[int]]) -> list[int]:
    """An EOS id that stops some requests early and not others: a token seen mid-way."""
    return [free[0][3]]


def check(model: MoEForCausalLM, expected: list[list[int]], eos: list[int], sizes: tuple[int, ...],
          offload: bool = False, pairs: int = 1 << 62, cpu_share: float = 0.0,
          kernel: str = "torch", kv_gather: str = "staged") -> None:
    results = generate(model, PROMPTS, max_new_tokens=NUM_NEW, eos_token_id=eos,
                       plan=plan(*sizes, offload=offload, pairs=pairs, cpu_share=cpu_share,
                                 kernel=kernel, kv_gather=kv_gather))
    assert [r.id for r in results] == [str(i) for i in range(len(PROMPTS))]
    for i, (result, want) in enumerate(zip(results, expected, strict=True)):
        assert list(result.token_ids) == want, f"request {i}"
        stopped = bool(eos) and want[-1] in eos
        assert result.finish_reason == ("eos" if stopped else "length")


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v2", TINY_MODEL_NAME])
def case(request: pytest.FixtureRequest, tiny_folders: dict[str, Path], reference_of: Any
         ) -> tuple[Path, list[list[int]], list[list[int]], list[int]]:
    folder = (tiny_model_path() if request.param == TINY_MODEL_NAME
              else tiny_folders[request.param])
    free = reference_of(folder, PROMPTS, [], NUM_NEW)
    eos = eos_for(free)
    return folder, free, reference_of(folder, PROMPTS, eos, NUM_NEW), eos


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "b{}-m{}-p{}-pg{}".format(*s))
def test_greedy_equals_transformers(case: tuple, sizes: tuple[int, ...]) -> None:
    folder, free, with_eos, eos = case
    model = load_model(folder, dtype="float32")
    assert any(len(r) < NUM_NEW for r in with_eos), "the EOS id should stop some request"
    check(model, free, [], sizes)
    check(model, with_eos, eos, sizes)


def test_streamed_experts_give_the_same_tokens(case: tuple) -> None:
    folder, _, with_eos, eos = case
    model = load_model(folder, dtype="float32")
    loaded = install_streaming(model, plan(*SIZES[1], offload=True), "cpu")
    assert loaded.runtime is not None
    check(loaded.model, with_eos, eos, SIZES[1], offload=True)
    stats = loaded.runtime.summary()
    assert stats["hits"] > 0 and stats["misses"] > 0  # both resident and streamed experts ran


def test_attention_pair_cap_splits_prefill_micro_batches(case: tuple) -> None:
    folder, _, with_eos, eos = case
    model = load_model(folder, dtype="float32")
    check(model, with_eos, eos, (8, 8, 64, 4), pairs=40)  # prompts alone or in twos


@pytest.mark.parametrize(("share", "kernel"), [(0.5, "torch"), (1.0, "torch"), (0.5, "numba"),
                                               (1.0, "numba")])
def test_host_attention_share_gives_the_same_tokens(case: tuple, share: float,
                                                    kernel: str) -> None:
    folder, _, with_eos, eos = case
    model = load_model(folder, dtype="float32")
    check(model, with_eos, eos, (8, 3, 12, 4), cpu_share=share, kernel=kernel)


@pytest.mark.parametrize(("sizes", "share"), [(SIZES[1], 0.0), (SIZES[3], 0.0),
                                               ((8, 3, 12, 4), 0.5)])
def test_mapped_kv_gather_gives_the_same_tokens(case: tuple, sizes: tuple[int, ...],
                                                share: float) -> None:
    """The device's own gather of the past KV (`kv_gather="mapped"`; index_select into its
    ring on the CPU), beside a host share too."""
    folder, _, with_eos, eos = case
    model = load_model(folder, dtype="float32")
    check(model, with_eos, eos, sizes, cpu_share=share, kv_gather="mapped")


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_every_architecture_equals_transformers(kind: str, tmp_path: Path,
                                                reference_of: Any) -> None:
    from moe_core import build_tiny_checkpoint

    folder = build_tiny_checkpoint(kind, tmp_path / kind)
    free = reference_of(folder, PROMPTS, [], NUM_NEW)
    eos = eos_for(free)
    model = load_model(folder, dtype="float32")
    check(model, reference_of(folder, PROMPTS, eos, NUM_NEW), eos, SIZES[2])
