"""Named policy set-ups for the simulator: an eviction rule, with or without prefetching, with or
without the lookahead predictor source.

Grammar: `EVICTION[+prefetch][-nolookahead]`, EVICTION one of `lru`, `lfu`, `aware` (activation
-aware), `belady` (offline optimum; no prefetch). Examples: `lru`, `aware`, `aware+prefetch`,
`aware+prefetch-nolookahead`, `lru+prefetch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from moe_core import SettingError

__all__ = ["DEFAULT_POLICIES", "EVICTIONS", "Eviction", "PolicySetup", "parse_policies"]

Eviction = Literal["lru", "lfu", "aware", "belady"]
EVICTIONS: tuple[str, ...] = ("lru", "lfu", "aware", "belady")
DEFAULT_POLICIES = ("lru", "lfu", "aware-nolookahead", "aware", "aware+prefetch-nolookahead",
                    "aware+prefetch", "lru+prefetch", "belady")


@dataclass(frozen=True, kw_only=True)
class PolicySetup:
    """One simulated policy.

    Attributes:
        eviction: Which expert leaves when a slot is needed.
        prefetch: Whether the predictor's top experts are fetched ahead of use.
        lookahead: Whether the predictor uses the one-layer lookahead source.
    """

    eviction: Eviction
    prefetch: bool = False
    lookahead: bool = True

    def __post_init__(self) -> None:
        if self.eviction not in EVICTIONS:
            raise SettingError(f"unknown eviction {self.eviction!r}; choose from "
                             f"{', '.join(EVICTIONS)}")
        if self.eviction == "belady" and self.prefetch:
            raise SettingError("belady is the demand-fetching optimum; it does not prefetch")

    @property
    def name(self) -> str:
        """The set-up's name in the grammar above."""
        name = self.eviction + ("+prefetch" if self.prefetch else "")
        return name if self.lookahead or not self.uses_predictor else name + "-nolookahead"

    @property
    def uses_predictor(self) -> bool:
        """Whether the set-up needs the predictor (activation-aware eviction or prefetch)."""
        return self.eviction == "aware" or self.prefetch

    @classmethod
    def parse(cls, text: str) -> PolicySetup:
        """A set-up from its name; raises `ValueError` naming the bad part."""
        name = text.strip().lower()
        lookahead = not name.endswith("-nolookahead")
        name = name.removesuffix("-nolookahead")
        eviction, _, extra = name.partition("+")
        if extra not in ("", "prefetch"):
            raise SettingError(f"policy {text!r}: expected EVICTION[+prefetch][-nolookahead]")
        setup = cls(eviction=cast(Eviction, eviction), prefetch=extra == "prefetch",
                    lookahead=lookahead)
        if not lookahead and not setup.uses_predictor:
            raise SettingError(f"policy {text!r}: -nolookahead only applies to 'aware' or "
                             "'+prefetch' policies")
        return setup


def parse_policies(text: str) -> list[PolicySetup]:
    """Comma-separated policy names; raises `ValueError` for an empty list or a bad name."""
    setups = [PolicySetup.parse(part) for part in text.split(",") if part.strip()]
    if not setups:
        raise SettingError("no policy given")
    return setups
