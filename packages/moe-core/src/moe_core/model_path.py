"""`resolve_model_path`: what a model name stands for on disk. Every entry point that takes a
model (`ModelSpec.from_pretrained`, `load_model`, the CLIs) accepts the same names: a folder,
`tiny-moe` (the embedded model), a shipped shape (`known_shapes()`) or a hub id."""

from __future__ import annotations

import re
from pathlib import Path

from moe_core.embedded_model import TINY_MODEL_NAME, tiny_model_path
from moe_core.errors import ConfigError
from moe_core.known_shapes import known_shape_path

__all__ = ["resolve_model_path"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def resolve_model_path(model: str | Path, weights: bool = True) -> Path:
    """A local folder for `model`: the embedded model (`"tiny-moe"`), the path itself, a shipped
    shape (`known_shapes()`, config only), or a hub snapshot when it names a hub repo.

    With `weights=False` a hub snapshot holds only the small files (config, tokenizer).

    Raises:
        ConfigError: neither a local folder nor a reachable hub repository.
    """
    if str(model) == TINY_MODEL_NAME:
        return tiny_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    shape = known_shape_path(str(model))
    if shape is not None:
        return shape
    if not _HUB_ID.match(str(model)):
        raise ConfigError(f"{model}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        patterns = (_HUB_PATTERNS if weights
                    else [p for p in _HUB_PATTERNS if "safetensors" not in p])
        return Path(snapshot_download(repo_id=str(model), allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated: all mean "cannot have it"
        raise ConfigError(f"{model}: not a local folder, and fetching it from the hub failed "
                          f"({type(exc).__name__}: {exc})") from exc
