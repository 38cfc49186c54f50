"""GGML's Q8_0 block format, as llama.cpp reads it (ggml/src/ggml-common.h `block_q8_0`,
ggml/src/ggml-quants.c `quantize_row_q8_0_ref`): a row is cut into blocks of 32 values, and
each block is stored as 34 bytes, its scale d as a little-endian float16 followed by its 32
quants as int8, so that x ~ d * q with d = max|x| / 127 and q = roundf(x / d). GGUF tensor type
id 8 (`GGML_TYPE_Q8_0`); the blocks run along a tensor's innermost dimension (GGUF's ne[0], the
last numpy axis), which must therefore be a multiple of 32.

Quantisation runs in torch on the values' own device, vectorised over blocks (a GPU quantises
the S3 experts in well under a second); the bytes equal those of llama.cpp's reference.
"""

from __future__ import annotations

import numpy as np
import torch

Q8_0_TYPE_ID = 8  # GGML_TYPE_Q8_0 in ggml.h and GGUF tensor infos
BLOCK_VALUES = 32  # QK8_0
BLOCK_BYTES = 2 + BLOCK_VALUES  # float16 d, then int8 qs[32]

# Dimension keys: B blocks, N values.


def q8_0_nbytes(num_values: int) -> int:
    """Bytes of `num_values` values in Q8_0 (a multiple of 32)."""
    if num_values % BLOCK_VALUES:
        raise ValueError(f"num_values {num_values} is not a multiple of {BLOCK_VALUES}")
    return num_values // BLOCK_VALUES * BLOCK_BYTES


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round sends them to even)."""
    whole = torch.trunc(x)
    tie = (x - whole).abs() == 0.5
    return torch.where(tie, whole + torch.sign(x), torch.round(x))


def _quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """[B, 32] float32 -> [B, 34] uint8 on the same device."""
    d = x.abs().amax(dim=1, keepdim=True) / 127  # [B, 1], float32 as in the reference
    inverse = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    # The quants use the float32 scale; the block stores it rounded to float16.
    qs = _roundf(x * inverse).to(torch.int8).view(torch.uint8)  # [B, 32]
    scale = d.to(torch.float16).view(torch.uint8)  # [B, 2], little-endian
    return torch.cat([scale, qs], dim=1)


def quantize_q8_0(values: torch.Tensor, chunk_blocks: int = 1 << 20) -> np.ndarray:
    """`values` (float32, any shape, its size a multiple of 32) as Q8_0 blocks in row-major
    order: uint8 of shape [B, 34], the bytes llama.cpp's `quantize_row_q8_0_ref` writes.
    `chunk_blocks` blocks at a time (32 Mi values: the temporaries stay ~1 GB)."""
    x = values.reshape(-1, BLOCK_VALUES).float()  # [B, 32]
    out = np.empty((x.shape[0], BLOCK_BYTES), dtype=np.uint8)  # [B, 34]
    for start in range(0, x.shape[0], chunk_blocks):
        stop = min(start + chunk_blocks, x.shape[0])
        out[start:stop] = _quantize_blocks(x[start:stop]).cpu().numpy()
    return out


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0 bytes (any uint8 array of whole blocks) back to float32 values, d * q: [N]."""
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, BLOCK_BYTES)  # [B, 34]
    d = b[:, :2].copy().view("<f2").astype(np.float32)  # [B, 1]
    qs = b[:, 2:].view(np.int8).astype(np.float32)  # [B, 32]
    return (d * qs).reshape(-1)
