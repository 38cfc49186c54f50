"""Bad input gives one clear error naming the file, tensor or field at fault.

Each test breaks one thing in a copy of a tiny Mixtral checkpoint (written by transformers) and
checks the error's type and the words of its message. The CLI prints these messages as they are,
so each must fit on one line.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from moe_core import (
    CheckpointError,
    ConfigError,
    DtypeError,
    ModelSpec,
    MoECoreError,
    UnsupportedArchitectureError,
    load_model,
    parse_dtype,
    resolve_model_path,
)
from moe_core.tiny_checkpoints import build_tiny_checkpoint
from safetensors.torch import load_file, save_file

SHARD = "model.safetensors"
# Names as Mixtral's checkpoint spells them (transformers saves the original format).
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EXPERT_W2 = "model.layers.1.block_sparse_moe.experts.3.w2.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral checkpoint, built once; tests break copies of it."""
    return build_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"))


@pytest.fixture
def checkpoint(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny checkpoint that the test may break."""
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def raised(error_type: type[Exception], *args: object, **kwargs: object) -> str:
    """The one-line message of the `error_type` that `load_model(*args, **kwargs)` raises."""
    with pytest.raises(error_type) as info:
        load_model(*args, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert isinstance(info.value, MoECoreError)  # the CLI catches exactly these
    assert "\n" not in message
    return message


def edit_config(folder: Path, **changes: object) -> Path:
    """Change (or with value `...`, delete) fields of `folder/config.json`; returns its path."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


def rewrite_shard(folder: Path, **tensors: torch.Tensor | None) -> None:
    """Replace (or with None, remove) tensors of the single shard, keyed by name."""
    path = folder / SHARD
    state = load_file(path)
    for name, tensor in tensors.items():
        if tensor is None:
            del state[name]
        else:
            state[name] = tensor
    save_file(state, path, metadata={"format": "pt"})


def test_the_pristine_checkpoint_loads(checkpoint: Path) -> None:
    # The baseline the other tests break: it loads, and its weights are the file's.
    model = load_model(checkpoint, dtype="float32")
    torch.testing.assert_close(model.model.norm.weight, load_file(checkpoint / SHARD)[
        "model.norm.weight"])


# --- config.json ------------------------------------------------------------------------------


def test_missing_config_json(checkpoint: Path) -> None:
    (checkpoint / "config.json").unlink()
    message = raised(ConfigError, checkpoint)
    assert str(checkpoint / "config.json") in message and "not found" in message
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        ModelSpec.from_pretrained(checkpoint)


def test_config_json_not_json(checkpoint: Path) -> None:
    (checkpoint / "config.json").write_text('{"architectures": ["MixtralForCausalLM"],,}')
    message = raised(ConfigError, checkpoint)
    assert message.startswith(f"{checkpoint / 'config.json'}: not valid JSON")


def test_config_json_not_an_object(checkpoint: Path) -> None:
    (checkpoint / "config.json").write_text("[1, 2]")
    assert "expected a JSON object" in raised(ConfigError, checkpoint)


def test_missing_required_field(checkpoint: Path) -> None:
    path = edit_config(checkpoint, hidden_size=...)
    assert raised(ConfigError, checkpoint) == f"{path}: missing field 'hidden_size'"


def test_field_of_the_wrong_type(checkpoint: Path) -> None:
    path = edit_config(checkpoint, num_hidden_layers="3")
    message = raised(ConfigError, checkpoint)
    assert message == f"{path}: field 'num_hidden_layers' must be an integer, got '3'"


def test_inconsistent_fields_name_the_file(checkpoint: Path) -> None:
    path = edit_config(checkpoint, num_experts_per_tok=5)  # the tiny Mixtral has 4 experts
    message = raised(ConfigError, checkpoint)
    assert message.startswith(f"{path}: ") and "top_k (5) exceeds num_experts (4)" in message


def test_missing_architectures(checkpoint: Path) -> None:
    path = edit_config(checkpoint, architectures=...)
    assert raised(ConfigError, checkpoint) == f"{path}: missing field 'architectures'"


def test_unsupported_architecture_lists_the_supported_ones(checkpoint: Path) -> None:
    edit_config(checkpoint, architectures=["LlamaForCausalLM"])
    message = raised(UnsupportedArchitectureError, checkpoint)
    assert "'LlamaForCausalLM'" in message
    for name in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                 "OlmoeForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
        assert name in message


def test_unsupported_rope_scaling(checkpoint: Path) -> None:
    edit_config(checkpoint, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
    assert "rope scaling 'longrope' is not supported" in raised(ConfigError, checkpoint)


def test_bad_generation_config(checkpoint: Path) -> None:
    (checkpoint / "generation_config.json").write_text("{")
    message = raised(ConfigError, checkpoint)
    assert "generation_config.json: not valid JSON" in message


# --- Model paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/no/such/model/folder", "no/such/model", "not a hub id"])
def test_neither_a_folder_nor_a_hub_id(name: str) -> None:
    assert raised(ConfigError, name) == f"{name}: no such model folder"
    with pytest.raises(ConfigError, match="no such model folder"):
        resolve_model_path(name)


# --- Weight files -----------------------------------------------------------------------------


def test_no_weight_files(checkpoint: Path) -> None:
    (checkpoint / SHARD).unlink()
    message = raised(CheckpointError, checkpoint)
    assert message == f"{checkpoint}: no *.safetensors weight files (and no " \
                      "model.safetensors.index.json)"
    load_model(checkpoint, dummy=True)  # random weights need only the config


def split_into_two_shards(folder: Path) -> tuple[Path, Path]:
    """Rewrite the single shard as two, with the index transformers writes."""
    state = load_file(folder / SHARD)
    names = sorted(state)
    shards = (folder / "model-00001-of-00002.safetensors",
              folder / "model-00002-of-00002.safetensors")
    halves = (names[: len(names) // 2], names[len(names) // 2 :])
    weight_map = {}
    for shard, half in zip(shards, halves, strict=True):
        save_file({n: state[n] for n in half}, shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(half, shard.name))
    (folder / SHARD).unlink()
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return shards


def test_missing_shard_listed_in_the_index(checkpoint: Path) -> None:
    whole = load_model(checkpoint, dtype="float32")
    _, second = split_into_two_shards(checkpoint)
    sharded = load_model(checkpoint, dtype="float32")  # the index is honoured ...
    for (name, a), (_, b) in zip(whole.named_parameters(), sharded.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name
    second.unlink()  # ... and a shard it lists must be there
    message = raised(CheckpointError, checkpoint)
    assert message == f"{second}: shard listed in model.safetensors.index.json is missing"


def test_unreadable_index(checkpoint: Path) -> None:
    (checkpoint / "model.safetensors.index.json").write_text('{"metadata": {}}')
    message = raised(CheckpointError, checkpoint)
    assert "model.safetensors.index.json: unreadable index" in message and "weight_map" in message


def test_truncated_shard(checkpoint: Path) -> None:
    path = checkpoint / SHARD
    with path.open("r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    message = raised(CheckpointError, checkpoint)
    assert message.startswith(f"{path}: not a readable safetensors file")


def test_truncated_shard_behind_an_index(checkpoint: Path) -> None:
    first, _ = split_into_two_shards(checkpoint)
    with first.open("r+b") as f:
        f.truncate(os.path.getsize(first) // 2)
    assert raised(CheckpointError, checkpoint).startswith(
        f"{first}: not a readable safetensors file")


def test_tensor_of_the_wrong_shape(checkpoint: Path) -> None:
    q_proj = load_file(checkpoint / SHARD)[Q_PROJ]  # [32, 32]
    rewrite_shard(checkpoint, **{Q_PROJ: torch.zeros(q_proj.shape[0] + 1, q_proj.shape[1])})
    message = raised(CheckpointError, checkpoint)
    assert message == (f"{checkpoint / SHARD}: tensor {Q_PROJ!r} has shape (33, 32), "
                       "expected (32, 32)")


def test_expert_tensor_of_the_wrong_shape(checkpoint: Path) -> None:
    w2 = load_file(checkpoint / SHARD)[EXPERT_W2]  # down: [hidden 32, expert width 48]
    rewrite_shard(checkpoint, **{EXPERT_W2: w2.T.contiguous()})
    message = raised(CheckpointError, checkpoint)
    assert message == (f"{checkpoint / SHARD}: tensor {EXPERT_W2!r} has shape (48, 32), "
                       "expected (32, 48)")


def test_missing_tensor(checkpoint: Path) -> None:
    rewrite_shard(checkpoint, **{"model.norm.weight": None})
    message = raised(CheckpointError, checkpoint)
    assert message == f"{checkpoint}: tensor 'model.norm.weight' not found in the checkpoint"


def test_missing_expert_tensor(checkpoint: Path) -> None:
    rewrite_shard(checkpoint, **{EXPERT_W2: None})
    message = raised(CheckpointError, checkpoint)
    # The first per-expert name is reported, and the fused spelling that was also tried.
    assert message.startswith(f"{checkpoint}: tensor "
                              "'model.layers.1.block_sparse_moe.experts.0.w2.weight' not found")
    assert "model.layers.1.block_sparse_moe.experts.down_proj" in message


# --- Dtypes -----------------------------------------------------------------------------------


def test_unknown_dtype_argument(checkpoint: Path) -> None:
    message = raised(DtypeError, checkpoint, dtype="float8")
    assert message.startswith("unknown dtype 'float8'; use one of float32, bfloat16, float16")


def test_unknown_dtype_in_the_config(checkpoint: Path) -> None:
    edit_config(checkpoint, dtype="int8")
    assert raised(DtypeError, checkpoint).startswith("unknown dtype 'int8'")
    load_model(checkpoint, dtype="bf16")  # an explicit dtype overrides the config's


@pytest.mark.parametrize(("value", "dtype"), [
    ("bf16", torch.bfloat16), ("torch.float16", torch.float16), ("FP32", torch.float32),
    ("half", torch.float16), (torch.bfloat16, torch.bfloat16),
])
def test_dtype_spellings(value: str | torch.dtype, dtype: torch.dtype) -> None:
    assert parse_dtype(value) == dtype


def test_unsupported_torch_dtype() -> None:
    with pytest.raises(DtypeError, match=r"unsupported dtype torch\.int8"):
        parse_dtype(torch.int8)
