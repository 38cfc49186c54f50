"""Reading tensors from a folder of safetensors shards, with or without an index file."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from moe_core.errors import CheckpointError

__all__ = ["CheckpointReader"]

INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Which shard holds each tensor, and lazy, memory-mapped reads of them.

    Build with `CheckpointReader.open(folder)`. A listed shard that is missing, an unreadable or
    truncated shard, and an absent tensor each raise `CheckpointError` naming the file and tensor.
    """

    def __init__(self, folder: Path, tensor_files: dict[str, Path]) -> None:
        self.folder = folder
        self.tensor_files = tensor_files  # tensor name -> shard path

    @classmethod
    def open(cls, folder: str | Path) -> CheckpointReader:
        """Index the shards of `folder`: from `model.safetensors.index.json`, else every
        `*.safetensors` file's own header."""
        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: unreadable index ({exc})") from exc
            files = {name: folder / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{shard}: shard listed in {INDEX_FILE} is missing")
            return cls(folder, files)
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{folder}: no *.safetensors weight files (and no {INDEX_FILE})")
        files = {}
        for shard in shards:
            with _open_shard(shard) as f:
                files.update(dict.fromkeys(f.keys(), shard))
        return cls(folder, files)

    def __contains__(self, name: object) -> bool:
        return name in self.tensor_files

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint."""
        return set(self.tensor_files)

    def file_of(self, name: str) -> Path:
        """The shard holding `name`.

        Raises:
            CheckpointError: no shard holds it.
        """
        try:
            return self.tensor_files[name]
        except KeyError:
            raise CheckpointError(f"{self.folder}: tensor {name!r} not found in the checkpoint") \
                from None

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(name, tensor)` on the CPU for each of `names`, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of(name), []).append(name)
        for shard, shard_names in by_file.items():
            with ExitStack() as stack:
                f = stack.enter_context(_open_shard(shard))
                for name in shard_names:
                    try:
                        tensor = f.get_tensor(name)
                    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                        raise CheckpointError(f"{shard}: cannot read tensor {name!r} ({exc})") \
                            from exc
                    yield name, tensor


def _open_shard(path: Path) -> Any:
    """`safe_open` with errors that name the file (a truncated or corrupt shard fails here)."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
