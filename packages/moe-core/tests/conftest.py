"""Fixtures shared by moe-core's tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from moe_core import tiny_model_path
from moe_core.kernels.backend import prepare_interpreter
from moe_core.tiny_checkpoints import build_tiny_checkpoint

KernelDevice = Callable[[ModuleType, tuple[str, ...]], torch.device]


@pytest.fixture
def kernel_device(monkeypatch: pytest.MonkeyPatch) -> KernelDevice:
    """`kernel_device(module, references)`: where a kernel test runs (CUDA, compiled, if present;
    else the CPU under Triton's interpreter; skipped if neither), with the named torch
    `references` of `module` replaced so that any fallback to them fails the test."""

    def choose(module: ModuleType, references: tuple[str, ...]) -> torch.device:
        if torch.cuda.is_available():
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
            where = torch.device("cuda")
        elif prepare_interpreter():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            where = torch.device("cpu")
        else:
            pytest.skip("no CUDA, and Triton is missing or was imported without its interpreter")

        def no_fallback(*args: object) -> torch.Tensor:
            raise AssertionError("a kernel fell back to its torch reference")

        for name in references:
            monkeypatch.setattr(module, name, no_fallback)
        return where

    return choose


@pytest.fixture(scope="module")
def deepseek_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DeepSeek-V3 checkpoint built for the module."""
    return build_tiny_checkpoint("deepseek_v3", tmp_path_factory.mktemp("dsv3"))


@pytest.fixture(scope="module", params=["tiny", "deepseek_v3"])
def folder(request: pytest.FixtureRequest, deepseek_folder: Path) -> Path:
    """Each test twice: on the embedded model and on the tiny DeepSeek-V3."""
    return tiny_model_path() if request.param == "tiny" else deepseek_folder
