"""Prompts against the model's context: a prompt either fits with its token limit, is cut on the
side asked for, or is refused with a clear error; never passed on too long."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_core import (
    RequestError,
    SettingError,
    fit_prompt,
    fit_prompts,
    generate,
    load_model,
    parse_truncate,
)
from moe_core.tiny_checkpoints import build_tiny_checkpoint

sides = st.sampled_from([None, "left", "right"])


@given(st.integers(0, 80), st.integers(0, 40), st.integers(1, 64), sides)
def test_a_prompt_fits_is_cut_or_is_refused(length: int, max_new: int, context: int,
                                            side: str | None) -> None:
    ids = list(range(100, 100 + length))
    try:
        kept = fit_prompt(ids, max_new, context, side)  # type: ignore[arg-type]
    except RequestError as exc:
        assert length == 0 or max_new >= context or (side is None and length + max_new > context)
        assert "\n" not in str(exc)
        return
    assert len(kept) >= 1 and len(kept) + max_new <= context
    if length + max_new <= context:
        assert kept == ids  # a prompt that fits is never touched
    else:
        assert kept == (ids[-len(kept):] if side == "left" else ids[: len(kept)])
        assert len(kept) == context - max_new  # cut to exactly what fits


def test_the_error_says_how_to_fix_it() -> None:
    with pytest.raises(RequestError, match=r"24001 tokens.*context of 1024.*--truncate"):
        fit_prompt(list(range(24_001)), 64, 1024)


@pytest.mark.parametrize("value", ["middle", "LEFT", ""])
def test_unknown_truncation_sides_are_refused(value: str) -> None:
    with pytest.raises(SettingError, match="left or right"):
        parse_truncate(value)


def test_generate_refuses_prompts_past_the_context(tmp_path_factory: pytest.TempPathFactory
                                                   ) -> None:
    """The library path too: no silent junk past `max_position_embeddings` (256 here)."""
    model = load_model(build_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("q3")),
                       dtype="float32")
    with pytest.raises(RequestError, match="prompt 1: the prompt is 250 tokens"):
        generate(model, [[5, 6], [7] * 250], max_new_tokens=8)
    assert generate(model, [[7] * 248], max_new_tokens=8).tokens.shape == torch.Size([1, 8])


def test_every_prompt_that_cannot_run_is_reported_at_once() -> None:
    def no_template() -> list[int]:
        raise SettingError("the tokenizer has no chat template")

    fitted, problems = fit_prompts([("line 1", lambda: [1, 2], 4), ("line 2", lambda: [], 4),
                                    ("line 3", no_template, 4), ("line 4", lambda: [9] * 20, 4)],
                                   context_tokens=16, truncate=None)
    assert fitted == [[1, 2], [], [], []]
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 4"]
