"""Routing set by hand, for benchmarks: a model's routers replaced by a known distribution.

Three kinds, each a context manager over a model, and `routing_for(model, spec)` to pick one by
a spec string (what a benchmark's `--routing` option takes):

- `uniform`: `uniform_routing(model)`, uniform random top-k (the worst case for a cache);
- `zipf:s=1.1,reuse=0.5`: `zipf_routing(model, s, reuse)`, skewed with temporal re-use
  (`zipf_routing.ZipfRouting`);
- `replay:PATH`: `replay_routing(model, tape)`, recorded routing played back
  (`replay_routing.ReplayRouting`), read by an installed tape loader (moe-infinity reads its
  trace files) and mapped onto the model's layers and experts.

Dimension key: T tokens, D hidden, E routed experts, K experts per token.

Why: models with dummy (random) weights route almost every decode token of a sequence to the same
experts (measured: 99.9% hit rate with 46% of the experts cached, batch 1), which flatters any
expert cache. Every benchmark where experts are cached or offloaded therefore sets its routing
explicitly (../shared/BENCHMARKS.md). Uniform random top-k is the worst case for a cache: each
token picks K distinct experts uniformly, independently of everything before.

The override draws on the device from torch's default generator, so a decode step that uses it
can still be captured as a CUDA graph (each replay draws afresh).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moe_core.errors import SettingError
from moe_core.plugins import load_plugin
from moe_core.replay_routing import ReplayRouting, RoutingTape
from moe_core.zipf_routing import ZipfRouting

if TYPE_CHECKING:
    from moe_core.model import MoEForCausalLM
    from moe_core.moe_block import MoEBlock, RoutingOverride

__all__ = ["ROUTING_KINDS", "TapeLoader", "UniformRouting", "check_routing", "replay_routing",
           "routing_for", "uniform_routing", "zipf_routing"]

ROUTING_KINDS = ("uniform", "zipf", "replay")
"""The kinds `routing_for` takes: `uniform`, `zipf:s=S,reuse=R`, `replay:PATH`."""

TapeLoader = Callable[[Path], RoutingTape]
"""Reads recorded routing from a file (the `moe_core.routing_tapes` entry points)."""


class UniformRouting:
    """Each token's K experts drawn uniformly without replacement, weighted 1/K each."""

    def __init__(self, num_experts: int, top_k: int) -> None:
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(expert_ids [T, K], weights [T, K] float32)` for `hidden` `[T, D]`."""
        t = hidden.shape[0]
        scores = torch.rand(t, self.num_experts, device=hidden.device)  # [T, E]
        ids = scores.topk(self.top_k, dim=-1).indices  # [T, K] distinct, uniform
        weights = torch.full((t, self.top_k), 1.0 / self.top_k, device=hidden.device)
        return ids, weights


@contextmanager
def _overriding(model: MoEForCausalLM,
                make: Callable[[int, MoEBlock], RoutingOverride]) -> Iterator[None]:
    """Every MoE block's routing replaced by `make(row, block)` while inside (row: the block's
    place among the MoE blocks); the overrides are put back as they were on exit."""
    blocks = model.moe_blocks()
    previous = [block.routing_override for block in blocks]
    for row, block in enumerate(blocks):
        block.routing_override = make(row, block)
    try:
        yield
    finally:
        for block, old in zip(blocks, previous, strict=True):
            block.routing_override = old


def uniform_routing(model: MoEForCausalLM) -> AbstractContextManager[None]:
    """Route every MoE block of `model` uniformly at random while inside (the override is put
    back as it was on exit)."""
    return _overriding(model, lambda _, block: UniformRouting(block.spec.num_experts,
                                                              block.spec.router.top_k))


def zipf_routing(model: MoEForCausalLM, s: float = 1.0, reuse: float = 0.0, seed: int = 0
                 ) -> AbstractContextManager[None]:
    """Route every MoE block of `model` by a Zipf law of exponent `s` with re-use probability
    `reuse` while inside (`ZipfRouting`); each layer's popularity order is a permutation drawn
    from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    blocks = model.moe_blocks()
    perms = [torch.randperm(b.spec.num_experts, generator=generator) for b in blocks]
    return _overriding(model, lambda row, block: ZipfRouting(
        block.spec.num_experts, block.spec.router.top_k, s, reuse, perms[row], model.device))


def replay_routing(model: MoEForCausalLM, tape: RoutingTape, seed: int = 0,
                   row_stride: int | None = None) -> AbstractContextManager[None]:
    """Replay `tape`, mapped onto `model`'s MoE layers, experts and top-k (`RoutingTape.mapped`,
    permutations from `seed`), a step per forward pass, while inside (`ReplayRouting`)."""
    blocks = model.moe_blocks()
    if not blocks:
        raise ValueError("the model has no MoE blocks to route")
    moe = blocks[0].spec
    fitted = tape.mapped(len(blocks), moe.num_experts, moe.router.top_k, seed)
    look = fitted.lookahead
    return _overriding(model, lambda row, _: ReplayRouting(
        fitted.ids[:, row], row_stride, model.device,
        None if look is None else look[:, row]))


def routing_for(model: MoEForCausalLM, spec: str, *, seed: int = 0,
                tape_loader: TapeLoader | None = None) -> AbstractContextManager[None]:
    """The routing a benchmark names, as a context manager over `model`.

    Args:
        model: The model whose MoE blocks are re-routed while inside.
        spec: `uniform`, `zipf:s=S,reuse=R` (both optional: s=1.0, reuse=0.0) or `replay:PATH`.
        seed: For the per-layer permutations (the draws use torch's generator: seed it with
            `torch.manual_seed` for repeatable draws).
        tape_loader: Reads `replay:PATH`; default: the installed `moe_core.routing_tapes`
            entry point `traces` (moe-infinity's trace files).

    Raises:
        SettingError: a malformed spec, or `replay:` without a loader installed.
    """
    kind, params = _parsed(spec)
    if kind == "uniform":
        return uniform_routing(model)
    if kind == "zipf":
        return zipf_routing(model, params["s"], params["reuse"], seed)
    loader = tape_loader if tape_loader is not None else _installed_loader(spec)
    return replay_routing(model, loader(Path(spec.strip().partition(":")[2])), seed)


def check_routing(spec: str) -> None:
    """Check a routing spec as `routing_for` reads it, without a model (so a command can refuse
    a bad `--routing` before it loads anything; a replay file is read only by `routing_for`).

    Raises:
        SettingError: a malformed spec.
    """
    _parsed(spec)


def _parsed(spec: str) -> tuple[str, dict[str, float]]:
    """The kind of `spec` and its numeric parameters (zipf's, defaults filled in)."""
    kind, _, arg = spec.strip().partition(":")
    if kind == "uniform" and not arg:
        return kind, {}
    if kind == "zipf":
        params = _params(spec, arg, {"s": 1.0, "reuse": 0.0})
        if params["s"] < 0 or not 0.0 <= params["reuse"] <= 1.0:
            raise SettingError(f"routing {spec!r}: s must be >= 0 and reuse in [0, 1]")
        return kind, params
    if kind == "replay" and arg:
        return kind, {}
    raise SettingError(f"routing {spec!r}: expected uniform, zipf:s=S,reuse=R or replay:PATH")


def _params(spec: str, text: str, defaults: dict[str, float]) -> dict[str, float]:
    out = dict(defaults)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or name.strip() not in out:
            raise SettingError(f"routing {spec!r}: unknown parameter {part!r} (expected "
                               f"{', '.join(out)})")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise SettingError(f"routing {spec!r}: {name.strip()} must be a number, got "
                               f"{value!r}") from None
    return out


def _installed_loader(spec: str) -> TapeLoader:
    loader = load_plugin("moe_core.routing_tapes", "traces", f"routing {spec!r}")
    if not callable(loader):
        raise SettingError(f"routing {spec!r}: the installed tape loader is not callable")
    return loader
