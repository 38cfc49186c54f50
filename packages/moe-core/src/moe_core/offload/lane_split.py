"""How a layer call's missed experts are split between the two lanes: the GPU reading them over
PCIe and the CPU computing them, so that both finish together.

Dimension key: T tokens, K experts per token, E experts per layer, m missed experts.

The cost model (bytes / measured rate per lane, plus a fixed cost for using the CPU lane at all):

    gpu(n) = (m - n) * B / gpu_rate
    cpu(n) = 0 if n == 0 else cpu_fixed + n * B / cpu_rate * (1 + token_cost * (tpe - 1))

with B an expert's bytes and tpe the expected tokens per missed expert at T tokens. For each m
the table holds the n that minimises max(gpu(n), cpu(n)); with n == 0 allowed, the split is
never slower than fetching everything, by the model (issue 15: "the cost model must not make
batch 16 slower than fetch-only").

Which experts go to the CPU is decided on the device, so no host read is needed and a captured
step replays it: the missed experts with the fewest tokens (then the lowest id) go first, as the
CPU's cost grows with tokens and the GPU's does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LaneRates", "LaneSplit", "cpu_share_table", "lane_saving"]


@dataclass(frozen=True, kw_only=True)
class LaneRates:
    """Measured speeds of the two lanes.

    Attributes:
        gpu_bytes_per_s: The GPU's reads of pinned host memory (mapped fetch).
        cpu_bytes_per_s: The CPU kernel at one token per expert, expert bytes per second.
        cpu_fixed_s: Added once per call that uses the CPU lane (staging copies, two host
            functions, the worker's wake-up and bookkeeping).
        cpu_token_cost: Extra share of an expert's CPU time per extra token.
    """

    gpu_bytes_per_s: float
    cpu_bytes_per_s: float
    cpu_fixed_s: float = 60e-6
    cpu_token_cost: float = 0.5

    def __post_init__(self) -> None:
        if self.gpu_bytes_per_s <= 0 or self.cpu_bytes_per_s <= 0:
            raise ValueError("lane rates must be positive")
        if self.cpu_fixed_s < 0 or self.cpu_token_cost < 0:
            raise ValueError("cpu_fixed_s and cpu_token_cost must be >= 0")


def cpu_share_table(rates: LaneRates, expert_bytes: int, num_experts: int, tokens: int,
                    top_k: int) -> list[int]:
    """`table[m]`: how many of `m` missed experts the CPU computes, for m in 0..min(E, T*K)."""
    assignments = tokens * top_k
    distinct = num_experts * (1.0 - (1.0 - 1.0 / num_experts) ** assignments)  # expected
    per_expert = max(1.0, assignments / max(distinct, 1.0))
    cpu_each = expert_bytes / rates.cpu_bytes_per_s * (1 + rates.cpu_token_cost
                                                      * (per_expert - 1))
    gpu_each = expert_bytes / rates.gpu_bytes_per_s
    table = []
    for m in range(min(num_experts, assignments) + 1):
        def cost(n: int, m: int = m) -> float:
            cpu = 0.0 if n == 0 else rates.cpu_fixed_s + n * cpu_each
            return max((m - n) * gpu_each, cpu)
        table.append(min(range(m + 1), key=lambda n: (cost(n), n)))
    return table


def lane_saving(rates: LaneRates, expert_bytes: int, table: list[int], seen: list[int],
                round_trip_s: float) -> float:
    """Seconds the lane saved per call, by the model, over the calls `seen` (`seen[m]` calls
    with m missed experts), split by `table`: each call pays the lane's `round_trip_s`
    whatever the split gives the CPU (a captured step runs its host functions in every call).
    Negative: the GPU alone would have been faster."""
    gpu_each = expert_bytes / rates.gpu_bytes_per_s
    cpu_each = expert_bytes / rates.cpu_bytes_per_s
    calls = sum(seen)
    if calls == 0:
        return 0.0
    saved = 0.0
    for m, count in enumerate(seen):
        n = table[m]
        two_lanes = round_trip_s + max((m - n) * gpu_each, n * cpu_each)
        saved += count * (m * gpu_each - two_lanes)
    return saved / calls


class LaneSplit:
    """The device-side split of one call shape (T tokens, K per token).

    The table lives in pinned host memory and on the device: a split first made inside a CUDA
    graph capture records a copy from the pinned table that every replay repeats, so `update`
    writes both.
    """

    def __init__(self, table: list[int], num_experts: int, device: torch.device) -> None:
        self._host = torch.tensor(table, dtype=torch.long)  # [min(E, T*K) + 1]
        if device.type == "cuda":
            self._host = self._host.pin_memory()
        self.table = self._host.to(device, non_blocking=True)  # [min(E, T*K) + 1]
        # calls seen per count of missed experts, counted on the device (captured steps too)
        self.seen = torch.zeros(self._host.numel(), dtype=torch.long, device=device)
        self._one = torch.ones(1, dtype=torch.long, device=device)
        self._experts = torch.arange(num_experts, dtype=torch.long, device=device)  # [E]
        self._ones: dict[int, torch.Tensor] = {}

    def take_seen(self) -> list[int]:
        """`seen[m]`: the calls with m missed experts since the last take (a host read: not
        inside a capture)."""
        counts = self.seen.tolist()
        self.seen.zero_()
        return counts

    @property
    def cpu_share(self) -> list[int]:
        """The table as the split now uses it (`table[m]`: CPU experts of m missed)."""
        return self._host.tolist()

    def update(self, table: list[int]) -> None:
        """Use `table` (same length) from the next call on. Not inside a capture; waits for the
        device's queued work first (a replay may still be reading the pinned table)."""
        if len(table) != self._host.numel():
            raise ValueError(f"a split table of {self._host.numel()} entries, got {len(table)}")
        if self.table.is_cuda:
            torch.cuda.synchronize(self.table.device)
        self._host.copy_(torch.tensor(table, dtype=torch.long))
        self.table.copy_(self._host)

    def __call__(self, expert_ids: torch.Tensor,
                 lut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(on_cpu [E] bool, gpu_lut [E])` for routing `expert_ids` `[T, K]` over the slot
        table `lut` `[E]` (-1 absent): `gpu_lut` is `lut` with the CPU's experts set to -2
        (the mapped fetch then writes zero rows for them instead of reading them)."""
        flat = expert_ids.reshape(-1)
        ones = self._ones.get(flat.numel())
        if ones is None:
            ones = self._ones[flat.numel()] = torch.ones(flat.numel(), dtype=torch.long,
                                                         device=flat.device)
        e = self._experts.numel()
        counts = torch.zeros(e, dtype=torch.long, device=flat.device).index_add_(0, flat, ones)
        missing = (counts > 0) & (lut < 0)  # [E]
        # [1]: gathered on the device (indexing with a 0-d tensor would read it on the host)
        m = missing.sum().clamp(max=self.table.numel() - 1).view(1)
        n_cpu = self.table.gather(0, m)
        self.seen.index_add_(0, m, self._one)
        key = torch.where(missing, counts * e + self._experts, (flat.numel() + 1) * e)
        rank = torch.empty_like(key).scatter_(0, key.argsort(), self._experts)  # [E]
        on_cpu = missing & (rank < n_cpu)
        return on_cpu, torch.where(on_cpu, torch.full_like(lut, -2), lut)
