"""Tiny checkpoints and transformers references the moe-gen tests share (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from moe_core import build_tiny_checkpoint


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread. On a busy 2-core runner, torch's thread pool turned
    millisecond steps into 40x slower spin-waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: build_tiny_checkpoint(kind, root / kind) for kind in ("qwen3_moe",
                                                                         "deepseek_v2")}

@pytest.fixture(scope="session")
def reference_of() -> object:
    """`reference(folder, prompts, eos, num_new)`: see `reference`."""
    return reference

def reference(folder: Path | str, prompts: list[list[int]], eos: list[int],
              num_new: int) -> list[list[int]]:
    """transformers' greedy `generate`, one request at a time (no padding at all)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = []
    for prompt in prompts:
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=num_new, do_sample=False,
                             eos_token_id=eos or None, pad_token_id=0)
        row = ids[0, len(prompt) :].tolist()
        out.append(row)
    return out
