"""Tokenizer and chat template, read from the checkpoint folder through transformers."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["load_tokenizer", "render_chat", "word_tokenizer"]

# Files any transformers tokenizer is saved as; without one of them, transformers 5 quietly
# builds an empty tokenizer from the model type, which would decode everything to nothing.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: str | Path, stand_in_vocab: int | None = None
                   ) -> PreTrainedTokenizerBase:
    """The tokenizer stored beside the checkpoint.

    Args:
        path: The checkpoint folder (or hub id).
        stand_in_vocab: For dummy-weight runs of a shape that ships no tokenizer (the known
            shapes hold `config.json` only): where the folder has no tokenizer files, a
            word-level stand-in over this many ids (`word_tokenizer`) instead of an error.

    Raises:
        ConfigError: the folder has no tokenizer files transformers can read (and no
            `stand_in_vocab` was given).
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        if stand_in_vocab is not None:
            return word_tokenizer(stand_in_vocab)
        raise ConfigError(f"{path}: no usable tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: no usable tokenizer ({exc})") from exc
    # Whether a prompt fits the model is decided, and said in one clear line, by
    # moe_core.request_limits; without this, transformers also warns on every long prompt.
    tokenizer.model_max_length = sys.maxsize
    return tokenizer


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]],
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` (`[{"role": ..., "content": ...}, ...]`) in the model's template.

    Raises:
        ConfigError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{tokenizer.name_or_path}: the tokenizer has no chat template")
    out: Any = tokenizer.apply_chat_template(list(messages), tokenize=True,
                                             add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # transformers 5 returns an encoding
        out = out["input_ids"]
    return [int(i) for i in out]


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    """A stand-in tokenizer for dummy weights: one token per whitespace-separated word (every
    word is the unknown token, id 0) and id `i` decodes to `t<i>`.

    Why: a benchmark of a shipped shape with random weights needs prompts of known length and
    a text for every generated id (a streaming server sends one chunk per token with text;
    a real tokenizer of another, smaller model would decode most ids to nothing).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tokenizer.model_max_length = sys.maxsize
    return tokenizer
