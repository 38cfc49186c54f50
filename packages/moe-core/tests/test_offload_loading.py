"""Store files (`moe-core pack`), dense-only loading and `load_offloaded` (CPU, fast)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from moe_core import CheckpointError, ExpertId, load_model, parse_bytes
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.loading import dense_bytes, load_offloaded
from moe_core.offload.packed_store import ALIGNMENT, read_header, read_packed, write_packed
from moe_core.offload.packing import pack_model
from moe_core.tiny_checkpoints import build_tiny_checkpoint
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("ckpt") / "qwen3")


@pytest.fixture(scope="module")
def packed(qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "experts.moepack"
    pack_model(qwen3, out)
    return out


def edit_header(raw: bytes, **changes: object) -> bytes:
    """A store file's bytes with header fields changed (the header must not grow)."""
    length = struct.unpack("<Q", raw[8:16])[0]
    data = {**json.loads(raw[16 : 16 + length]), **changes}
    prefix = raw[:8] + struct.pack("<Q", len(body := json.dumps(data).encode())) + body
    assert len(prefix) <= 16 + length
    return prefix + bytes(16 + length - len(prefix)) + raw[16 + length :]


def assert_same_store(a: HostExpertStore, b: HostExpertStore) -> None:
    assert a.layout == b.layout and a.moe_layers == b.moe_layers
    for expert in a.experts():
        assert torch.equal(a.block(expert), b.block(expert)), expert


def test_packed_file_round_trips_every_expert(qwen3: Path, packed: Path) -> None:
    header = read_header(packed)
    assert all(offset % ALIGNMENT == 0 for offset in header.offsets)
    assert packed.stat().st_size == header.file_bytes
    assert_same_store(read_packed(packed), HostExpertStore.from_checkpoint(qwen3))
    assert not packed.with_name(packed.name + ".partial").exists()


def test_progress_reaches_the_total(qwen3: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    pack_model(qwen3, tmp_path / "p.moepack", progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] > 0
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda raw: b"NOTAPACK" + raw[8:], "bad magic"),
    (lambda raw: raw[:-100], "truncated"),
    (lambda raw: raw[:40], "header"),
    (lambda raw: edit_header(raw, version=9), "version 9"),
    (lambda raw: edit_header(raw, version=1),
     r"version 1 \(without checksums\).*pack the model again \(moe-core pack MODEL bad.moepack\)"),
    (lambda raw: edit_header(raw, checksums=[]), "corrupt expert store header .*checksums"),
    (lambda raw: edit_header(raw, checksums=None), "corrupt expert store header"),
])
def test_damaged_files_are_rejected_with_a_reason(packed: Path, tmp_path: Path, damage,  # type: ignore[no-untyped-def]
                                                   message: str) -> None:
    bad = tmp_path / "bad.moepack"
    bad.write_bytes(damage(packed.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        read_packed(bad)


def test_an_interrupted_pack_leaves_no_file(tmp_path: Path) -> None:
    from moe_core.offload.layout import ExpertLayout

    layout = ExpertLayout(8, 4, torch.float32)

    def arena_of(layer: int) -> torch.Tensor:
        if layer == 1:
            raise KeyboardInterrupt
        return torch.zeros(2 * layout.numel)

    with pytest.raises(KeyboardInterrupt):
        write_packed(tmp_path / "x.moepack", layout, [0, 1], 2, arena_of)
    assert not (tmp_path / "x.moepack").exists()


def test_dense_only_loading_allocates_no_experts(qwen3: Path) -> None:
    whole = load_model(qwen3)
    dense = load_model(qwen3, load_experts=False)
    assert all(p.numel() == 0 for b in dense.moe_blocks() for p in b.experts.parameters())
    ours = dict(dense.named_parameters())
    for name, param in whole.named_parameters():
        if ".experts." not in name:
            assert torch.equal(param, ours[name]), name
    assert dense_bytes(dense) == dense_bytes(whole)
    assert sum(p.numel() for p in dense.parameters()) * 4 == dense_bytes(dense) or \
        dense.spec.tie_word_embeddings


def test_fused_expert_checkpoint_packs_the_same_store(qwen3: Path, tmp_path: Path) -> None:
    ref = AutoModelForCausalLM.from_pretrained(qwen3)
    ref.save_pretrained(tmp_path / "native", save_original_format=False)
    assert_same_store(HostExpertStore.from_checkpoint(tmp_path / "native"),
                      HostExpertStore.from_checkpoint(qwen3))


def test_from_checkpoint_picks_layers_and_refuses_dense_ones(qwen3: Path) -> None:
    store = HostExpertStore.from_checkpoint(qwen3, layers=[1])
    assert store.moe_layers == (1,)
    whole = HostExpertStore.from_checkpoint(qwen3)
    assert torch.equal(store.arena(1), whole.arena(1))
    with pytest.raises(ValueError, match="not MoE layers"):
        HostExpertStore.from_checkpoint(qwen3, layers=[99])


@pytest.mark.parametrize("source", ["checkpoint", "packed"])
def test_offloaded_model_equals_the_whole_model(qwen3: Path, packed: Path, source: str) -> None:
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = load_model(qwen3)(ids)
    layout_bytes = HostExpertStore.from_checkpoint(qwen3).layout.nbytes
    loaded = load_offloaded(qwen3, "cpu", 3 * layout_bytes,
                            store=packed if source == "packed" else None)
    assert loaded.runtime.pool.num_slots == 3
    torch.testing.assert_close(loaded.model(ids), expected, rtol=1e-5, atol=1e-5)
    stats = loaded.runtime.summary()
    assert stats["misses"] > 0 and stats["expert_uses"] == stats["hits"] + stats["misses"]


def test_dummy_offloaded_model_equals_the_dummy_model_on_cpu() -> None:
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    expected = load_model("tiny-moe", dtype="float32", dummy=True, seed=0)(ids)
    loaded = load_offloaded("tiny-moe", "cpu", parse_bytes("4MiB"), dtype="float32", dummy=True)
    torch.testing.assert_close(loaded.model(ids), expected, rtol=1e-5, atol=1e-5)


def test_a_store_of_another_model_is_refused(packed: Path) -> None:
    with pytest.raises(ValueError, match="the model needs"):
        load_offloaded("tiny-moe", "cpu", parse_bytes("4MiB"), store=packed)


def test_a_budget_below_top_k_slots_is_refused(qwen3: Path) -> None:
    block = HostExpertStore.from_checkpoint(qwen3).layout.nbytes
    with pytest.raises(ValueError, match="needs at least 2"):
        load_offloaded(qwen3, "cpu", block)


def test_known_shape_needs_dummy_to_pack(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--dummy"):
        pack_model("qwen3-30b-a3b", tmp_path / "x.moepack")


def test_dummy_pack_is_seeded(tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{n}.moepack" for n in "abc")
    pack_model("tiny-moe", a, dummy=True, num_layers=2, seed=3)
    pack_model("tiny-moe", b, dummy=True, num_layers=2, seed=3)
    pack_model("tiny-moe", c, dummy=True, num_layers=2, seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    store = read_packed(a)
    assert store.moe_layers == (0, 1)
    assert store.block(ExpertId(1, 3)).float().std() > 0
