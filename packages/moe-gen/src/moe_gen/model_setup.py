"""Loading a model for generation: dense part on the device, routed experts in pinned host memory
streamed through GPU slots (moe-core's streaming executor), the planned resident set kept.

The resident experts are spread evenly over the MoE layers, not packed into the first ones: then
every layer streams experts, and while a layer's experts cross PCIe the next layer's KV is
gathered on the host and copied beside them. With whole layers resident (121d6ab's choice), those
layers had nothing to hide the next layer's KV gathers behind: on the H200 the host gathered at
~31 GB/s while the link was busy (host memory shared with the DMA reads), against 53 GB/s for
the link itself, and the link idled through them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moe_core import (
    FP8,
    ExpertId,
    ExpertLayout,
    GpuSlotPool,
    HostExpertStore,
    ModelSpec,
    MoEForCausalLM,
    OffloadRuntime,
    fits_on_device,
    install_offloading,
    load_model,
    make_copy_engine,
    run_dtype,
)

from moe_gen.cost_model import LOOKAHEAD_MIN_SHARE, run_length
from moe_gen.plan import Plan

__all__ = ["LoadedModel", "install_streaming", "load_for_generation", "pack_experts",
           "spread_residents"]


@dataclass
class LoadedModel:
    """A model ready for the engine.

    Attributes:
        model: The model.
        runtime: Its offload runtime, when experts are streamed.
    """

    model: MoEForCausalLM
    runtime: OffloadRuntime | None


def load_for_generation(name: str, device: str, dtype: torch.dtype | None, *, dummy: bool = False,
                        num_layers: int | None = None, seed: int = 0) -> MoEForCausalLM:
    """The whole model on the host (the experts are packed from it later); the dense part moves
    to `device` in `install_streaming`.

    Dummy weights are drawn on `device` when the whole model fits its free memory for a
    moment (moe-core's `fits_on_device`), then moved to the host: seconds, where drawing tens
    of GB on the host takes minutes (the S3 sweep's moe-gen step ran out of its 150 s there).
    The values then differ from a host draw of the same seed; the shapes do not.
    """
    if dummy and device != "cpu":
        # Resolved as load_model would for `device`, so that the size check counts the bytes
        # that will be drawn.
        run = run_dtype(dtype, device, ModelSpec.from_pretrained(name).torch_dtype)
        if fits_on_device(name, torch.device(device), run, num_layers):
            model = load_model(name, device, run, dummy=True, num_layers=num_layers, seed=seed)
            model.to("cpu")  # experts must never stay on a small GPU whole
            torch.cuda.empty_cache()
            return model
    return load_model(name, "cpu", dtype, dummy=dummy, num_layers=num_layers, seed=seed)


def install_streaming(model: MoEForCausalLM, plan: Plan, device: str | torch.device,
                      store: HostExpertStore | None = None, fp8_experts: bool = False
                      ) -> LoadedModel:
    """Pack the routed experts into a host store, free them from the model, move the dense part
    to `device`, and stream experts per the plan (or keep them all when `plan.offload` is off).
    With `store` given (a model loaded without experts), the experts come from it instead.
    With `fp8_experts` they are quantised to FP8 (moe-core's `FP8` store: e4m3, a scale per
    output channel) and always streamed, even when the plan keeps them all resident.

    Raises:
        ValueError: the plan's resident set plus ring exceeds the experts there are.
    """
    device = torch.device(device)
    if (not plan.offload and store is None and not fp8_experts) or not model.moe_blocks():
        return LoadedModel(model.to(device), None)
    if store is None:
        store = pack_experts(model, FP8 if fp8_experts else None, pin=device.type == "cuda")
    elif fp8_experts:
        store = store.to_dtype(FP8)
    for block in model.moe_blocks():
        for param in block.experts.parameters():
            param.data = torch.empty(0, dtype=param.dtype)
    model.to(device)
    experts: list[ExpertId] = store.experts()
    keep = plan.num_resident_experts if plan.offload else len(experts)  # experts only in store
    resident = spread_residents(experts, keep)
    pool = GpuSlotPool(store.layout, len(resident) + plan.ring_size, device)
    runtime = install_offloading(model, store, pool, make_copy_engine(device), kind="streaming",
                                 resident=resident, ring_size=plan.ring_size,
                                 lookahead_min_share=LOOKAHEAD_MIN_SHARE,
                                 max_group=run_length(plan.ring_size),  # as the planner assumes
                                 drop_local_experts=True)
    return LoadedModel(model, runtime)


def pack_experts(model: MoEForCausalLM, dtype: torch.dtype | None, pin: bool
                 ) -> HostExpertStore:
    """The routed experts of `model` in a host store (`dtype`, default theirs; pinned with
    `pin`), packed a layer at a time, each layer's expert weights freed from the model as soon
    as its arena is written: the host then holds the model plus one layer of the store at
    most while packing, not the experts twice (the planner's `load_host_bytes`)."""
    blocks = model.moe_blocks()
    experts = blocks[0].experts
    num_experts, inter, hidden = experts.gate_proj.shape
    layout = ExpertLayout(hidden, inter, dtype or experts.gate_proj.dtype)
    arenas: dict[int, torch.Tensor] = {}
    pin = pin and torch.cuda.is_available()
    with torch.no_grad():
        for block in blocks:
            arena = torch.empty(num_experts * layout.numel, dtype=layout.dtype, pin_memory=pin)
            local = block.experts
            layout.pack_layer(local.gate_proj, local.up_proj, local.down_proj,
                              arena.view(num_experts, layout.numel))
            for param in local.parameters():
                param.data = torch.empty(0, dtype=param.dtype)
            arenas[block.layer] = arena
    return HostExpertStore(layout, arenas, num_experts)


def spread_residents(experts: list[ExpertId], count: int) -> list[ExpertId]:
    """`count` of `experts` spread over their layers round-robin (expert 0 of every layer, then
    expert 1 of every layer, ...): layers differ by at most one resident, the first ones get the
    remainder."""
    by_layer: dict[int, list[ExpertId]] = {}
    for expert in experts:
        by_layer.setdefault(expert.layer, []).append(expert)
    columns = [by_layer[layer] for layer in sorted(by_layer)]
    order = [column[rank] for rank in range(max((len(c) for c in columns), default=0))
             for column in columns if rank < len(column)]
    return order[:count]
