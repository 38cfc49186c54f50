"""Tokenizer and chat template, read from the checkpoint folder through transformers."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["load_tokenizer", "render_chat"]

# Files any transformers tokenizer is saved as; without one of them, transformers 5 quietly
# builds an empty tokenizer from the model type, which would decode everything to nothing.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored beside the checkpoint.

    Raises:
        ConfigError: the folder has no tokenizer files transformers can read.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
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
