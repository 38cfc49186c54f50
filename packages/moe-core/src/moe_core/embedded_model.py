"""The tiny MoE shipped inside moe-core: every tool's default model (see docs/tiny-model.md).

A 14M-parameter Qwen3-MoE (6 layers, 16 experts, top-2) trained by us on stories, math word
problems, plays, German, French, Spanish and Python code, with real, domain-dependent routing.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TINY_MODEL_NAME", "tiny_model_path"]

TINY_MODEL_NAME = "tiny-moe"
"""The name that stands for the embedded model wherever a model path is accepted."""

_FOLDER = Path(__file__).parent / "tiny_model"


def tiny_model_path() -> Path:
    """The folder of the embedded model (config, bf16 safetensors, tokenizer).

    Raises:
        FileNotFoundError: the package was installed without its data files.
    """
    if not (_FOLDER / "config.json").is_file():
        raise FileNotFoundError(f"{_FOLDER}: the embedded tiny model is missing from this install")
    return _FOLDER
