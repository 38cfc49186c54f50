"""Who runs in the next step: the running batch, refilled from the queue as sequences finish.

The scheduler never touches a tensor. A sequence is admitted when a batch slot is free, its KV
pages (prompt plus limit) can be reserved, and its prompt fits the step's prefill token budget;
it then runs every step until it stops, and its slot and pages go to the next in the queue
(continuous refill: the batch stays full to the end of the job).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from moe_core import SettingError

from moe_gen.paged_kv import PagedKV
from moe_gen.sequence import Sequence

__all__ = ["Scheduler"]


class Scheduler:
    """A FIFO queue and the running batch.

    Attributes:
        max_batch_size: B, the running batch's size limit.
        max_prefill_tokens: Prompt tokens admitted per step (at least one prompt always is).
        running: The running sequences, in admission order.
    """

    def __init__(self, sequences: Iterable[Sequence], pages: PagedKV, max_batch_size: int,
                 max_prefill_tokens: int) -> None:
        if max_batch_size <= 0 or max_prefill_tokens <= 0:
            raise ValueError(f"max_batch_size and max_prefill_tokens must be positive, got "
                             f"{max_batch_size} and {max_prefill_tokens}")
        self.pages = pages
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.queue: deque[Sequence] = deque(sequences)
        self.running: list[Sequence] = []
        for seq in self.queue:
            if pages.pages_for(seq.max_tokens) > pages.num_pages:
                raise SettingError(f"request {seq.id!r} needs {seq.max_tokens} KV tokens; the "
                                 f"host KV cache holds {pages.num_pages * pages.page_tokens}")

    @property
    def is_done(self) -> bool:
        """Nothing queued and nothing running."""
        return not self.queue and not self.running

    def next_step(self) -> list[Sequence]:
        """Admit what fits, then return the sequences of the next step (every running one)."""
        budget = self.max_prefill_tokens
        while self.queue and len(self.running) < self.max_batch_size:
            seq = self.queue[0]
            admitted_any = any(s.num_cached == 0 for s in self.running)
            if admitted_any and len(seq.prompt_ids) > budget:
                break
            table = self.pages.allocate(seq.max_tokens)
            if table is None:
                break
            self.queue.popleft()
            seq.page_table = table
            seq.pending = list(seq.prompt_ids)
            budget -= len(seq.prompt_ids)
            self.running.append(seq)
        return list(self.running)

    def retire(self, seq: Sequence) -> None:
        """A sequence stopped: free its slot and pages."""
        self.running.remove(seq)
        self.pages.release(seq.page_table)
        seq.page_table = []
