"""Decoding with our KV cache: incremental passes agree with one full forward, and greedy
generation agrees token for token with transformers' `generate`.

Dimension key: B batch, T tokens, N new tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from moe_core import MoEForCausalLM, load_model
from moe_core.tiny_checkpoints import TINY_KINDS, build_tiny_checkpoint
from moe_core.tiny_checkpoints import ragged_batch as tiny_batch
from transformers import AutoModelForCausalLM

VOCAB = 96  # the tiny checkpoints' vocabulary
PAD = 0  # the tiny checkpoints' pad token
WIDTH = 12
LENGTHS = (12, 8, 5)

# Every architecture, plus a sliding window shorter than the decoded sequence (windowed keys then
# come from the cache).
DECODING_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    **{kind: (kind, {}) for kind in TINY_KINDS},
    "mixtral-sliding_window": ("mixtral", {"sliding_window": 4}),
}


def ragged_batch(side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The test batch: rows of `LENGTHS` real tokens, padded on `side` with random filler."""
    return tiny_batch(LENGTHS, WIDTH, side, seed=seed)


def relative_error(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """`‖ours − ref‖ / ‖ref‖` over the positions where `mask` `[B, T]` is 1."""
    ours, ref = ours[mask.bool()].double(), ref[mask.bool()].double()
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module", params=list(DECODING_CASES))
def model(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> MoEForCausalLM:
    """Our float32 model of each case, built once for this module."""
    kind, overrides = DECODING_CASES[request.param]
    return load_model(build_tiny_checkpoint(kind, tmp_path_factory.mktemp(request.param),
                                            **overrides), dtype="float32")


# --- Incremental decoding ---------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_incremental_decoding_matches_one_full_forward(model: MoEForCausalLM, side: str) -> None:
    """Prefill, a chunk of 3, then single tokens, through a cache that has to grow; one row sits
    out two steps (mask 0, as a finished row does in `generate`)."""
    prompt, prompt_mask = ragged_batch(side)
    new = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))  # [B, N]
    new_mask = torch.ones_like(new)
    new_mask[0, 4:6] = 0
    ids, mask = torch.cat((prompt, new), dim=1), torch.cat((prompt_mask, new_mask), dim=1)
    full = model(ids, attention_mask=mask)  # [B, T+N, V]

    cache = model.new_cache(3, capacity=WIDTH + 1)
    pieces = [model(prompt, attention_mask=prompt_mask, cache=cache),
              model(new[:, :3], attention_mask=new_mask[:, :3], cache=cache)]
    pieces += [model(new[:, i : i + 1], attention_mask=new_mask[:, i : i + 1], cache=cache)
               for i in range(3, new.shape[1])]
    stepped = torch.cat(pieces, dim=1)

    assert cache.capacity > WIDTH + 1  # it grew
    assert cache.num_slots == ids.shape[1]
    assert torch.equal(cache.next_position, mask.sum(dim=1))
    assert relative_error(stepped, full, mask) < 1e-5


@torch.no_grad()
def test_last_only_gives_the_last_positions_logits(model: MoEForCausalLM) -> None:
    ids, mask = ragged_batch("left")
    last = model(ids, attention_mask=mask, last_only=True)
    assert last.shape == (3, 1, VOCAB)
    assert torch.allclose(last, model(ids, attention_mask=mask)[:, -1:], rtol=1e-5, atol=1e-6)


# --- Generation -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref(model: MoEForCausalLM) -> torch.nn.Module:
    """transformers' model of the same checkpoint."""
    return AutoModelForCausalLM.from_pretrained(model.source, dtype=torch.float32).eval()


@torch.no_grad()
def hf_generate(ref: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
    """transformers' greedy continuation `[B, N]` of a left-padded batch."""
    out = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=32, **kwargs)
    return out[:, ids.shape[1] :]


def test_greedy_generation_matches_transformers(model: MoEForCausalLM,
                                                ref: torch.nn.Module) -> None:
    ids, mask = ragged_batch("left")
    expected = hf_generate(ref, ids, mask)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=32)
    assert got.shape[1] > 0
    assert got.tolist() == expected.tolist()


def test_rows_stop_at_eos_and_are_padded_like_transformers(model: MoEForCausalLM,
                                                           ref: torch.nn.Module) -> None:
    """With row 0's first free-running token as EOS, row 0 stops at once; the others go on."""
    ids, mask = ragged_batch("left")
    eos = int(hf_generate(ref, ids, mask)[0, 0])
    expected = hf_generate(ref, ids, mask, eos_token_id=eos)
    result = model.generate_full(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=eos)
    assert result.tokens.tolist() == expected.tolist()
    assert result.finish_reasons[0] == "eos" and result.lengths[0] == 1
    assert result.tokens.shape[1] > 1
    assert (result.tokens[0, 1:] == PAD).all()


def test_generation_ignores_the_padding_side(model: MoEForCausalLM) -> None:
    left_ids, left_mask = ragged_batch("left")
    right_ids, right_mask = ragged_batch("right")
    left = model.generate(left_ids, attention_mask=left_mask, max_new_tokens=8)
    right = model.generate(right_ids, attention_mask=right_mask, max_new_tokens=8)
    assert torch.equal(left, right)


# --- GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_greedy_generation_on_cuda(model: MoEForCausalLM) -> None:
    """float32 on the GPU picks the same tokens as on the CPU; bf16 runs and is deterministic."""
    assert model.source is not None
    ids, mask = ragged_batch("left")
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=32)
    f32 = load_model(model.source, device="cuda", dtype="float32")
    got = f32.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=32)
    assert got.device.type == "cuda"
    assert got.cpu().tolist() == expected.tolist()
    bf16 = load_model(model.source, device="cuda", dtype="bfloat16")
    first = bf16.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=32)
    again = bf16.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=32)
    assert torch.equal(first, again)
    assert first.shape[0] == 3 and ((first >= 0) & (first < VOCAB)).all()
