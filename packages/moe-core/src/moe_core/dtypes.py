"""Names of the floating-point dtypes we run in, their sizes, and the one rule that picks the
dtype a model runs in when the user names none (`run_dtype`)."""

from __future__ import annotations

import torch

from moe_core.errors import MoECoreError

__all__ = ["DTYPES", "DtypeError", "dtype_bytes", "dtype_name", "parse_dtype", "run_dtype"]

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


def run_dtype(dtype: str | torch.dtype | None, device: str | torch.device,
              checkpoint_dtype: str | None) -> torch.dtype:
    """The dtype a model runs in: the one rule every tool follows (moe-core, moe-gen and
    moe-infinity call this), so the same prompt gives the same greedy text whichever tool ran it.

    - `dtype` when the user gives one;
    - else float32 on the CPU: bf16 matrix products are slower there than fp32 (tiny-moe,
      48 tokens: 13.2 s in bf16, 11.7 s in fp32 on a 2-core EPYC with avx512_bf16), and fp32 is
      the precision `moe-core verify` checks against transformers;
    - else (a GPU) the checkpoint's own dtype, float32 when its config names none.

    Args:
        dtype: The dtype asked for, or None.
        device: Where the model will run (not where it is first loaded).
        checkpoint_dtype: The checkpoint's `torch_dtype` (`ModelSpec.torch_dtype`).

    Raises:
        DtypeError: `dtype` is unsupported or, when `dtype` is None, `checkpoint_dtype` is.
    """
    if dtype is not None:
        return parse_dtype(dtype)
    # Checked on the CPU too: a checkpoint stored in a dtype we cannot run is refused, not cast.
    stored = parse_dtype(checkpoint_dtype or "float32")
    return torch.float32 if torch.device(device).type == "cpu" else stored
