"""FP8 expert stores: e4m3 with a scale per output channel, in blocks, in packed files, and run
by the streaming executor (dequantised before the products); the on-demand path's FP8 is in
test_fp8_on_demand.py."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_core import (
    FP8,
    CpuCopyEngine,
    ExpertLayout,
    GpuSlotPool,
    HostExpertStore,
    install_offloading,
    load_model,
    tiny_model_path,
)
from moe_core.cli import app
from moe_core.offload.fp8 import FP8_MAX, dequantize_rows, quantize_rows
from moe_core.offload.packed_store import read_header, read_packed
from moe_core.offload.packing import pack_model
from typer.testing import CliRunner

# e4m3 keeps 3 mantissa bits: in the top binade [256, 448] of a scaled row the step is 32, so a
# weight is off by at most 16 / 448 of its row's largest magnitude (finer below).
ROW_BOUND = 16 / FP8_MAX


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), magnitude=st.sampled_from([1e-4, 1, 1e3]),
       seed=st.integers(0, 2**31))
def test_round_trip_error_is_bounded_per_row(rows: int, cols: int, magnitude: float,
                                             seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * magnitude
    w[0] *= 1e-3  # rows of very different magnitudes keep their own resolution
    q, scale = quantize_rows(w)
    assert q.dtype == FP8 and scale.shape == (rows,)
    back = dequantize_rows(q, scale, torch.float32)
    amax = w.abs().amax(dim=1, keepdim=True)
    assert ((back - w).abs() <= ROW_BOUND * amax * (1 + 1e-6) + 1e-30).all()
    # The largest weight of each row lands on e4m3's largest value: back to itself.
    torch.testing.assert_close(back.abs().amax(dim=1, keepdim=True), amax, rtol=1e-6, atol=0)


def test_zero_rows_stay_zero() -> None:
    q, scale = quantize_rows(torch.zeros(2, 8))
    assert torch.isfinite(scale).all()
    assert torch.equal(dequantize_rows(q, scale, torch.bfloat16), torch.zeros(2, 8,
                                                                              dtype=torch.bfloat16))


def test_fp8_blocks_hold_weights_then_scales() -> None:
    layout = ExpertLayout(6, 5, FP8)  # 3 * 5 * 6 = 90 bytes of weights, rounded up to 92
    assert layout.is_fp8 and layout.numel == 92 + 4 * (2 * 5 + 6)
    assert not ExpertLayout(6, 5, torch.bfloat16).is_fp8
    gate, up, down = torch.randn(5, 6), torch.randn(5, 6) * 10, torch.randn(6, 5) * 1e-2
    blocks = torch.empty(2, layout.numel, dtype=FP8)
    layout.pack(gate, up, down, blocks[1])
    scales = layout.scale_views(blocks[1])
    for w, s in zip((gate, up, down), scales, strict=True):
        torch.testing.assert_close(s, w.abs().amax(dim=1) / FP8_MAX)
    gate_up, dn = layout.dequantized_grouped(blocks[1:], torch.float32)
    for got, want in ((gate_up[0, :5], gate), (gate_up[0, 5:], up), (dn[0], down)):
        assert ((got - want).abs() <= ROW_BOUND * want.abs().amax(1, keepdim=True) + 1e-12).all()
    with pytest.raises(ValueError, match="no scales"):
        ExpertLayout(6, 5, torch.bfloat16).scale_views(torch.empty(90, dtype=torch.bfloat16))


def test_an_fp8_store_stays_fp8() -> None:
    model = load_model(tiny_model_path(), dtype="float32")
    store = HostExpertStore.from_model(model, dtype=FP8, pin=False)
    assert store.layout.is_fp8
    with pytest.raises(ValueError, match="stays FP8"):
        store.to_dtype(torch.float32)


def dequantised_model() -> torch.nn.Module:
    """The embedded model with each expert's weights replaced by their FP8 round trip."""
    model = load_model(tiny_model_path(), dtype="float32")
    with torch.no_grad():
        for block in model.moe_blocks():
            for p in block.experts.parameters():
                p.copy_(dequantize_rows(*quantize_rows(p), torch.float32))
    return model


def test_streamed_fp8_experts_compute_what_their_dequantised_weights_do() -> None:
    model = load_model(tiny_model_path(), dtype="float32")
    store = HostExpertStore.from_model(model, dtype=FP8, pin=False)
    experts = store.experts()
    pool = GpuSlotPool(store.layout, 6, "cpu")
    runtime = install_offloading(model, store, pool, CpuCopyEngine(), kind="streaming",
                                 resident=experts[:: len(experts) // 4], ring_size=2,
                                 drop_local_experts=True)
    ids = torch.tensor([[3, 17, 29, 41, 5, 8, 13, 21, 34, 55, 89, 144]])
    with torch.no_grad():
        got = model(ids)
        want = dequantised_model()(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert runtime.summary()["misses"] > 0  # experts crossed the (CPU) ring as FP8 blocks
    assert runtime.stats.bytes_copied % store.layout.nbytes == 0


@pytest.fixture(scope="module")
def fp8_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp8") / "experts.moepack"
    pack_model("tiny-moe", out, dtype="float32", expert_dtype="fp8")
    return out


def test_packed_fp8_file_carries_dtype_and_scales(fp8_file: Path) -> None:
    header = read_header(fp8_file)
    assert (header.version, header.dtype, header.scales) == (3, "float8_e4m3fn",
                                                             "per_output_channel")
    store = read_packed(fp8_file, pin=False)
    direct = HostExpertStore.from_model(load_model(tiny_model_path(), dtype="float32"),
                                        dtype=FP8, pin=False)
    assert store.layout == direct.layout
    for layer in store.moe_layers:  # the file holds exactly the in-memory quantisation
        assert torch.equal(store.arena(layer).view(torch.uint8),
                           direct.arena(layer).view(torch.uint8))


def test_other_dtypes_are_still_written_and_read_as_version_2(tmp_path: Path) -> None:
    out = tmp_path / "bf16.moepack"
    pack_model("tiny-moe", out, dtype="bfloat16")
    assert read_header(out).version == 2 and read_header(out).scales == ""
    assert read_packed(out, pin=False).layout.dtype == torch.bfloat16


def test_an_unknown_scale_scheme_is_refused(fp8_file: Path, tmp_path: Path) -> None:
    data = bytearray(fp8_file.read_bytes())
    (length,) = struct.unpack("<Q", data[8:16])
    header = data[16 : 16 + length].replace(b'"per_output_channel"', b'"per_block_128x128_"')
    damaged = tmp_path / "other.moepack"
    damaged.write_bytes(bytes(data[:16] + header + data[16 + length :]))
    from moe_core import CheckpointError
    with pytest.raises(CheckpointError, match="scales"):
        read_header(damaged)


def test_pack_cli_writes_fp8_and_refuses_unknown_dtypes(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "e.moepack"
    result = runner.invoke(app, ["pack", "tiny-moe", str(out), "--expert-dtype", "fp8"])
    assert result.exit_code == 0, result.output
    assert "float8_e4m3fn experts" in result.output and read_header(out).version == 3
    bad = runner.invoke(app, ["pack", "tiny-moe", str(tmp_path / "x"), "--expert-dtype", "int4"])
    assert bad.exit_code != 0
    assert bad.output.strip().splitlines()[-1].startswith("error:")
    assert "fp8" in bad.output and not (tmp_path / "x").exists()


def test_generate_runs_an_fp8_store_on_demand_and_says_so(fp8_file: Path) -> None:
    result = CliRunner().invoke(app, ["generate", "--expert-memory", "1MiB", "--store",
                                      str(fp8_file), "-p", "hi", "--max-new-tokens", "2",
                                      "--fetch", "mapped"])
    assert result.exit_code == 0, result.output
    assert "experts: fp8 (e4m3, a float32 scale per output channel), dequantised to " \
           "float32" in result.stderr
    assert result.stdout.startswith("hi")
