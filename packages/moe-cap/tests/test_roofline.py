"""Time bounds, tokens/s ceilings and the share of experts a GPU budget leaves in host memory."""

from __future__ import annotations

import pytest
from moe_cap import (
    HardwareTable,
    PeakRates,
    decode_batch,
    host_expert_share,
    metrics_sweep,
    step_bounds,
    step_cost,
)
from moe_core import ModelSpec


def test_mixtral_decode_on_h200(mixtral: ModelSpec, table: HardwareTable) -> None:
    cost = step_cost(mixtral, decode_batch(1, 1024))
    b = step_bounds(cost, PeakRates.of(table.gpu("H200"), "bf16"))
    # 25,632,063,488 B / 4.8e12 B/s = 5.340 ms; 26.03 GFLOP / 989.4e12 = 0.0263 ms.
    assert b.memory_s == pytest.approx(5.34001e-3, rel=1e-5)
    assert b.compute_s == pytest.approx(2.6313e-5, rel=1e-4)
    assert b.limit == "memory" and b.tokens_per_s == pytest.approx(187.27, rel=1e-4)


def test_host_expert_share_qwen3_16gib(qwen3: ModelSpec) -> None:
    # Qwen3-30B-A3B x 24 layers, 16 GiB: dense 2 * 1,541,093,376 B less 24 layers' attention...
    spec = qwen3.truncated(24)
    dense = spec.dense_bytes("bfloat16")
    kv = 512 * 24 * 1024 * 2
    free = 16 * 2**30 - dense - kv
    slots = free // spec.expert_bytes("bfloat16")
    share = host_expert_share(spec, 16 * 2**30, kv)
    assert share == pytest.approx(1 - slots / (128 * 24))
    assert 0.4 < share < 0.5  # about half the experts stay in host memory
    assert host_expert_share(spec, 200 * 2**30, kv) == 0.0
    with pytest.raises(ValueError, match="exceed the GPU memory budget"):
        host_expert_share(spec, 2**30, kv)


def test_sweep_offload_is_pcie_bound(qwen3: ModelSpec, table: HardwareTable) -> None:
    rows = metrics_sweep(qwen3.truncated(24), [1, 64], 512, table.gpu("H200"),
                         peaks="measured", gpu_memory_bytes=16 * 2**30)
    assert [(r.phase, r.batch) for r in rows] == [("prefill", 1), ("decode", 1),
                                                  ("prefill", 64), ("decode", 64)]
    decode1 = rows[1]
    assert decode1.bounds.limit == "pcie"
    # DESIGN.md: ~0.83 GB of missed experts per token at batch 1 -> ~15 ms at 54.7 GB/s.
    assert 0.8e9 < decode1.h2d_bytes < 0.95e9
    assert decode1.bounds.pcie_s == pytest.approx(decode1.h2d_bytes / 54.7e9)
    assert rows[3].cost.experts.mean_expected > 120


def test_sweep_rejects_bad_sizes(mixtral: ModelSpec, table: HardwareTable) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        metrics_sweep(mixtral, [0], 16, table.gpu("H200"))
