"""The serving engine's KV cache: one arena per layer and cached tensor, addressed in blocks.

Dimension key: N token slots of the pool (`num_blocks * block_tokens`), G key/value heads,
E head channels, R MLA latent, Q MLA rotary key channels, b rows, X tokens per row.

Each attention layer stores what it needs per token (GQA: key and value `[G, E]` each; MLA: the
compressed latent `[R]` and the shared rotary key `[Q]`) in arenas `[N, ...]` on the compute
device. A sequence owns a list of blocks (its table, from `BlockAllocator`); its token `i` lives
at slot `table[i // block_tokens] * block_tokens + i % block_tokens`. Nothing here knows about
requests: `RaggedPass` gathers and scatters through `slots`.
"""

from __future__ import annotations

import torch
from moe_core import ModelSpec, SettingError, format_bytes

__all__ = ["KVPool"]


class KVPool:
    """Block-addressed KV arenas for every layer of one model.

    Attributes:
        num_blocks: Blocks in the pool.
        block_tokens: Tokens per block.
        arenas: Layer -> its cached tensors, each `[N, ...]`.
    """

    def __init__(self, spec: ModelSpec, num_blocks: int, block_tokens: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        if num_blocks <= 0 or block_tokens <= 0:
            raise ValueError(f"KVPool needs positive num_blocks and block_tokens, got "
                             f"{num_blocks} and {block_tokens}")
        self.num_blocks = num_blocks
        self.block_tokens = block_tokens
        slots = num_blocks * block_tokens
        self.arenas: dict[int, tuple[torch.Tensor, ...]] = {
            layer: tuple(torch.zeros((slots, *shape), dtype=dtype, device=device)
                         for shape in spec.attention.kv_token_shapes())
            for layer in range(spec.num_layers)}

    @staticmethod
    def blocks_for_budget(spec: ModelSpec, budget_bytes: int, block_tokens: int,
                          dtype: torch.dtype) -> int:
        """Blocks that `budget_bytes` of KV memory holds.

        Raises:
            SettingError: the budget holds less than one block.
        """
        per_block = spec.kv_bytes_per_token(dtype) * block_tokens
        blocks = budget_bytes // per_block
        if blocks < 1:
            raise SettingError(f"{format_bytes(budget_bytes)} of KV memory holds no block of "
                               f"{block_tokens} tokens ({format_bytes(per_block)})")
        return int(blocks)

    def slots(self, tables: list[list[int]], positions: torch.Tensor) -> torch.Tensor:
        """Arena slots `[b, X]` of token `positions` `[b, X]` of `b` sequences (host tensors).
        Each position must lie within its own sequence's blocks."""
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables],
                             dtype=torch.long)  # [b, W]
        blocks = table.gather(1, positions // self.block_tokens)  # [b, X]
        return blocks * self.block_tokens + positions % self.block_tokens

    def nbytes(self) -> int:
        """Bytes of every arena."""
        return sum(t.numel() * t.element_size() for ts in self.arenas.values() for t in ts)
