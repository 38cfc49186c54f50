"""`kernels.mapped_experts` against a float64 oracle on the blocks the device table points at:
each assignment's block from its slot (>= 0), from the layer's host rows (-1), or from nowhere
(-2, the CPU lane's). Pool and host hold *different* values for the same expert, so reading the
wrong source fails. Compiled on CUDA (host rows page-locked), else under Triton's interpreter.

Dimension key: T tokens, K experts per token, D hidden, I expert width, E experts, S slots,
N block elements.
"""

from __future__ import annotations

import math

from collections.abc import Callable

import pytest
import torch
from moe_core.kernels import mapped_experts, mapped_experts_supported, moe_experts_reference
from moe_core.kernels.miss_staging import miss_staging_reference
from moe_core.offload.fp8 import FP8
from moe_core.offload.layout import ExpertLayout


@pytest.fixture
def device(kernel_device: Callable[..., torch.device]) -> torch.device:
    """Where the kernels run (see conftest)."""
    from moe_core.kernels import mapped_experts as module

    return kernel_device(module, ())


def blocks(layout: ExpertLayout, count: int) -> torch.Tensor:
    """`[count, N]` random blocks of `layout` (FP8: quantised per output channel)."""
    d, i = layout.hidden_size, layout.intermediate_size
    rows = torch.zeros(count, layout.numel, dtype=layout.dtype)
    layout.pack_layer(torch.randn(count, i, d), torch.randn(count, i, d),
                      torch.randn(count, d, i), rows)
    return rows


def oracle(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, lut: torch.Tensor,
           pool: torch.Tensor, host: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """The layer in float64 on the blocks the table points at (FP8 dequantised exactly)."""
    t, k = ids.shape
    slots = lut[ids.reshape(-1)]  # [T*K]
    chosen = torch.where((slots >= 0)[:, None], pool[slots.clamp(min=0)],
                         host[ids.reshape(-1)])  # [T*K, N]
    mats = [layout.matrices(row, torch.float64) if layout.is_fp8
            else tuple(m.double() for m in layout.views(row)) for row in chosen]
    gate, up, down = (torch.stack(m) for m in zip(*mats, strict=True))
    w = torch.where(slots.view(t, k) == -2, 0.0, weights.double())
    x = hidden.double() if layout.is_fp8 else hidden.to(layout.dtype).double()
    index = torch.arange(t * k).view(t, k)
    return moe_experts_reference(x, index, w, gate, up, down)


def run(device: torch.device, layout: ExpertLayout, hidden_dtype: torch.dtype,
        ids: list[list[int]], lut: list[int], num_slots: int,
        staged_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(kernel, oracle)` outputs for one call; `staged_rows`: that many of the call's distinct
    misses handed over in staging rows (on the device), as `MappedFetcher.stage_misses` stages
    them, with their host rows zeroed so that reading the host instead shows."""
    e = len(lut)
    pool, host = blocks(layout, num_slots), blocks(layout, e)
    hidden = torch.randn(len(ids), layout.hidden_size).to(hidden_dtype)
    id_t, lut_t = torch.tensor(ids), torch.tensor(lut)
    weights = torch.rand(id_t.shape) * 0.9 + 0.1
    expected = oracle(hidden, id_t, weights, lut_t, pool, host, layout)
    call_lut, staged = lut_t, None
    if staged_rows:
        call_lut, row_experts = miss_staging_reference(id_t, lut_t, staged_rows)
        assert (call_lut <= -3).any()
        staged = torch.zeros(staged_rows, layout.numel, dtype=layout.dtype)
        filled = row_experts >= 0
        staged[filled] = host[row_experts[filled]]
        host = host.clone()
        host.view(torch.uint8)[row_experts[filled]] = 0  # the kernel must read the staged copy
        staged = staged.to(device)
    host_rows = host.pin_memory() if device.type == "cuda" else host
    args = (hidden.to(device), id_t.to(device), weights.to(device), call_lut.to(device),
            pool.to(device), host_rows)
    assert mapped_experts_supported(args[0], layout, args[4], host_rows, staged)
    return mapped_experts(*args, layout, staged_rows=staged), expected


def assert_near(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Largest error within `rtol` of the largest magnitude."""
    assert actual.shape == expected.shape
    expected = expected.cpu()
    err = (actual.cpu().double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} * {scale:.3g}"


LUT = [2, -1, 0, -2, -1, 1, -1, 3]  # E = 8: four resident (slots 0-3), three on the host, one CPU


@pytest.mark.parametrize("staged", [0, 2, 3], ids=["host", "some-staged", "all-staged"])
@pytest.mark.parametrize("dtype", [torch.float32, FP8])
def test_each_assignment_reads_the_source_its_table_names(device: torch.device,
                                                          dtype: torch.dtype,
                                                          staged: int) -> None:
    torch.manual_seed(0)
    layout = ExpertLayout(hidden_size=48, intermediate_size=24, dtype=dtype)
    out, expected = run(device, layout, torch.float32, [[0, 1, 3, 4, 5, 7]], LUT, num_slots=5,
                        staged_rows=staged)
    assert out.shape == (1, 48) and out.dtype == torch.float32
    assert_near(out, expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
def test_half_precision_activations(device: torch.device, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    layout = ExpertLayout(hidden_size=64, intermediate_size=40, dtype=dtype)
    out, expected = run(device, layout, torch.bfloat16, [[6, 2, 1, 0]], LUT, num_slots=4)
    assert out.dtype == torch.bfloat16
    assert_near(out, expected, rtol=2e-2)


@pytest.mark.parametrize("staged", [0, 1, 8], ids=["host", "one-staged", "all-staged"])
def test_several_tokens_with_repeated_experts(device: torch.device, staged: int) -> None:
    """Missed experts shared by tokens (1 and 4) are staged once and read by each."""
    torch.manual_seed(2)
    layout = ExpertLayout(hidden_size=32, intermediate_size=16, dtype=FP8)
    out, expected = run(device, layout, torch.float32, [[0, 1], [1, 0], [4, 4], [3, 6], [1, 4]],
                        LUT, num_slots=4, staged_rows=staged)
    assert_near(out, expected, rtol=1e-5)


def test_a_token_whose_experts_are_all_on_the_cpu_lane_gets_zeros(device: torch.device) -> None:
    layout = ExpertLayout(hidden_size=32, intermediate_size=16, dtype=torch.float32)
    out, _ = run(device, layout, torch.float32, [[3, 3]], LUT, num_slots=4)
    assert torch.count_nonzero(out) == 0


def test_unsupported_inputs_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layout = ExpertLayout(hidden_size=16, intermediate_size=8, dtype=torch.float32)
    pool, host = blocks(layout, 2), blocks(layout, 4)
    hidden = torch.randn(1, 16)
    assert not mapped_experts_supported(hidden, layout, pool, host)  # CPU, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    other = ExpertLayout(hidden_size=16, intermediate_size=4, dtype=torch.float32)
    assert not mapped_experts_supported(hidden, other, pool, host)  # rows of another layout
    assert not mapped_experts_supported(hidden.double(), layout, pool, host)
    assert not mapped_experts_supported(hidden, layout, pool[:, :-1], host)


@pytest.mark.parametrize("stage_misses,rows", [(True, None), (True, 2),
                                                pytest.param(False, None, marks=pytest.mark.gpu)],
                         ids=["staged", "two-rows", "host"])  # the interpreter: ~20 s a case
def test_the_offloaded_executor_computes_mapped_calls_in_place(
        device: torch.device, monkeypatch: pytest.MonkeyPatch, stage_misses: bool,
        rows: int | None) -> None:
    """Decode of the embedded model (batch 1, and batch 2: calls with repeated experts) over
    half-cached slots with the mapped fetch: every mapped call runs the kernel (the prompt's
    too), its misses staged (all of them, or two rows' worth and the rest read from host
    memory) or all read from host memory, and the greedy tokens and logits are the resident
    model's."""
    from moe_core import load_model, tiny_model_path
    from moe_core.offload import offloaded_executor
    from moe_core.offload.copy_engines import make_copy_engine
    from moe_core.offload.gpu_slots import GpuSlotPool
    from moe_core.offload.host_store import HostExpertStore
    from moe_core.offload.runtime import install_offloading

    reference = load_model(tiny_model_path(), dtype="float32", device=device)
    model = load_model(tiny_model_path(), dtype="float32", device=device)
    store = HostExpertStore.from_model(model, pin=device.type == "cuda")
    pool = GpuSlotPool(store.layout, len(store.experts()) // 2, device=device)
    runtime = install_offloading(model, store, pool, make_copy_engine(device), fetch="mapped")
    runtime.prefetch(store.experts()[::2][: pool.num_slots])
    runtime.drain()
    for executor in runtime.executors.values():
        executor.stage_misses = stage_misses  # type: ignore[attr-defined]
        if rows is not None:  # the calls' blocks no longer fit the limit: still in place
            executor.gather_limit_bytes = rows * store.layout.nbytes  # type: ignore[attr-defined]
            executor.in_place_misses_per_row = math.inf  # type: ignore[attr-defined]
    calls: list[int] = []
    staged_calls: list[int] = []
    kernel = offloaded_executor.mapped_experts

    def counted(hidden: torch.Tensor, *args: object,
                staged_rows: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(hidden.shape[0])
        if staged_rows is not None:
            staged_calls.append(staged_rows.shape[0])
        return kernel(hidden, *args, staged_rows=staged_rows)  # type: ignore[arg-type]

    monkeypatch.setattr(offloaded_executor, "mapped_experts", counted)
    try:
        with torch.no_grad():
            for ids in ([[5, 17]], [[5, 17], [99, 3]]):
                prompt = torch.tensor(ids, device=device)
                got = model.generate(prompt, max_new_tokens=2, eos_token_id=[], graphs=False)
                want = reference.generate(prompt, max_new_tokens=2, eos_token_id=[],
                                          graphs=False)
                assert got.tolist() == want.tolist()
            one = torch.tensor([[7]], device=device)
            assert_near(model(one).float()[0], reference(one).double()[0], rtol=1e-4)
    finally:
        runtime.close()
    assert {1, 2, 4} <= set(calls)  # decode of batch 1 and 2, and the batch-2 prompt
    if not stage_misses:
        assert not staged_calls
    else:
        assert staged_calls and max(staged_calls) <= (rows or max(staged_calls))
        if rows is not None:
            assert set(staged_calls) == {rows}
