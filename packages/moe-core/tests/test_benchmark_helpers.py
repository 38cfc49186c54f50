"""`check_routing` (a `--routing` spec checked without a model) and `word_tokenizer` (the
stand-in for dummy runs of shapes that ship no tokenizer)."""

from __future__ import annotations

import pytest
from moe_core import SettingError, check_routing, load_tokenizer, word_tokenizer
from moe_core.known_shapes import known_shape_path


@pytest.mark.parametrize("spec", ["uniform", "zipf", "zipf:s=1.1,reuse=0.5", "replay:x.bin"])
def test_good_routing_specs_pass(spec: str) -> None:
    check_routing(spec)


@pytest.mark.parametrize("spec", ["", "uniform:x", "zipf:s=-1", "zipf:reuse=2", "zipf:s=a",
                                  "replay:", "top1"])
def test_bad_routing_specs_are_refused(spec: str) -> None:
    with pytest.raises(SettingError, match="routing"):
        check_routing(spec)


def test_word_tokenizer_gives_a_token_per_word_and_text_for_every_id() -> None:
    tokenizer = word_tokenizer(1000)
    assert len(tokenizer("the quick brown fox")["input_ids"]) == 4
    assert tokenizer.decode([5, 999]) == "t5 t999"


def test_a_shape_without_a_tokenizer_gets_the_stand_in_only_when_asked() -> None:
    folder = known_shape_path("qwen3-30b-a3b")
    assert folder is not None
    with pytest.raises(ValueError, match="no usable tokenizer"):
        load_tokenizer(folder)
    assert len(load_tokenizer(folder, 151936)) == 151936
