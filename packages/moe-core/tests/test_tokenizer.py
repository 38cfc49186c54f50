"""Tokenizer and chat template from the checkpoint folder, and `moe-core generate` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moe_core import ConfigError, load_model, load_tokenizer, render_chat
from moe_core.cli import app
from moe_core.tiny_checkpoints import build_tiny_checkpoint
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

WORDS = ["<pad>", "<s>", "</s>", "hello", "world", "user", "assistant", ":", "once", "upon"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


def _save_tokenizer(folder: Path, chat_template: str | None) -> None:
    """A word-level tokenizer whose ids 0..9 are WORDS (the tiny model's vocabulary is 96)."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = build_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"))
    _save_tokenizer(folder, TEMPLATE)
    return folder


def test_tokenizer_is_read_from_the_checkpoint(checkpoint: Path) -> None:
    tok = load_tokenizer(checkpoint)
    assert tok("hello world")["input_ids"] == [3, 4]


def test_chat_template_renders_messages(checkpoint: Path) -> None:
    ids = render_chat(load_tokenizer(checkpoint), [{"role": "user", "content": "hello"}])
    assert ids == [5, 7, 3, 6, 7]  # "user : hello assistant :"


def test_missing_chat_template_is_a_clear_error(tmp_path: Path) -> None:
    _save_tokenizer(tmp_path, None)
    with pytest.raises(ConfigError, match="no chat template"):
        render_chat(load_tokenizer(tmp_path), [{"role": "user", "content": "hello"}])


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    folder = build_tiny_checkpoint("olmoe", tmp_path / "no-tokenizer")
    with pytest.raises(ConfigError, match="no usable tokenizer"):
        load_tokenizer(folder)


def test_generate_command_matches_the_library(checkpoint: Path) -> None:
    result = CliRunner().invoke(app, ["generate", str(checkpoint), "-p", "hello world", "-p",
                                      "once upon", "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["hello world", "once upon"]
    model = load_model(checkpoint)
    tok = load_tokenizer(checkpoint)
    expected = model.generate_full([[3, 4], [8, 9]], max_new_tokens=6)
    for i, row in enumerate(rows):
        ids = expected.tokens[i, : expected.lengths[i]].tolist()
        assert row["text"] == tok.decode(ids, skip_special_tokens=True)
        assert row["new_tokens"] == expected.lengths[i]
        assert row["finish_reason"] == expected.finish_reasons[i]


def test_generate_command_with_chat_template(checkpoint: Path) -> None:
    result = CliRunner().invoke(app, ["generate", str(checkpoint), "-p", "hello", "--chat",
                                      "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["new_tokens"] <= 3
