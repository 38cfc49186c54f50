"""Which KV blocks of the pool each sequence owns: a free list and block counts, no tensors.

The scheduler asks it whether a request fits before admitting it; the pool (`kv_pool.py`) holds
the tensors the blocks index into. A sequence reserves every block it may need when it is
admitted (prompt plus its token limit), so a running batch never runs out of KV and is never
preempted: a request that does not fit waits in the queue until finished ones give blocks back
(docs/decisions/0008).
"""

from __future__ import annotations

__all__ = ["BlockAllocator"]


class BlockAllocator:
    """`num_blocks` blocks of `block_tokens` tokens each.

    Attributes:
        num_blocks: Blocks in the pool.
        block_tokens: Tokens per block.
    """

    def __init__(self, num_blocks: int, block_tokens: int) -> None:
        if num_blocks <= 0 or block_tokens <= 0:
            raise ValueError(f"BlockAllocator needs positive num_blocks and block_tokens, got "
                             f"{num_blocks} and {block_tokens}")
        self.num_blocks = num_blocks
        self.block_tokens = block_tokens
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low blocks first

    @property
    def num_free(self) -> int:
        """Blocks owned by no sequence."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks owned by sequences."""
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_tokens

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of `num_tokens` tokens needs."""
        return -(-num_tokens // self.block_tokens)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` tokens fits in the free blocks now."""
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int] | None:
        """A block table for up to `num_tokens` tokens, or None when too few blocks are free."""
        needed = self.blocks_for(num_tokens)
        if needed > len(self._free):
            return None
        return [self._free.pop() for _ in range(needed)]

    def release(self, table: list[int]) -> None:
        """Give a sequence's blocks back (each block once).

        Raises:
            ValueError: a block that is already free, or not of this pool.
        """
        free = set(self._free)
        for block in table:
            if not 0 <= block < self.num_blocks or block in free:
                raise ValueError(f"block {block} is not an allocated block of this pool")
            free.add(block)
        self._free.extend(reversed(table))
