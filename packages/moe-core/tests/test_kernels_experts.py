"""`kernels.moe_experts` against its torch reference (`gathered_experts`) on weight stacks laid
out like the slot pool: strided views, gate and up as halves of one view, repeated experts, K not
a power of two. The kernels run compiled on CUDA where present, else under Triton's CPU
interpreter (which needs Triton imported with it switched on: `prepare_interpreter`).

Dimension key: T tokens, K experts per token, D hidden, I expert width, W stacked weights.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from moe_core.kernels import experts as experts_module
from moe_core.kernels import moe_experts, moe_experts_reference, moe_experts_supported
from moe_core.kernels.experts import ExpertsLaunch, experts_launch
from moe_core.offload.layout import ExpertLayout

TARGETS = {  # name: (D, I, K, W)
    "qwen3-30b-a3b": (2048, 768, 8, 128),
    "mixtral": (4096, 14336, 2, 8),
    "olmoe": (2048, 1024, 8, 64),
    "deepseek-v2-lite": (2048, 1408, 6, 64),
}


@pytest.fixture
def device(kernel_device: Callable[..., torch.device]) -> torch.device:
    """Where the kernels run (see conftest); a fallback to a torch reference fails the test."""
    return kernel_device(experts_module, ("moe_experts_reference",))


def pool_views(w: int, d: int, i: int, dtype: torch.dtype, device: torch.device,
               pad: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(gate [W, I, D], up, down [W, D, I])` strided views of a `[W, 3*I*D + pad]` pool."""
    layout = ExpertLayout(hidden_size=d, intermediate_size=i, dtype=dtype)
    rows = torch.randn(w, layout.numel + pad).to(device, dtype)[:, pad:]  # row stride != numel
    return layout.stacked_views(rows)


def routed(t: int, k: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (as a router picks them), weights in (0.1, 1)."""
    index = torch.stack([torch.randperm(w)[:k] for _ in range(t)])  # [T, K]
    return index.to(device), (torch.rand(t, k) * 0.9 + 0.1).to(device)


def oracle(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
           stacks: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The reference in float64 on the CPU on the same (rounded) values, hidden first cast to the
    weights' dtype as the kernel and `gathered_experts` do."""
    x = hidden.to(stacks[0].dtype).cpu().double()
    return moe_experts_reference(x, index.cpu(), weights.cpu(),
                                 *(s.cpu().double() for s in stacks))


def assert_near(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Largest error within `rtol` of the largest magnitude (sums of many products cancel
    elementwise). Not `torch.testing.assert_close`: its first call imports DTensor (seconds)."""
    assert actual.shape == expected.shape
    err = (actual.cpu().double() - expected.double()).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} * {scale:.3g}"


@pytest.mark.parametrize(("t", "k", "d", "i", "w"), [(3, 2, 40, 24, 5), (1, 6, 64, 48, 9)])
def test_float32_pool_views_match_the_reference(device: torch.device, t: int, k: int, d: int,
                                                i: int, w: int) -> None:
    torch.manual_seed(t * 100 + k)
    stacks = pool_views(w, d, i, torch.float32, device)
    hidden = torch.randn(t, d, device=device)
    index, weights = routed(t, k, w, device)
    assert moe_experts_supported(hidden, stacks[0])
    out = moe_experts(hidden, index, weights, *stacks)
    assert out.shape == (t, d) and out.dtype == torch.float32
    assert_near(out, oracle(hidden, index, weights, stacks), rtol=1e-5)


def test_gate_and_up_as_halves_of_one_view_and_shared_experts(device: torch.device) -> None:
    torch.manual_seed(1)
    t, k, d, i, w = 4, 2, 32, 16, 3
    layout = ExpertLayout(hidden_size=d, intermediate_size=i, dtype=torch.float32)
    rows = torch.randn(w, layout.numel, device=device)
    gate_up, down = layout.grouped_views(rows)  # [W, 2I, D], [W, D, I]
    gate, up = gate_up[:, :i], gate_up[:, i:]
    hidden = torch.randn(t, d, device=device)
    index = torch.tensor([[0, 2], [2, 0], [1, 1], [2, 2]], device=device)  # shared, repeated
    weights = torch.rand(t, k, dtype=torch.float64, device=device)  # any float dtype
    out = moe_experts(hidden, index, weights, gate, up, down)
    assert_near(out, oracle(hidden, index, weights, (gate, up, down)), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_near_the_float64_oracle(device: torch.device,
                                                      dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    t, k, d, i, w = 2, 4, 48, 40, 6
    stacks = pool_views(w, d, i, dtype, device)
    hidden = torch.randn(t, d).to(device, dtype)
    index, weights = routed(t, k, w, device)
    out = moe_experts(hidden, index, weights, *stacks)
    assert out.dtype == dtype
    assert_near(out, oracle(hidden, index, weights, stacks), rtol=1e-2)


def test_float32_hidden_is_rounded_to_the_weights_dtype_first(device: torch.device) -> None:
    torch.manual_seed(3)
    t, k, d, i, w = 2, 2, 32, 16, 4
    stacks = pool_views(w, d, i, torch.float16, device)
    hidden = torch.randn(t, d, device=device)
    index, weights = routed(t, k, w, device)
    out = moe_experts(hidden, index, weights, *stacks)
    assert out.dtype == torch.float32
    assert_near(out, oracle(hidden, index, weights, stacks), rtol=1e-5)


def test_results_are_deterministic(device: torch.device) -> None:
    torch.manual_seed(4)
    stacks = pool_views(5, 32, 24, torch.float32, device)
    hidden = torch.randn(3, 32, device=device)
    index, weights = routed(3, 3, 5, device)
    first = moe_experts(hidden, index, weights, *stacks)
    assert torch.equal(first, moe_experts(hidden, index, weights, *stacks))


def test_unsupported_layouts_fall_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # a request for Triton; the checks refuse it
    torch.manual_seed(5)
    cpu = torch.device("cpu")
    gate, up, _ = pool_views(4, 16, 8, torch.float32, cpu)
    hidden = torch.randn(2, 16)
    index, weights = routed(2, 2, 4, cpu)
    assert not moe_experts_supported(hidden.double(), gate)
    assert not moe_experts_supported(hidden, torch.randn(4, 16, 8).transpose(1, 2))
    columns = torch.randn(4, 8, 16).transpose(1, 2)  # [W, D, I], last dim strided
    expected = moe_experts_reference(hidden, index, weights, gate, up, columns)
    assert torch.equal(moe_experts(hidden, index, weights, gate, up, columns), expected)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not moe_experts_supported(hidden, gate)  # CPU without the interpreter


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("tokens", [1, 4, 16, 64])
def test_launch_fills_an_h200_and_keeps_tiles_small(name: str, tokens: int) -> None:
    d, i, k, _ = TARGETS[name]
    cfg = experts_launch(tokens, k, d, i, sms=132)
    gate_up_programs = tokens * k * -(-i // cfg.block_i)
    down_programs = tokens * -(-d // cfg.block_out)
    assert gate_up_programs >= 4 * 132 and down_programs >= 4 * 132
    assert cfg.block_i * cfg.block_d <= 1024  # small tiles measured fastest
    assert cfg.block_k >= k and cfg.block_k * cfg.block_out * cfg.block_red <= 1024
    assert cfg.block_d >= 64 and cfg.block_red >= 32  # whole 32-byte sectors per row in bf16


def test_launch_sizes_must_be_powers_of_two() -> None:
    with pytest.raises(ValueError, match="block_red"):
        ExpertsLaunch(block_i=4, block_d=64, block_k=2, block_out=2, block_red=48)
