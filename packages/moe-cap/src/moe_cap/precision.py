"""Number formats: how many bits a weight or cache element takes, and which peak rate of the
hardware table a matrix product in that format runs at.

Storage bytes count the elements only; the per-block scales of quantised formats (fp8 with
per-channel scales, int4/fp4 with group scales) are left out, which undercounts them by a few
percent at most.
"""

from __future__ import annotations

from typing import Literal

from moe_cap.errors import MoECapError

__all__ = ["PRECISIONS", "Precision", "bits_per_element", "parse_precision", "storage_bytes"]

Precision = Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4", "fp4"]

# Bits of one stored element. tf32 is a compute mode over fp32 storage.
PRECISIONS: dict[str, int] = {
    "fp32": 32, "tf32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4, "fp4": 4,
}
_ALIASES = {
    "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
    "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "e4m3": "fp8", "e5m2": "fp8",
    "nvfp4": "fp4", "mxfp4": "fp4", "uint4": "int4",
}


def parse_precision(name: str) -> Precision:
    """`"bfloat16"`, `"torch.bfloat16"` or `"bf16"` -> `"bf16"`.

    Raises:
        ValueError: not a known format (the message lists the known ones).
    """
    key = str(name).strip().lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise MoECapError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    return key  # type: ignore[return-value]


def bits_per_element(name: str) -> int:
    """Bits one element of `name` takes in memory (`"bf16"` -> 16, `"int4"` -> 4)."""
    return PRECISIONS[parse_precision(name)]


def storage_bytes(num_elements: int, name: str) -> int:
    """Bytes of `num_elements` elements stored as `name`, rounded up to whole bytes."""
    return (num_elements * bits_per_element(name) + 7) // 8
