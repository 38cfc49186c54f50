"""`load_model`: a checkpoint folder (or hub id) to a ready `MoEForCausalLM`.

The model is built on the meta device, given its dtype there, and only then allocated on the
target device, so no full-size float32 copy ever exists; tensors are then copied in shard by
shard. In `dummy` mode the weights are random, drawn from the config alone (for speed work on
models whose weights are absent, vLLM's `load_format=dummy` idea).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from moe_core.architectures import CheckpointLayout, get_architecture
from moe_core.checkpoint import CheckpointReader
from moe_core.dtypes import run_dtype
from moe_core.errors import CheckpointError, ConfigError
from moe_core.model import MoEForCausalLM
from moe_core.model_path import resolve_model_path
from moe_core.spec import ModelSpec

__all__ = ["load_model", "resolve_model_path"]

_STACKED_EXPERT = re.compile(r"\.experts\.(gate_proj|up_proj|down_proj)$")


def load_model(model: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, *, dummy: bool = False,
               seed: int = 0, num_layers: int | None = None,
               load_experts: bool = True) -> MoEForCausalLM:
    """Load a supported MoE checkpoint as our own PyTorch model, ready for inference.

    Args:
        model: A checkpoint folder (config.json plus safetensors shards) or a hub repo id.
        device: `"cpu"`, `"cuda"` or any torch device.
        dtype: `float32`, `bfloat16` or `float16`; default: `run_dtype`'s rule (float32 on
            the CPU, else the checkpoint's own dtype).
        dummy: Random weights from `config.json` alone (no weight files needed).
        seed: Seed of the dummy weights.
        num_layers: Keep only the first `num_layers` decoder layers (embedding, final norm and
            LM head stay): a smaller model of the real shapes, for development and benchmarks.
        load_experts: False leaves every MoE block's routed experts empty (never read nor
            allocated): the dense part only, for a model whose experts are served by the offload
            runtime from a `HostExpertStore` (see `load_offloaded`).

    Raises:
        ConfigError: bad or missing `config.json`.
        UnsupportedArchitectureError: an architecture we do not implement.
        CheckpointError: a missing or truncated shard, a missing tensor, a wrong shape.
        DtypeError: an unknown dtype.
    """
    folder = resolve_model_path(model)
    spec = ModelSpec.from_pretrained(folder)
    if num_layers is not None:
        spec = spec.truncated(num_layers)
    layout = get_architecture(spec.architecture).layout
    dtype = run_dtype(dtype, device, spec.torch_dtype)
    device = torch.device(device)
    reader = None if dummy else CheckpointReader.open(folder)

    with torch.device("meta"):
        net = MoEForCausalLM(spec)
    net.to(dtype)
    for block in net.moe_blocks():
        if spec.moe.router.fp32_gate:
            block.gate.float()  # DeepSeek keeps its router in float32 whatever the model dtype
        if not load_experts:
            for param in block.experts.parameters():
                param.data = torch.empty(0, dtype=param.dtype, device="meta")
    # `to_empty` without torch's meta-device `empty_like`, whose first call imports sympy (a
    # few seconds per process); every tensor here is contiguous, so `empty` is the same.
    net._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    net.tie_weights()
    with torch.no_grad():
        if reader is None:
            _init_dummy(net, seed)
        else:
            _copy_weights(net, reader, layout, load_experts)
    net.eval().requires_grad_(False)
    net.generation_defaults = _generation_defaults(folder)
    net.source = folder
    return net


def _copy_weights(net: MoEForCausalLM, reader: CheckpointReader, layout: CheckpointLayout,
                  load_experts: bool = True) -> None:
    """Copy every parameter of `net` from the checkpoint, checking each shape (routed experts
    only when `load_experts`)."""
    params = dict(net.named_parameters())
    wanted: dict[str, tuple[str, int | None]] = {}  # checkpoint name -> (our name, expert)
    fused: dict[str, list[str]] = {}  # fused checkpoint name -> our stacked names it fills
    for name, param in params.items():
        if _STACKED_EXPERT.search(name) and not load_experts:
            continue
        if _STACKED_EXPERT.search(name):
            per_expert = layout.expert_names(name, param.shape[0])
            if all(key in reader for key in per_expert):
                wanted.update((key, (name, e)) for e, key in enumerate(per_expert))
            else:
                fused.setdefault(fused_expert_name(reader, layout, name), []).append(name)
        else:
            wanted[_name_in(reader, layout, name)] = (name, None)
    for key, tensor in reader.read(wanted):
        name, expert = wanted[key]
        target = params[name] if expert is None else params[name][expert]
        _check_shape(reader, key, tensor, target)
        target.copy_(tensor)
    for key, tensor in reader.read(fused):  # each fused tensor is read once, for gate and up
        for name in fused[key]:
            part = fused_expert_part(tensor, name.rsplit(".", 1)[1])
            _check_shape(reader, key, part, params[name])
            params[name].copy_(part)


def _check_shape(reader: CheckpointReader, key: str, tensor: torch.Tensor,
                 target: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(f"{reader.file_of(key)}: tensor {key!r} has shape "
                              f"{tuple(tensor.shape)}, expected {tuple(target.shape)}")


def _name_in(reader: CheckpointReader, layout: CheckpointLayout, name: str) -> str:
    """The checkpoint's name for our parameter `name`: the family's original spelling, or our own
    where only that is present (transformers 5's in-memory names, which `save_pretrained(...,
    save_original_format=False)` writes, e.g. Mixtral's `mlp` for `block_sparse_moe`)."""
    theirs = layout.checkpoint_name(name)
    return name if theirs not in reader and name in reader else theirs


def fused_expert_name(reader: CheckpointReader, layout: CheckpointLayout, name: str) -> str:
    """The fused tensor holding our stacked expert tensor `name` (transformers 5's in-memory
    layout: `experts.gate_up_proj` `[E, 2I, D]`, gate rows first, and `experts.down_proj`).

    Raises:
        CheckpointError: neither per-expert nor fused tensors are present.
    """
    prefix, projection = name.rsplit(".", 1)
    fused = _name_in(reader, layout,
                     f"{prefix}.{'down_proj' if projection == 'down_proj' else 'gate_up_proj'}")
    if fused not in reader:
        missing = layout.expert_names(name, 1)[0]
        raise CheckpointError(f"{reader.folder}: tensor {missing!r} not found in the checkpoint "
                              f"(nor a fused {fused!r})")
    return fused


def fused_expert_part(tensor: torch.Tensor, projection: str) -> torch.Tensor:
    """Our `projection` out of a fused expert tensor."""
    if projection == "down_proj":
        return tensor
    half = tensor.shape[1] // 2
    return tensor[:, :half] if projection == "gate_proj" else tensor[:, half:]


def _init_dummy(net: MoEForCausalLM, seed: int) -> None:
    """Random weights of the right shapes: norms 1, biases 0, matrices N(0, initializer_range)."""
    std = net.spec.initializer_range
    generator = torch.Generator(device=net.device).manual_seed(seed)
    for name, param in net.named_parameters():
        if param.dim() == 1 and name.endswith("norm.weight"):
            param.fill_(1.0)
        elif param.dim() == 1:
            param.zero_()  # biases and DeepSeek-V3's score bias
        else:
            param.normal_(0.0, std, generator=generator)


def _generation_defaults(folder: Path) -> dict[str, object]:
    """`generation_config.json`, if the folder has one (EOS ids, sampling defaults)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}
