"""The model shape a trace belongs to: what the simulator needs to know, and nothing else.

Stored in every trace and collection file's header, so `simulate` runs without the model and a
collection recorded on one model is refused on another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moe_core import ModelSpec

__all__ = ["ModelShape"]


@dataclass(frozen=True)
class ModelShape:
    """The routed-expert shape of one model.

    Attributes:
        model_name: The model as the user named it (folder, hub id or `tiny-moe`).
        moe_layers: Decoder-layer index of each MoE layer (row `l` of an EAM is `moe_layers[l]`).
        num_experts: Routed experts per MoE layer.
        top_k: Experts per token.
        expert_bytes: Bytes of one routed expert as it would cross PCIe.
        expert_dtype: The storage format `expert_bytes` counts (`"bfloat16"`).
    """

    model_name: str
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    expert_bytes: int
    expert_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if not self.moe_layers:
            raise ValueError("ModelShape.moe_layers must name at least one MoE layer")
        if list(self.moe_layers) != sorted(set(self.moe_layers)) or self.moe_layers[0] < 0:
            raise ValueError(f"ModelShape.moe_layers must be increasing layer indices, "
                             f"got {self.moe_layers}")
        for name in ("num_experts", "top_k", "expert_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelShape.{name} must be positive, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"ModelShape.top_k ({self.top_k}) exceeds num_experts "
                             f"({self.num_experts})")

    @property
    def num_moe_layers(self) -> int:
        """MoE layers (the L of an `[L, E]` EAM)."""
        return len(self.moe_layers)

    @property
    def total_experts(self) -> int:
        """Routed experts of the whole model (`L * E`)."""
        return self.num_moe_layers * self.num_experts

    @classmethod
    def from_spec(cls, model_name: str, spec: ModelSpec,
                  expert_dtype: str = "bfloat16") -> ModelShape:
        """The shape of `spec` (experts counted in `expert_dtype`)."""
        layers = tuple(i for i in range(spec.num_layers) if spec.is_moe_layer(i))
        return cls(model_name, layers, spec.moe.num_experts, spec.moe.router.top_k,
                   spec.expert_bytes(expert_dtype), expert_dtype)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        out = asdict(self)
        out["moe_layers"] = list(self.moe_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelShape:
        """The inverse of `to_dict`; raises `ValueError` on missing or bad fields."""
        try:
            layers = data["moe_layers"]
            if not isinstance(layers, list):
                raise TypeError("moe_layers is not a list")
            return cls(str(data["model_name"]), tuple(int(x) for x in layers),
                       _int(data["num_experts"]), _int(data["top_k"]),
                       _int(data["expert_bytes"]), str(data.get("expert_dtype", "bfloat16")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad model shape {data!r}: {exc}") from None

    def describe(self) -> str:
        """One line: `tiny-moe: 6 MoE layers x 16 experts, top-2, 240.0 KiB per expert`."""
        from moe_core import format_bytes

        return (f"{self.model_name}: {self.num_moe_layers} MoE layers x {self.num_experts} "
                f"experts, top-{self.top_k}, {format_bytes(self.expert_bytes)} per expert")


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return value
