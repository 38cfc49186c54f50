"""`generate`: greedy decoding equals a plain argmax loop, rows stop at EOS or a stop string and
say why, and the ways of padding a ragged batch all give the same tokens.

Dimension key: B batch, T prompt slots, N new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from moe_core import MoEForCausalLM, generate, load_model
from moe_core.generation import GenerationResult
from moe_core.tiny_checkpoints import build_tiny_checkpoint

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46]]
NUM_NEW = 10
FILL = 95  # pad id for finished rows; distinct from anything the tests expect as output


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> MoEForCausalLM:
    folder = build_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))
    return load_model(folder, dtype="float32")


@pytest.fixture(scope="module")
def free_run(model: MoEForCausalLM) -> torch.Tensor:
    """Greedy continuations `[B, N]` of PROMPTS with no EOS at all."""
    result = generate(model, PROMPTS, max_new_tokens=NUM_NEW, eos_token_id=[])
    assert result.lengths == [NUM_NEW] * len(PROMPTS)
    assert result.finish_reasons == ["length"] * len(PROMPTS)
    return result.tokens


def expected_stops(free: torch.Tensor, stops_after: Sequence[int | None]) -> tuple[
        list[int], torch.Tensor]:
    """Lengths, and the tokens `[B, N]` with everything after each row's stop set to FILL."""
    lengths = [NUM_NEW if n is None else n for n in stops_after]
    tokens = free.clone()
    for row, n in enumerate(lengths):
        tokens[row, n:] = FILL
    return lengths, tokens


def assert_result(result: GenerationResult, lengths: list[int], tokens: torch.Tensor,
                  reasons: list[str]) -> None:
    assert result.lengths == lengths
    assert result.finish_reasons == reasons
    assert torch.equal(result.tokens[:, : max(lengths)], tokens[:, : max(lengths)])


# --- Greedy decoding --------------------------------------------------------------------------


def test_greedy_equals_an_argmax_loop_without_cache(model: MoEForCausalLM,
                                                    free_run: torch.Tensor) -> None:
    # Each prompt alone, whole sequence re-run every step: no cache, no padding, no batch.
    for row, prompt in enumerate(PROMPTS):
        sequence = list(prompt)
        for _ in range(NUM_NEW):
            logits = model(torch.tensor([sequence]))[0, -1]  # [V]
            sequence.append(int(logits.argmax()))
        assert sequence[len(prompt) :] == free_run[row].tolist(), f"prompt {row}"


def test_tensor_without_mask_is_all_real_tokens(model: MoEForCausalLM,
                                                free_run: torch.Tensor) -> None:
    tokens = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=NUM_NEW, eos_token_id=[])
    assert torch.equal(tokens, free_run[:1])


# --- Stopping ---------------------------------------------------------------------------------


def first_stop(row: list[int], eos: set[int]) -> int | None:
    """New tokens of a row that stops at its first token in `eos`."""
    return next((i + 1 for i, t in enumerate(row) if t in eos), None)


def test_stops_at_eos(model: MoEForCausalLM, free_run: torch.Tensor) -> None:
    rows = free_run.tolist()
    # An EOS the model produces: one that ends some row after two or more tokens while
    # another row never produces it (so both finish reasons are exercised).
    candidates = [t for t in sorted(set(rows[0][1:]))
                  if any(t not in r for r in rows) and first_stop(rows[0], {t}) >= 2]
    assert candidates, "the tiny model's greedy output gives no usable EOS"
    eos = candidates[0]
    stops_after = [first_stop(r, {eos}) for r in rows]
    lengths, tokens = expected_stops(free_run, stops_after)

    result = generate(model, PROMPTS, max_new_tokens=NUM_NEW, eos_token_id=eos,
                      pad_token_id=FILL)

    reasons = ["length" if n is None else "eos" for n in stops_after]
    assert "eos" in reasons and "length" in reasons
    assert_result(result, lengths, tokens, reasons)
    # The EOS token itself is kept and counted.
    for row, n in enumerate(lengths):
        if reasons[row] == "eos":
            assert int(result.tokens[row, n - 1]) == eos


def test_any_of_several_eos_ids_stops_a_row(model: MoEForCausalLM,
                                            free_run: torch.Tensor) -> None:
    rows = free_run.tolist()
    eos = {rows[0][4], rows[1][2]}
    stops_after = [first_stop(r, eos) for r in rows]
    lengths, tokens = expected_stops(free_run, stops_after)
    result = generate(model, PROMPTS, max_new_tokens=NUM_NEW, eos_token_id=sorted(eos),
                      pad_token_id=FILL)
    assert_result(result, lengths, tokens,
                  ["length" if n is None else "eos" for n in stops_after])


class WordTokenizer:
    """Decodes token `i` as the word `w{i}`, remembering how it was asked to decode."""

    def __init__(self) -> None:
        self.skip_flags: list[bool] = []

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        self.skip_flags.append(skip_special_tokens)
        return " ".join(f"w{i}" for i in token_ids)


def test_stops_at_a_stop_string(model: MoEForCausalLM, free_run: torch.Tensor) -> None:
    tokenizer = WordTokenizer()
    rows = free_run.tolist()
    # A stop string spanning two tokens of row 1's output: it is only seen once both are out.
    stop = f"w{rows[1][1]} w{rows[1][2]}"

    def stops_after(row: list[int]) -> int | None:  # the reference: decode every prefix
        return next((n for n in range(1, NUM_NEW + 1)
                     if stop in tokenizer.decode(row[:n], skip_special_tokens=True)), None)

    expected = [stops_after(r) for r in rows]
    assert expected[1] is not None and expected[1] >= 3
    lengths, tokens = expected_stops(free_run, expected)

    tokenizer.skip_flags.clear()
    result = generate(model, PROMPTS, max_new_tokens=NUM_NEW, eos_token_id=[],
                      stop_strings=[stop, "never printed"], tokenizer=tokenizer,
                      pad_token_id=FILL)

    assert_result(result, lengths, tokens, ["length" if n is None else "stop" for n in expected])
    assert tokenizer.skip_flags and all(tokenizer.skip_flags)


def test_stop_strings_need_a_tokenizer(model: MoEForCausalLM) -> None:
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        generate(model, PROMPTS, stop_strings=["w1"])


def test_zero_new_tokens(model: MoEForCausalLM) -> None:
    result = generate(model, PROMPTS, max_new_tokens=0)
    assert result.tokens.shape == (len(PROMPTS), 0) and result.tokens.dtype == torch.long
    assert result.lengths == [0, 0, 0] and result.finish_reasons == ["length"] * 3


def test_negative_new_tokens(model: MoEForCausalLM) -> None:
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        generate(model, PROMPTS, max_new_tokens=-1)


def test_empty_prompt(model: MoEForCausalLM) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []])


# --- Ragged batches ---------------------------------------------------------------------------


def padded(side: str, filler_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """PROMPTS as `(input_ids [B, T], attention_mask [B, T])`, padded on `side` with random
    filler ids (so only the mask says which slots are real)."""
    width = max(map(len, PROMPTS))
    generator = torch.Generator().manual_seed(filler_seed)
    ids = torch.randint(3, 90, (len(PROMPTS), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(PROMPTS):
        real = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[row, real] = torch.tensor(prompt)
        mask[row, real] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_tensor_equals_the_ragged_list(model: MoEForCausalLM, free_run: torch.Tensor,
                                              side: str) -> None:
    ids, mask = padded(side)
    result = generate(model, ids, attention_mask=mask, max_new_tokens=NUM_NEW, eos_token_id=[])
    assert torch.equal(result.tokens, free_run)


def test_padding_filler_is_ignored(model: MoEForCausalLM) -> None:
    runs = [generate(model, ids, attention_mask=mask, max_new_tokens=4).tokens
            for ids, mask in (padded("left", 1), padded("left", 2))]
    assert torch.equal(*runs)


# --- Sampling through generate ----------------------------------------------------------------


def test_seeded_generation_is_reproducible(model: MoEForCausalLM) -> None:
    def run(seed: int) -> torch.Tensor:
        return generate(model, PROMPTS, max_new_tokens=NUM_NEW, temperature=1.5, seed=seed,
                        eos_token_id=[]).tokens

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_top_k_1_generation_is_greedy(model: MoEForCausalLM, free_run: torch.Tensor) -> None:
    tokens = generate(model, PROMPTS, max_new_tokens=NUM_NEW, temperature=50.0, top_k=1,
                      seed=0, eos_token_id=[]).tokens
    assert torch.equal(tokens, free_run)
