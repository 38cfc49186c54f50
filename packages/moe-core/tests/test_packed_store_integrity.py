"""Store-file integrity: every expert block carries a CRC-32 written at pack time, so damage
anywhere in a payload is refused on read with the file, layer and expert named, never run."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_core import CheckpointError, ExpertId
from moe_core.cli import app
from moe_core.offload.packed_store import read_header, read_packed
from moe_core.offload.packing import pack_model
from typer.testing import CliRunner

TINY = {"layers": 6, "experts": 16, "block_bytes": 245_760}  # tiny-moe, bf16: 3 * 160 * 256 * 2


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "tiny.moepack"
    pack_model("tiny-moe", out)  # the embedded model's real experts
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("damaged") / "damaged.moepack"


def damage(packed: Path, out: Path, expert: ExpertId, byte: int, mask: int) -> Path:
    """A copy of `packed` with one byte of `expert`'s block xor-ed with `mask`."""
    header = read_header(packed)
    raw = bytearray(packed.read_bytes())
    offset = header.offsets[header.moe_layers.index(expert.layer)]
    raw[offset + expert.expert * header.layout.nbytes + byte] ^= mask
    out.write_bytes(raw)
    return out


def test_the_header_holds_each_blocks_crc32(packed: Path) -> None:
    header = read_header(packed)
    assert header.layout.nbytes == TINY["block_bytes"]
    store = read_packed(packed)
    for expert in store.experts():
        row = header.checksums[header.moe_layers.index(expert.layer)]
        raw = store.block(expert).view(torch.uint8).numpy()
        assert row[expert.expert] == zlib.crc32(raw.tobytes())


@settings(max_examples=25, deadline=None)
@given(layer=st.integers(0, TINY["layers"] - 1), expert=st.integers(0, TINY["experts"] - 1),
       byte=st.integers(0, TINY["block_bytes"] - 1), mask=st.integers(1, 255))
def test_any_damaged_byte_is_refused_naming_its_file_layer_and_expert(
        packed: Path, scratch: Path, layer: int, expert: int, byte: int, mask: int) -> None:
    bad = damage(packed, scratch, ExpertId(layer, expert), byte, mask)
    with pytest.raises(CheckpointError) as info:
        read_packed(bad)
    assert str(info.value).startswith(f"{bad}: layer {layer}, expert {expert} fails its "
                                      "checksum")
    assert "pack the model again" in str(info.value) and "\n" not in str(info.value)


def test_skipping_verification_reads_the_damaged_bytes(packed: Path, scratch: Path) -> None:
    bad = damage(packed, scratch, ExpertId(2, 5), 7, 0xFF)
    store, clean = read_packed(bad, verify=False), read_packed(packed)
    assert not torch.equal(store.block(ExpertId(2, 5)), clean.block(ExpertId(2, 5)))
    assert torch.equal(store.arena(3), clean.arena(3))


def test_generate_refuses_an_overwritten_store_in_one_line(packed: Path, tmp_path: Path) -> None:
    """The issue's case: a payload overwritten in place used to generate an empty answer."""
    header = read_header(packed)
    raw = bytearray(packed.read_bytes())
    start = header.offsets[1]
    raw[start : start + header.arena_bytes] = bytes(header.arena_bytes)  # layer 1 zeroed
    bad = tmp_path / "overwritten.moepack"
    bad.write_bytes(raw)
    args = ["generate", "-p", "Once upon a time", "--max-new-tokens", "4", "--expert-memory",
            "1MiB", "--store", str(bad)]
    unchecked = CliRunner().invoke(app, [*args, "--no-verify-store"])
    assert unchecked.exit_code == 0, unchecked.output  # the user's call: read as it is
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}: layer 1, expert 0 fails its checksum (stored "
        f"{header.checksums[1][0]:08x}, read {zlib.crc32(bytes(header.layout.nbytes)):08x}): "
        "the file is damaged; pack the model again"]
    assert result.stdout == ""
