"""One dtype rule on the CPU for every tool (`moe_core.run_dtype`): the same prompt gives the same
greedy text from `moe-core generate` and `moe-gen run` on the embedded model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from moe_core import run_dtype
from moe_core.cli import app as core_app
from moe_gen.cli import app as gen_app
from typer.testing import CliRunner

# Greedy continuations of these differ between bf16 and fp32 on the embedded model within
# NEW tokens, so a tool that ran in another dtype would give another text.
PROMPTS = ["Once upon a time, there was a little fox who", "def fibonacci(n):"]
NEW = 40


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: torch's thread pool only spin-waits on a busy 2-core runner (4x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_moe_core_generate_and_moe_gen_run_give_the_same_greedy_text(tmp_path: Path) -> None:
    args = ["generate", "--max-new-tokens", str(NEW), "--json", "--device", "cpu"]
    core = CliRunner().invoke(core_app, [*args, *(a for p in PROMPTS for a in ("-p", p))])
    assert core.exit_code == 0, core.output
    core_text = [json.loads(line)["text"] for line in core.stdout.splitlines()]
    requests = tmp_path / "prompts.txt"
    requests.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    gen = CliRunner().invoke(gen_app, ["run", "--input", str(requests), "--output", str(out),
                                       "--max-new-tokens", str(NEW), "--device", "cpu"])
    assert gen.exit_code == 0, gen.output
    results = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    gen_text = [r["text"] for r in sorted(results, key=lambda r: str(r["id"]))]
    assert gen_text == core_text


@pytest.mark.parametrize("checkpoint", ["bfloat16", "float16", None])
def test_the_rule(checkpoint: str | None) -> None:
    assert run_dtype(None, "cpu", checkpoint) == torch.float32
    assert run_dtype(None, "cuda", checkpoint) == (torch.float32 if checkpoint is None
                                                   else getattr(torch, checkpoint))
    assert run_dtype("bf16", "cpu", checkpoint) == torch.bfloat16
    assert run_dtype(torch.float16, "cuda", checkpoint) == torch.float16
