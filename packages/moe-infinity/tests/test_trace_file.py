"""Trace and collection files: round trips, and every kind of bad file is refused with one clear
error naming the file."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from moe_infinity import (
    ModelShape,
    TraceCollection,
    TraceFileError,
    TraceSet,
    load_traces,
    save_traces,
)
from moe_infinity.container import FORMAT_VERSION, MAGIC

SyntheticTraces = Callable[..., TraceSet]  # the `synthetic` fixture (conftest.make_traces)


def _same(a: TraceSet, b: TraceSet) -> None:
    assert a.shape == b.shape and len(a) == len(b) and a.settings == b.settings
    for x, y in zip(a, b, strict=True):
        assert (x.request_id, x.domain) == (y.request_id, y.domain)
        np.testing.assert_array_equal(x.step_counts, y.step_counts)
        np.testing.assert_array_equal(x.lookahead, y.lookahead)
        np.testing.assert_array_equal(x.step_tokens, y.step_tokens)


def test_round_trip_of_real_traces(sample_traces: TraceSet, tmp_path: Path) -> None:
    _same(sample_traces, load_traces(save_traces(sample_traces, tmp_path / "t.bin")))


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_of_synthetic_traces(synthetic: SyntheticTraces, seed: int,
                                        tmp_path: Path) -> None:
    traces = synthetic(seed, num_requests=seed + 1, num_layers=2 + seed % 3)
    _same(traces, load_traces(save_traces(traces, tmp_path / "t.bin")))


def test_empty_trace_set_round_trips(synthetic: SyntheticTraces, tmp_path: Path) -> None:
    empty = TraceSet(synthetic(0).shape, [])
    assert len(load_traces(save_traces(empty, tmp_path / "t.bin"))) == 0


@pytest.fixture
def good_file(synthetic: SyntheticTraces, tmp_path: Path) -> Path:
    return save_traces(synthetic(1), tmp_path / "good.bin")


def _refused(path: Path, message: str) -> None:
    with pytest.raises(TraceFileError, match=message) as info:
        load_traces(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.bin", "cannot read")


def test_not_a_trace_file(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_text('{"prompt": "hello"}\n')
    _refused(path, "bad magic")
    path.write_bytes(b"")
    _refused(path, "bad magic")


def test_other_version(good_file: Path) -> None:
    blob = bytearray(good_file.read_bytes())
    blob[8:12] = struct.pack("<I", FORMAT_VERSION + 1)
    good_file.write_bytes(bytes(blob))
    _refused(good_file, f"version {FORMAT_VERSION + 1}")


def test_truncated_file(good_file: Path) -> None:
    good_file.write_bytes(good_file.read_bytes()[:-7])
    _refused(good_file, "truncated")
    good_file.write_bytes(MAGIC + struct.pack("<II", FORMAT_VERSION, 10_000) + b"{")
    _refused(good_file, "corrupt header")


def test_flipped_payload_byte(good_file: Path) -> None:
    blob = bytearray(good_file.read_bytes())
    blob[-3] ^= 0xFF
    good_file.write_bytes(bytes(blob))
    _refused(good_file, "checksum")


def test_payload_that_does_not_decompress(good_file: Path) -> None:
    blob = good_file.read_bytes()
    (header_len,) = struct.unpack("<I", blob[12:16])
    header = json.loads(blob[16 : 16 + header_len])
    junk = b"not a zlib stream"
    header.update(payload_bytes=len(junk), payload_crc32=zlib.crc32(junk))
    raw = json.dumps(header).encode()
    good_file.write_bytes(blob[:12] + struct.pack("<I", len(raw)) + raw + junk)
    _refused(good_file, "does not decompress")


def test_collection_file_is_not_a_trace_file(tmp_path: Path) -> None:
    shape = ModelShape("m", (0, 1), 4, 2, 10)
    path = TraceCollection(shape, 2).save(tmp_path / "c.bin")
    _refused(path, "expected a traces file")


def test_collection_round_trip_and_model_check(tmp_path: Path) -> None:
    shape = ModelShape("m", (0, 1), 4, 2, 10)
    collection = TraceCollection(shape, 3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        collection.add(rng.integers(1, 9, size=(2, 4)))
    path = collection.save(tmp_path / "c.bin")
    loaded = TraceCollection.load(path, expect=shape)
    assert loaded.capacity == 3 and len(loaded) == 3
    np.testing.assert_array_equal(loaded.counts, collection.counts)
    query = rng.integers(0, 5, size=(2, 4))
    np.testing.assert_allclose(loaded.similarities(query), collection.similarities(query))
    other = ModelShape("other", (0, 1, 2), 4, 2, 10)
    with pytest.raises(TraceFileError, match="not for other"):
        TraceCollection.load(path, expect=other)
    with pytest.raises(TraceFileError, match="expected a collection file"):
        TraceCollection.load(save_traces(TraceSet(shape, []), tmp_path / "t.bin"))
