"""Choosing the next token from logits: greedy, or temperature with top-k and top-p filtering."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_core.errors import SettingError

__all__ = ["SamplingParams", "sample_next"]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick each next token.

    Attributes:
        temperature: 0 for greedy decoding; otherwise logits are divided by it before sampling.
        top_k: Keep only the k most likely tokens (None: all).
        top_p: Keep the smallest set of tokens whose probability reaches p (nucleus sampling;
            None or 1.0: all).
        seed: Seed of the sampling generator (None: nondeterministic).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        """Raises `SettingError` (a `ValueError`) naming the field out of range."""
        if self.temperature < 0:
            raise SettingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise SettingError(f"top_k must be positive, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SettingError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        """Whether decoding is deterministic argmax."""
        return self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A seeded generator on `device`, or None when unseeded."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids `[B]` from `logits` `[B, V]`."""
    if params.is_greedy:
        return logits.argmax(dim=-1)
    scores = logits.to(torch.float32) / params.temperature
    if params.top_k is not None and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already reach top_p; the best one always stays.
        drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]
