"""Token-length distributions of synthetic workloads: `512` (fixed), `uniform:256:768`
(integers, both ends included) or `normal:512:64` (mean, standard deviation; rounded, at least 1).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from moe_cap.errors import WorkloadError

__all__ = ["LengthDistribution", "parse_length"]

Kind = Literal["fixed", "uniform", "normal"]


@dataclass(frozen=True)
class LengthDistribution:
    """A distribution of positive token counts.

    Attributes:
        kind: `"fixed"`, `"uniform"` or `"normal"`.
        a: The value (fixed), the low end (uniform) or the mean (normal).
        b: The high end (uniform) or the standard deviation (normal); unused when fixed.
    """

    kind: Kind
    a: float
    b: float = 0.0

    def __post_init__(self) -> None:
        ok = {"fixed": self.a >= 1, "uniform": 1 <= self.a <= self.b,
              "normal": self.a >= 1 and self.b >= 0}
        if not ok.get(self.kind, False):
            raise WorkloadError(f"bad length distribution {self.describe()}: lengths are >= 1 "
                                f"(uniform:LOW:HIGH needs LOW <= HIGH)")

    def draw(self, rng: random.Random) -> int:
        """One length."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    def describe(self) -> str:
        """The text form `parse_length` reads."""
        if self.kind == "fixed":
            return f"{self.a:g}"
        return f"{self.kind}:{self.a:g}:{self.b:g}"


def parse_length(text: str, option: str) -> LengthDistribution:
    """Read `N`, `uniform:LOW:HIGH` or `normal:MEAN:STD`.

    Raises:
        WorkloadError: anything else (naming `option`).
    """
    parts = text.strip().split(":")
    try:
        if len(parts) == 1:
            return LengthDistribution("fixed", int(parts[0]))
        if len(parts) == 3 and parts[0] == "uniform":
            return LengthDistribution("uniform", int(parts[1]), int(parts[2]))
        if len(parts) == 3 and parts[0] == "normal":
            return LengthDistribution("normal", float(parts[1]), float(parts[2]))
    except ValueError:
        pass
    except WorkloadError as exc:
        raise WorkloadError(f"{option}: {exc}") from None
    raise WorkloadError(f"{option} takes N, uniform:LOW:HIGH or normal:MEAN:STD, got {text!r}")
