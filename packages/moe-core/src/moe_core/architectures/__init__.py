"""The lazy registry from a checkpoint's `architectures` name to our implementation.

One module per family; each defines `ARCHITECTURES`, a tuple of `Architecture` records. A module
is imported only when a checkpoint asks for one of its names.
"""

from __future__ import annotations

import importlib

from moe_core.architectures.base import Architecture, CheckpointLayout
from moe_core.errors import UnsupportedArchitectureError

__all__ = ["Architecture", "CheckpointLayout", "get_architecture", "supported_architectures"]

_REGISTRY: dict[str, str] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV2ForCausalLM": "deepseek",
    "DeepseekV3ForCausalLM": "deepseek",
}


def supported_architectures() -> tuple[str, ...]:
    """The Hugging Face architecture names we can load."""
    return tuple(_REGISTRY)


def get_architecture(name: str) -> Architecture:
    """The implementation record for a Hugging Face architecture name.

    Raises:
        UnsupportedArchitectureError: `name` is not implemented; the message lists what is.
    """
    module_name = _REGISTRY.get(name)
    if module_name is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {name!r}; supported: {', '.join(_REGISTRY)}")
    module = importlib.import_module(f"moe_core.architectures.{module_name}")
    for arch in module.ARCHITECTURES:
        if arch.name == name:
            return arch
    raise AssertionError(f"moe_core.architectures.{module_name} does not define {name}")
