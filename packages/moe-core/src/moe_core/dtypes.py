"""Names of the floating-point dtypes we run in, and their sizes."""

from __future__ import annotations

import torch

from moe_core.errors import MoECoreError

__all__ = ["DTYPES", "DtypeError", "dtype_bytes", "dtype_name", "parse_dtype"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
            "float": "float32"}


class DtypeError(MoECoreError, ValueError):
    """A dtype name we do not run in."""


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """Turn `"bf16"`, `"bfloat16"`, `"torch.bfloat16"` or a `torch.dtype` into a supported dtype.

    Raises:
        DtypeError: the dtype is not one of float32, bfloat16, float16.
    """
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
        raise DtypeError(f"unsupported dtype {value}; use one of {', '.join(DTYPES)}")
    name = str(value).strip().lower().removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise DtypeError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)} "
                         f"(or {', '.join(_ALIASES)})")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a supported dtype (`torch.bfloat16` -> `"bfloat16"`)."""
    return str(dtype).removeprefix("torch.")


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of a supported dtype."""
    return parse_dtype(dtype).itemsize
