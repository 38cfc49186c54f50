"""Eager decode passes from kept slots: over any run of steps (the same rows a token further,
rows joining and leaving, other lengths), every tensor equals `RaggedPass`'s for the same rows,
and the model computes the same logits through them."""

from __future__ import annotations

import moe_core
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_core import MoEForCausalLM
from moe_infinity.serving.block_allocator import BlockAllocator
from moe_infinity.serving.decode_passes import DecodePasses
from moe_infinity.serving.kv_pool import KVPool
from moe_infinity.serving.ragged_pass import PassRow, RaggedPass
from moe_infinity.serving.step_pass import run_pass

_FIELDS = ("input_ids", "valid", "positions", "last", "row_of_token", "_past_slots",
           "_new_slots", "_valid_index", "_key_pos", "_key_valid")
_SPEC = moe_core.ModelSpec.from_pretrained(moe_core.tiny_model_path())


def _assert_same(got: RaggedPass, want: RaggedPass) -> None:
    for name in _FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (got.num_cached, got.num_rows, got.num_tokens) == (
        want.num_cached, want.num_rows, want.num_tokens)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_decode_passes_hold_the_ragged_passes_tensors(data: st.DataObject) -> None:
    pool = KVPool(_SPEC, 32, 4, torch.float32, "cpu")
    allocator = BlockAllocator(32, 4)
    tables = [allocator.allocate(data.draw(st.integers(1, 24))) for _ in range(5)]
    passes = DecodePasses(pool)
    rows: list[PassRow] = []
    for _ in range(data.draw(st.integers(1, 10))):
        capacity = [len(t or []) * 4 for t in tables]
        if rows and data.draw(st.booleans()):  # the same rows, a token further where they can
            rows = [PassRow(r.table, min(r.num_cached + 1, len(r.table) * 4 - 1), [r.num_cached])
                    for r in rows]
        else:
            picked = data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=4, unique=True))
            rows = [PassRow(tables[i] or [], data.draw(st.integers(0, capacity[i] - 1)),
                            [data.draw(st.integers(0, 99))]) for i in picked]
        _assert_same(passes.build(rows, torch.device("cpu")),
                     RaggedPass(rows, pool, torch.device("cpu")))


def test_a_prompt_chunk_is_a_plain_ragged_pass() -> None:
    pool = KVPool(_SPEC, 8, 4, torch.float32, "cpu")
    rows = [PassRow([0, 1], 2, [5, 6, 7])]
    built = DecodePasses(pool).build(rows, torch.device("cpu"))
    assert type(built) is RaggedPass
    _assert_same(built, RaggedPass(rows, pool, torch.device("cpu")))


def test_decoding_through_kept_slots_gives_the_models_logits(tiny: MoEForCausalLM) -> None:
    """Two rows of different lengths decode three steps each through the kept slots: the
    logits are bitwise those of the same steps through `RaggedPass`, over twin pools."""
    pools = [KVPool(tiny.spec, 16, 8, tiny.dtype, "cpu") for _ in range(2)]
    allocator = BlockAllocator(16, 8)
    a, b = list(range(5, 30)), list(range(100, 109))
    ta, tb = allocator.allocate(40), allocator.allocate(24)
    assert ta is not None and tb is not None
    for pool in pools:
        run_pass(tiny, RaggedPass([PassRow(ta, 0, a), PassRow(tb, 0, b)], pool, tiny.device),
                 pool)
    passes = DecodePasses(pools[0])
    for step in range(3):
        rows = [PassRow(ta, len(a) + step, [7 + step]), PassRow(tb, len(b) + step, [9])]
        got = run_pass(tiny, passes.build(rows, tiny.device), pools[0])
        want = run_pass(tiny, RaggedPass(rows, pools[1], tiny.device), pools[1])
        assert torch.equal(got, want)
