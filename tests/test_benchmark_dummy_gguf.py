"""`benchmarks/dummy_gguf.py` and `--gguf-type q8_0`: Q8_0 blocks byte for byte as llama.cpp's
`quantize_row_q8_0_ref` makes them, the tensors llama.cpp's quantizer keeps in float32, the
file read back by a minimal GGUF reader (types, shapes, offsets, alignment, size: what
llama.cpp's loader checks), and the `--n-cpu-moe` that `benchmarks/llama_peer.py` derives from a
GPU weight budget. Loading the file in llama.cpp itself needs a build: llama_peer.py --smoke."""

from __future__ import annotations

import math
import struct
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch
from moe_core import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import dummy_gguf  # noqa: E402
from ggml_q8_0 import BLOCK_BYTES, dequantize_q8_0, quantize_q8_0  # noqa: E402
from llama_placement import expert_layer, gpu_weight_bytes, n_cpu_moe_for  # noqa: E402

GGML_F32, GGML_Q8_0, GGML_BF16 = 0, 8, 30
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: the writer sets no general.alignment


def reference_q8_0(values: np.ndarray) -> bytes:
    """ggml-quants.c's quantize_row_q8_0_ref, one block and one value at a time (float32)."""
    out = bytearray()
    for block in values.astype(np.float32).reshape(-1, 32):
        amax = np.float32(max(abs(float(v)) for v in block))
        d = np.float32(amax / np.float32(127))
        inverse = np.float32(1) / d if d else np.float32(0)
        out += struct.pack("<e", float(d))
        for v in block:
            x0 = float(np.float32(v) * inverse)
            out += struct.pack("<b", int(math.copysign(math.floor(abs(x0) + 0.5), x0)))
    return bytes(out)


def test_q8_0_blocks_are_the_reference_bytes() -> None:
    x = torch.randn(64 * 32, generator=torch.Generator().manual_seed(0)) * 0.02
    x[:32] = 0  # d = 0: every quant 0
    x[32:64] = torch.tensor([0.5, -0.5, 2.5, -2.5] * 8) * (127 / 2.5)  # halves: away from zero
    blocks = quantize_q8_0(x, chunk_blocks=7)  # chunks that do not divide the blocks
    assert blocks.shape == (64, BLOCK_BYTES) and blocks.dtype == np.uint8
    assert blocks.tobytes() == reference_q8_0(x.numpy())
    back = dequantize_q8_0(blocks)
    scales = blocks[:, :2].copy().view("<f2").astype(np.float32)[:, 0]
    error = np.abs(back - x.numpy()).reshape(-1, 32).max(axis=1)
    assert np.all(error <= scales * 0.5 + np.abs(x.numpy()).reshape(-1, 32).max(axis=1) * 1e-3)


def test_q8_0_plan_quantises_what_llama_quantize_does() -> None:
    spec = dummy_gguf.smoke_spec()
    bf16 = dummy_gguf.tensor_plan(spec)
    q8 = dummy_gguf.tensor_plan(spec, "q8_0")
    assert [t.name for t in q8] == [t.name for t in bf16]
    for a, b in zip(bf16, q8, strict=True):
        assert a.shape == b.shape
        if a.fill == "bf16":  # every weight matrix, token embedding and LM head too
            assert b.fill == "q8_0" and b.nbytes == a.num_elements // 32 * 34
        else:  # norms (1-D) and routers stay float32
            assert b.fill == a.fill in ("ones", "router") and b.nbytes == a.nbytes
    assert {t.fill for t in bf16} == {"bf16", "ones", "router"}
    with pytest.raises(ValueError, match="gguf_type"):
        dummy_gguf.tensor_plan(spec, "q4_0")


def _small_spec() -> ModelSpec:
    """The smoke shape with a 2,048-token vocabulary (it still holds every prompt word)."""
    config = dummy_gguf.shipped_config("qwen3-30b-a3b")
    config.update(hidden_size=64, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_window_layers=2, vocab_size=2048)
    return ModelSpec.from_config(config)


# GGUF's value types: the fixed-size ones (8 is a string, 9 an array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}


class Reader:
    """Just enough of GGUF v3 to check a file: the key-values and the tensor infos."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def scalar(self, fmt: str) -> int | float | bool:
        return struct.unpack(fmt, self.f.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.f.read(int(self.scalar("<Q"))).decode("utf-8")

    def value(self, kind: int) -> object:
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = int(self.scalar("<I")), int(self.scalar("<Q"))
            return [self.value(item) for _ in range(count)]
        return self.scalar(_SCALARS[kind])


def read_gguf(path: Path) -> tuple[dict[str, object], list[tuple[str, tuple[int, ...], int, int]],
                                   int]:
    """Key-values, tensor infos (name, ne with ne[0] innermost, type, offset), data start."""
    with path.open("rb") as f:
        r = Reader(f)
        assert f.read(4) == b"GGUF" and r.scalar("<I") == 3
        num_tensors, num_kv = int(r.scalar("<Q")), int(r.scalar("<Q"))
        kv = {}
        for _ in range(num_kv):
            key = r.string()
            kv[key] = r.value(int(r.scalar("<I")))
        infos = []
        for _ in range(num_tensors):
            name = r.string()
            ne = tuple(int(r.scalar("<Q")) for _ in range(int(r.scalar("<I"))))
            infos.append((name, ne, int(r.scalar("<I")), int(r.scalar("<Q"))))
        start = -(-f.tell() // ALIGNMENT) * ALIGNMENT
    return kv, infos, start


def _nbytes(ne: tuple[int, ...], kind: int) -> int:
    """ggml_nbytes: Q8_0 34 bytes per block of 32 along ne[0], which must be whole blocks."""
    n = math.prod(ne)
    if kind == GGML_Q8_0:
        assert ne[0] % 32 == 0
        return n // 32 * 34
    return n * {GGML_F32: 4, GGML_BF16: 2}[kind]


@pytest.mark.slow
def test_written_q8_0_gguf_reads_back_as_llama_cpp_expects(tmp_path: Path) -> None:
    pytest.importorskip("gguf", reason="the writer needs gguf (.peer/wheels, llama_peer_pack.py)")
    from moe_cap import SYNTHETIC_WORDS

    spec = _small_spec()
    files = {t: tmp_path / f"{t}.gguf" for t in ("bf16", "q8_0")}
    for t, path in files.items():
        size = dummy_gguf.write_gguf(spec, path, SYNTHETIC_WORDS, seed=3, log=False, gguf_type=t)
        assert size == path.stat().st_size
    kv, infos, start = read_gguf(files["q8_0"])
    assert kv["general.architecture"] == "qwen3moe" and kv["general.file_type"] == 7
    assert "general.alignment" not in kv and kv["qwen3moe.block_count"] == 2
    plan = dummy_gguf.tensor_plan(spec, "q8_0")
    assert [i[0] for i in infos] == [t.name for t in plan]
    offset = 0
    for (name, ne, kind, at), t in zip(infos, plan, strict=True):
        assert ne == t.shape[::-1], name  # GGUF lists ne[0], the row, first
        assert kind == {"q8_0": GGML_Q8_0, "ones": GGML_F32, "router": GGML_F32}[t.fill], name
        assert at == offset and _nbytes(ne, kind) == t.nbytes, name
        offset += -(-t.nbytes // ALIGNMENT) * ALIGNMENT
    assert files["q8_0"].stat().st_size == start + offset
    assert offset == sum(-(-t.nbytes // ALIGNMENT) * ALIGNMENT for t in plan)

    # The same draws as the bf16 file, 8-bit: finite, N(0, 0.02), within half a step of them.
    _, bf16_infos, bf16_start = read_gguf(files["bf16"])
    offsets = {i[0]: i[3] for i in infos}
    bf16_offsets = {i[0]: i[3] for i in bf16_infos}
    for t in plan:
        if t.name not in ("blk.1.ffn_down_exps.weight", "output.weight"):
            continue
        blocks = np.fromfile(files["q8_0"], np.uint8, t.nbytes, offset=start + offsets[t.name])
        values = dequantize_q8_0(blocks)
        scales = blocks.reshape(-1, 34)[:, :2].copy().view("<f2").astype(np.float32)
        assert np.all(np.isfinite(values)) and np.all(scales > 0)
        assert 0.018 < values.std() < 0.022 and np.abs(values).max() < 0.2
        bits = np.fromfile(files["bf16"], np.uint16, t.num_elements,
                           offset=bf16_start + bf16_offsets[t.name])
        reference = (bits.astype(np.uint32) << 16).view(np.float32)
        step = np.repeat(scales[:, 0], 32)
        assert np.all(np.abs(values - reference) <= step * 0.51 + np.abs(reference) / 128)


def test_n_cpu_moe_counts_the_files_own_bytes() -> None:
    spec = dummy_gguf.load_spec("qwen3-30b-a3b", 24, smoke=False)
    bf16, q8 = dummy_gguf.tensor_plan(spec), dummy_gguf.tensor_plan(spec, "q8_0")
    assert expert_layer("blk.7.ffn_up_exps.weight") == 7
    assert expert_layer("blk.7.ffn_gate_inp.weight") is None
    gib = 2**30
    # The S3 runs: --n-cpu-moe 11 keeps 16.07 GiB of bf16 weights on the GPU (13 layers of
    # experts at 1.125 GiB, attention, routers, norms, the LM head; the embedding stays home).
    assert n_cpu_moe_for(bf16, 24, int(16.1 * gib)) == 11
    assert gpu_weight_bytes(bf16, 11) == pytest.approx(16.07 * gib, rel=1e-3)
    assert n_cpu_moe_for(bf16, 24, 16 * gib) == 12
    # Q8_0: 0.60 GiB of experts per layer; the whole model (15.12 GiB) fits the same budget.
    assert gpu_weight_bytes(q8, 0) - gpu_weight_bytes(q8, 1) == 3 * 128 * 768 * 2048 // 32 * 34
    assert n_cpu_moe_for(q8, 24, int(16.1 * gib)) == 0
    assert n_cpu_moe_for(q8, 24, 15 * gib) == 1
    with pytest.raises(ValueError, match="every layer"):
        n_cpu_moe_for(q8, 24, gib // 2)
