"""The host tier of the expert store: every routed expert packed as one block, one arena per layer.

Dimension key: E experts per layer, D hidden, I expert width, N = 3 * I * D block elements.

Each MoE layer's experts live in one arena `[E * N]` (one allocation), expert `e` at
`[e * N, (e + 1) * N)`, laid out by `ExpertLayout` (gate | up | down). One allocation per layer,
not one per tensor, because pinning is slow per call and the pinned page count is what matters;
pinned because pageable host memory crosses PCIe at ~6 GB/s instead of ~55 (DESIGN.md).

Pinned arenas are registered host allocations of their exact size (`pinned_memory`): torch's own
pinned allocator rounds each request up to a power of two, up to twice the memory.

A store may hold a shard: only some experts of each layer (an expert-parallel rank's, see
`moe_core.parallel`), packed in expert order, so a rank's host memory holds its own experts only.
Experts keep their global ids; asking a shard for another expert's block is a `KeyError`. The
on-demand copy path works on a shard; the paths that index an arena as `[E, N]` (mapped fetch,
two lanes, streaming) refuse one at install.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from moe_core.architectures import get_architecture
from moe_core.checkpoint import CheckpointReader
from moe_core.dtypes import parse_dtype
from moe_core.errors import CheckpointError
from moe_core.expert_id import ExpertId
from moe_core.loader import fused_expert_name, fused_expert_part
from moe_core.model import MoEForCausalLM
from moe_core.offload.layout import ExpertLayout
from moe_core.offload.pinned_memory import pinned_empty
from moe_core.spec import ModelSpec

__all__ = ["HostExpertStore"]

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class HostExpertStore:
    """Every routed expert of every MoE layer, one contiguous block each, in host memory.

    Build with `from_model` (a model whose experts are in host memory or on a GPU) or
    `from_checkpoint` (straight from safetensors, so no model ever holds the experts).

    Attributes:
        layout: The block layout shared by every expert.
        moe_layers: Decoder-layer indices of the MoE layers, in order.
        num_experts: Routed experts per MoE layer (of the model, also in a shard).
    """

    def __init__(self, layout: ExpertLayout, arenas: dict[int, torch.Tensor],
                 num_experts: int, held: Mapping[int, Sequence[int]] | None = None) -> None:
        """Wrap ready arenas; use the `empty`/`from_*` constructors instead.

        Args:
            layout: Block layout.
            arenas: Decoder-layer index -> 1-D arena `[H * N]` of `layout.dtype`, H the
                experts it holds (E, or a shard's).
            num_experts: E.
            held: A shard: layer -> the experts its arena holds, in increasing order (None:
                every expert).
        """
        self._rows: dict[int, dict[int, int]] | None = None
        if held is not None:
            self._rows = {layer: _rows_of(layer, held.get(layer, ()), num_experts)
                          for layer in arenas}
        for layer, arena in arenas.items():
            count = num_experts if self._rows is None else len(self._rows[layer])
            if arena.dim() != 1 or arena.numel() != count * layout.numel:
                raise ValueError(f"arena of layer {layer} has shape {tuple(arena.shape)}, "
                                 f"expected ({count * layout.numel},)")
            if arena.dtype != layout.dtype or arena.device.type != "cpu":
                raise ValueError(f"arena of layer {layer} must be a {layout.dtype} host tensor")
        self.layout = layout
        self.num_experts = num_experts
        self.moe_layers: tuple[int, ...] = tuple(sorted(arenas))
        self._arenas = arenas

    # Construction ---------------------------------------------------------------------------

    @classmethod
    def empty(cls, layout: ExpertLayout, moe_layers: Iterable[int], num_experts: int,
              pin: bool | None = None, held: Mapping[int, Sequence[int]] | None = None
              ) -> HostExpertStore:
        """Uninitialised arenas for `moe_layers` (of the `held` experts only, for a shard),
        pinned when `pin` (default: CUDA is available).

        `pin=True` without CUDA falls back to pageable memory (`is_pinned` tells which).
        """
        pinned = _should_pin(pin)
        arenas: dict[int, torch.Tensor] = {}
        for layer in moe_layers:
            count = num_experts if held is None else len(held.get(layer, ()))
            numel = count * layout.numel
            arenas[layer] = (pinned_empty(numel, layout.dtype) if pinned
                             else torch.empty(numel, dtype=layout.dtype))  # [H*N]
        return cls(layout, arenas, num_experts, held)

    @classmethod
    def from_model(cls, model: MoEForCausalLM, dtype: torch.dtype | None = None,
                   pin: bool | None = None, experts: Collection[ExpertId] | None = None
                   ) -> HostExpertStore:
        """Pack the routed experts of every MoE block of `model` (on any device).

        Args:
            model: A loaded model; each block's `experts` (`LocalExperts`) is read.
            dtype: Storage dtype; default: the experts' own dtype.
            pin: Pin the arenas; default: when CUDA is available.
            experts: Pack only these (a shard); default: every expert.
        """
        blocks = model.moe_blocks()
        if not blocks:
            raise ValueError("the model has no MoE layers")
        first = blocks[0].experts
        num_experts, inter, hidden = first.gate_proj.shape
        layout = ExpertLayout(hidden, inter, dtype or first.gate_proj.dtype)
        layers = [b.layer for b in blocks]
        held = None if experts is None else held_by_layer(experts, layers, num_experts)
        store = cls.empty(layout, layers, num_experts, pin, held)
        with torch.no_grad():
            for block in blocks:
                local = block.experts
                rows = store.held(block.layer)
                count = len(rows)
                gate, up, down = (p if held is None else p[list(rows)]
                                  for p in (local.gate_proj, local.up_proj, local.down_proj))
                if layout.is_fp8:  # quantised per output channel, scales in each block
                    layout.pack_layer(gate, up, down,
                                      store.arena(block.layer).view(count, layout.numel))
                    continue
                # One layer packed where the experts are, then one large copy into the arena
                # (per-expert copies from a GPU were 18k small transfers for Qwen3-30B-A3B).
                packed = torch.cat([p.reshape(count, -1).to(layout.dtype)
                                    for p in (gate, up, down)], dim=1)  # [H, N]
                store.arena(block.layer).view(count, layout.numel).copy_(packed)
                del packed
        return store

    @classmethod
    def from_checkpoint(cls, folder: str | Path, dtype: str | torch.dtype | None = None,
                        pin: bool | None = None, num_layers: int | None = None,
                        layers: Iterable[int] | None = None,
                        experts: Collection[ExpertId] | None = None) -> HostExpertStore:
        """Pack the routed experts straight from a safetensors checkpoint (per-expert tensors,
        or transformers 5's fused `gate_up_proj` / `down_proj`).

        Tensors are read one at a time through memory maps, so peak host memory is the store
        plus one tensor in flight, whatever the model size.

        Args:
            folder: Checkpoint folder (config.json plus safetensors shards).
            dtype: Storage dtype; default: the checkpoint's dtype (float32 if it names none).
            pin: Pin the arenas; default: when CUDA is available.
            num_layers: Keep only the MoE layers among the first `num_layers` decoder layers.
            layers: Keep only these MoE layers (decoder-layer indices), e.g. one at a time when
                packing a store file layer by layer.
            experts: Read and keep only these experts (a shard); default: every expert.

        Raises:
            CheckpointError: a missing expert tensor or one of the wrong shape.
            ValueError: no MoE layers, or `layers` names a layer that is not one.
        """
        folder = Path(folder)
        spec = ModelSpec.from_pretrained(folder)
        if num_layers is not None:
            spec = spec.truncated(num_layers)
        if not spec.moe_layers:
            raise ValueError(f"{folder}: the model has no MoE layers")
        moe_layers = list(spec.moe_layers)
        if layers is not None:
            chosen = list(layers)
            bad = [layer for layer in chosen if layer not in spec.moe_layers]
            if bad:
                raise ValueError(f"layers {bad} are not MoE layers of {folder} "
                                 f"(MoE layers: {list(spec.moe_layers)})")
            moe_layers = sorted(set(chosen))
        names = get_architecture(spec.architecture).layout
        dtype = parse_dtype(dtype if dtype is not None else (spec.torch_dtype or "float32"))
        layout = ExpertLayout(spec.hidden_size, spec.moe.expert_intermediate_size, dtype)
        num_experts = spec.moe.num_experts
        held = None if experts is None else held_by_layer(experts, moe_layers, num_experts)
        store = cls.empty(layout, moe_layers, num_experts, pin, held)
        reader = CheckpointReader.open(folder)
        wanted: dict[str, tuple[ExpertId, int]] = {}  # checkpoint name -> (expert, projection)
        fused: dict[str, list[tuple[int, int]]] = {}  # fused name -> [(layer, projection)]
        for layer in moe_layers:
            for p, projection in enumerate(_PROJECTIONS):
                stacked = f"model.layers.{layer}.mlp.experts.{projection}"
                per_expert = names.expert_names(stacked, num_experts)
                if all(key in reader for key in per_expert):
                    wanted.update((per_expert[e], (ExpertId(layer, e), p))
                                  for e in store.held(layer))
                else:
                    fused.setdefault(fused_expert_name(reader, names, stacked), []).append(
                        (layer, p))
        for key, tensor in reader.read(wanted):
            expert, p = wanted[key]
            store._fill(reader, key, expert, p, tensor)
        for key, tensor in reader.read(fused):
            for layer, p in fused[key]:
                part = fused_expert_part(tensor, _PROJECTIONS[p])  # [E, out, in]
                for e in store.held(layer):
                    store._fill(reader, key, ExpertId(layer, e), p, part[e])
        return store

    @classmethod
    def from_packed(cls, path: str | Path, pin: bool | None = None,
                    verify: bool = True) -> HostExpertStore:
        """Read a store file written by `moe-core pack` (see `moe_core.offload.packed_store`),
        checking each expert block's checksum unless `verify` is False."""
        from moe_core.offload.packed_store import read_packed

        return read_packed(path, pin, verify=verify)

    def to_dtype(self, dtype: torch.dtype) -> HostExpertStore:
        """This store with its experts converted to `dtype` (itself when they already are),
        pinned as this one is; e.g. a bf16 store file read for a float32 run on the CPU, or
        quantised to FP8 (`fp8.FP8`).

        Raises:
            ValueError: converting an FP8 store to another dtype.
        """
        if dtype == self.layout.dtype:
            return self
        if self.layout.is_fp8:
            raise ValueError("an FP8 store stays FP8 (the executors dequantise it just before "
                             "the products); it cannot be converted to " + str(dtype))
        layout = ExpertLayout(self.layout.hidden_size, self.layout.intermediate_size, dtype)
        held = self._held_map()
        store = HostExpertStore.empty(layout, self.moe_layers, self.num_experts, self.is_pinned,
                                      held)
        for layer in self.moe_layers:
            if layout.is_fp8:  # quantised from this store's stacked views, a layer at a time
                count = len(self.held(layer))
                source = self.arena(layer).view(count, self.layout.numel)
                layout.pack_layer(*self.layout.stacked_views(source),
                                  store.arena(layer).view(count, layout.numel))
            else:
                store.arena(layer).copy_(self.arena(layer))
        return store

    def subset(self, experts: Collection[ExpertId]) -> HostExpertStore:
        """A new store (pinned as this one is) holding copies of `experts` only: a shard.

        Raises:
            KeyError: this store does not hold one of them.
        """
        held = held_by_layer(experts, self.moe_layers, self.num_experts)
        store = HostExpertStore.empty(self.layout, self.moe_layers, self.num_experts,
                                      self.is_pinned, held)
        for expert in store.experts():
            store.block(expert).copy_(self.block(expert))
        return store

    def _fill(self, reader: CheckpointReader, key: str, expert: ExpertId, projection: int,
              tensor: torch.Tensor) -> None:
        target = self.layout.views(self.block(expert))[projection]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{reader.file_of(key)}: tensor {key!r} has shape "
                                  f"{tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)

    # Queries --------------------------------------------------------------------------------

    def arena(self, layer: int) -> torch.Tensor:
        """The 1-D arena `[E * N]` of MoE layer `layer` (a decoder-layer index)."""
        try:
            return self._arenas[layer]
        except KeyError:
            raise KeyError(f"layer {layer} is not a MoE layer of this store "
                           f"(MoE layers: {self.moe_layers})") from None

    def block(self, expert: ExpertId) -> torch.Tensor:
        """The 1-D block `[N]` of `expert` (a view into its layer's arena).

        Raises:
            KeyError: an index out of range, or an expert a shard does not hold.
        """
        arena = self.arena(expert.layer)
        row = self.row(expert)
        n = self.layout.numel
        return arena[row * n : (row + 1) * n]

    def row(self, expert: ExpertId) -> int:
        """`expert`'s row in its layer's arena: its index, or in a shard its rank among the
        experts held (`held`).

        Raises:
            KeyError: an index out of range, or an expert a shard does not hold.
        """
        if not 0 <= expert.expert < self.num_experts:
            raise KeyError(f"{expert}: expert index out of range 0..{self.num_experts - 1}")
        if self._rows is None:
            return expert.expert
        found = self._rows.get(expert.layer, {}).get(expert.expert)
        if found is None:
            raise KeyError(f"{expert} is not in this store (it holds a shard of the experts)")
        return found

    def rows(self, layer: int, first: int, count: int) -> torch.Tensor:
        """Rows `first .. first + count - 1` of `layer`'s arena as one tensor `[count, N]` (a
        view): the blocks of experts whose rows (`row`) are consecutive, for one copy.

        Raises:
            IndexError: rows out of range.
        """
        n = self.layout.numel
        arena = self.arena(layer)
        held = arena.numel() // n
        if count <= 0 or first < 0 or first + count > held:
            raise IndexError(f"rows {first}..{first + count - 1} of layer {layer} out of range "
                             f"0..{held - 1}")
        return arena.view(held, n)[first : first + count]

    def weights(self, expert: ExpertId, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(gate [I, D], up [I, D], down [D, I])` views of `expert`'s block; of an FP8 store,
        its matrices dequantised to `dtype` (new tensors; `dtype` is then required)."""
        return self.layout.matrices(self.block(expert), dtype)

    def experts(self) -> list[ExpertId]:
        """Every expert the store holds, layer by layer."""
        return [ExpertId(layer, e) for layer in self.moe_layers for e in self.held(layer)]

    def held(self, layer: int) -> Sequence[int]:
        """The experts of MoE layer `layer` whose blocks this store holds, in increasing order
        (every expert unless it is a shard)."""
        if self._rows is None:
            return range(self.num_experts)
        return tuple(self._rows[layer])

    def holds(self, expert: ExpertId) -> bool:
        """Whether this store has `expert`'s block."""
        if expert.layer not in self._arenas or not 0 <= expert.expert < self.num_experts:
            return False
        return self._rows is None or expert.expert in self._rows[expert.layer]

    @property
    def is_shard(self) -> bool:
        """Whether the store holds only some experts (arenas are not `[E, N]`)."""
        return self._rows is not None

    def _held_map(self) -> dict[int, Sequence[int]] | None:
        return None if self._rows is None else {layer: self.held(layer)
                                                for layer in self.moe_layers}

    @property
    def nbytes(self) -> int:
        """Bytes held by all arenas."""
        return sum(a.numel() * a.element_size() for a in self._arenas.values())

    @property
    def is_pinned(self) -> bool:
        """Whether every arena is in page-locked memory."""
        return bool(self._arenas) and all(a.is_pinned() for a in self._arenas.values())


def held_by_layer(experts: Collection[ExpertId], moe_layers: Iterable[int],
                  num_experts: int) -> dict[int, tuple[int, ...]]:
    """Layer -> the chosen experts' indices, increasing (every MoE layer named, maybe empty).

    Raises:
        ValueError: an expert of another layer or out of range.
    """
    held: dict[int, list[int]] = {layer: [] for layer in moe_layers}
    for expert in experts:
        if expert.layer not in held or not 0 <= expert.expert < num_experts:
            raise ValueError(f"{expert} is not a routed expert of MoE layers {sorted(held)} "
                             f"with {num_experts} experts each")
        held[expert.layer].append(expert.expert)
    return {layer: tuple(sorted(set(es))) for layer, es in held.items()}


def _rows_of(layer: int, experts: Sequence[int], num_experts: int) -> dict[int, int]:
    """Expert -> its row in the layer's arena, for a shard holding `experts` (increasing)."""
    if list(experts) != sorted(set(experts)) or any(not 0 <= e < num_experts for e in experts):
        raise ValueError(f"the experts held of layer {layer} must be distinct, increasing and "
                         f"in 0..{num_experts - 1}, got {list(experts)}")
    return {e: row for row, e in enumerate(experts)}


def _should_pin(pin: bool | None) -> bool:
    """Pin when asked (default: when CUDA is available), and only where CUDA can pin."""
    available = torch.cuda.is_available()
    return available if pin is None else (pin and available)
