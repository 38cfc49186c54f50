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

Whether a call shape takes the CPU lane at all is a second question, priced per call rather than
per split: every call of a shape with a lane goes through it, whatever its table gives the CPU
(a captured step runs the hand-over in every layer, fully cached ones included), and the stream
waits for that round trip (staging copies, the hand-over both ways, the worker's wake-up, the
copy back) on the step's critical path, even when the GPU's share finished sooner (since
decision 0019 the GPU lane multiplies its resident experts in place and stages only its misses:
with few misses it is done early). So with c the per-call cost (at least the measured round
trip) a call with m misses saves

    saved(m) = gpu(0) - (c + max(gpu(n), n * B / cpu_rate * growth))    n = table[m]

and a shape takes the lane only when the expected saving per call is at least
`MIN_SAVING_SHARE` of c (`lane_saving`; decided by `TwoLanes.split`). Before any call is seen,
the misses per call are expected from where the cache stands (`miss_distribution`: each layer's
absent experts, uniform routing); afterwards the lane prices the calls it saw. FP8 experts at
S3's 92% cached decline: a miss moved to the CPU saves the GPU ~0.1 ms (4.7 MB at 44 GB/s), the
CPU takes ~0.2 ms for it, and every call, most with no miss, pays ~0.1 ms.

Which experts go to the CPU is decided on the device, so no host read is needed and a captured
step replays it: the missed experts with the fewest tokens (then the lowest id) go first, as the
CPU's cost grows with tokens and the GPU's does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["MIN_SAVING_SHARE", "LaneRates", "LaneSplit", "cpu_share_table", "expected_saving",
           "expected_tokens_per_expert", "lane_saving", "miss_distribution"]

MIN_SAVING_SHARE = 0.25
"""A call shape takes the CPU lane only if the lane is expected to save at least this share of
its per-call cost per call: the margin for the model's least certain input (the round trip
measured 78-145 us on the H200 machine across runs, decision 0009)."""


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
    per_expert = expected_tokens_per_expert(num_experts, tokens, top_k)
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


def expected_tokens_per_expert(num_experts: int, tokens: int, top_k: int) -> float:
    """Expected tokens per distinct expert of a call of T tokens (at least 1)."""
    assignments = tokens * top_k
    distinct = num_experts * (1.0 - (1.0 - 1.0 / num_experts) ** assignments)  # expected
    return max(1.0, assignments / max(distinct, 1.0))


def lane_saving(rates: LaneRates, expert_bytes: int, table: list[int], seen: Sequence[float],
                round_trip_s: float, *, tokens_per_expert: float = 1.0) -> float:
    """Seconds the lane saves per call, by the model, over the calls `seen` (`seen[m]` calls
    with m missed experts, or their expected share: `miss_distribution`), split by `table`:
    each call pays the lane's `round_trip_s` (its per-call cost) whatever the split gives the
    CPU, on the stream's critical path (a captured step runs the hand-over in every call).
    The CPU's time per expert grows with `tokens_per_expert` as in `cpu_share_table`.
    Negative: the GPU alone would have been faster."""
    gpu_each = expert_bytes / rates.gpu_bytes_per_s
    cpu_each = expert_bytes / rates.cpu_bytes_per_s * (
        1 + rates.cpu_token_cost * (tokens_per_expert - 1))
    calls = sum(seen)
    if calls == 0:
        return 0.0
    saved = 0.0
    for m, count in enumerate(seen):
        n = table[m]
        two_lanes = round_trip_s + max((m - n) * gpu_each, n * cpu_each)
        saved += count * (m * gpu_each - two_lanes)
    return saved / calls


def miss_distribution(absent: Sequence[int], num_experts: int, tokens: int,
                      top_k: int) -> list[float]:
    """`p[m]`: the expected share of layer calls of T tokens with m missed experts, m in
    0..min(E, T*K), when MoE layer l has `absent[l]` of its E experts in no slot and routing is
    uniform. A call's distinct experts (K for one token, E * (1 - (1 - K/E)^T) expected for T,
    rounded) are drawn without replacement from its layer (hypergeometric); every layer is
    called once per step, so the layers weigh alike.

    Raises:
        ValueError: no layers, or an absent count outside 0..E.
    """
    if not absent:
        raise ValueError("absent must give at least one layer")
    if any(not 0 <= a <= num_experts for a in absent):
        raise ValueError(f"absent counts must be within 0..{num_experts}")
    size = min(num_experts, tokens * top_k) + 1
    distinct = round(num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens))
    distinct = min(max(distinct, 1), size - 1)
    share = [0.0] * size
    for a in absent:
        for m in range(min(a, distinct) + 1):  # m of the call's experts among the a absent
            share[m] += (math.comb(a, m) * math.comb(num_experts - a, distinct - m)
                         / math.comb(num_experts, distinct) / len(absent))
    return share


def expected_saving(rates: LaneRates, expert_bytes: int, absent: Sequence[int],
                    num_experts: int, tokens: int, top_k: int, call_cost_s: float) -> float:
    """Seconds per call a lane is expected to save at one call shape before any of its calls
    ran: over the misses `miss_distribution` expects from `absent` (per layer), split by
    `cpu_share_table` at `rates`, every call paying `call_cost_s` (`lane_saving`)."""
    table = cpu_share_table(rates, expert_bytes, num_experts, tokens, top_k)
    misses = miss_distribution(absent, num_experts, tokens, top_k)
    return lane_saving(rates, expert_bytes, table, misses, call_cost_s,
                       tokens_per_expert=expected_tokens_per_expert(num_experts, tokens, top_k))


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
