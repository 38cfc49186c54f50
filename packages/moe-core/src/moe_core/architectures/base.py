"""What one architecture contributes: how to read its config, how its checkpoint names weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moe_core.hf_config import HFConfig
from moe_core.spec import ModelSpec

__all__ = ["Architecture", "CheckpointLayout"]


@dataclass(frozen=True)
class CheckpointLayout:
    """How checkpoint tensor names differ from our parameter names.

    Our module tree uses the common Hugging Face names (`model.layers.3.self_attn.q_proj.weight`,
    `...mlp.gate.weight`), so most names map to themselves. Routed experts are the exception: we
    hold each projection of all experts as one `[E, out, in]` tensor
    (`...mlp.experts.gate_proj`), which the checkpoint stores per expert.

    Attributes:
        renames: `(ours, theirs)` substring replacements applied in order to our names.
        expert_projections: Per-expert tensor names of the gate, up and down projections
            (`("w1", "w3", "w2")` for Mixtral).
    """

    renames: tuple[tuple[str, str], ...] = ()
    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint name of our (non-expert) parameter `name`."""
        for ours, theirs in self.renames:
            name = name.replace(ours, theirs)
        return name

    def expert_names(self, stacked_name: str, num_experts: int) -> list[str]:
        """Per-expert checkpoint names of one stacked expert tensor of ours.

        `model.layers.0.mlp.experts.up_proj` -> `[model.layers.0.mlp.experts.0.up_proj.weight, ...]`
        (with this layout's renames and projection names).
        """
        prefix, projection = stacked_name.rsplit(".", 1)
        index = ("gate_proj", "up_proj", "down_proj").index(projection)
        theirs = self.expert_projections[index]
        prefix = self.checkpoint_name(prefix)
        return [f"{prefix}.{e}.{theirs}.weight" for e in range(num_experts)]


@dataclass(frozen=True)
class Architecture:
    """One supported Hugging Face architecture.

    Attributes:
        name: The `architectures` entry in `config.json`.
        spec_from_config: Parses the config into a `ModelSpec`.
        layout: Checkpoint naming.
    """

    name: str
    spec_from_config: Callable[[HFConfig], ModelSpec]
    layout: CheckpointLayout = CheckpointLayout()
