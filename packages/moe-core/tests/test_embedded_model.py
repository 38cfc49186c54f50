"""The embedded tiny model: transformers loads it, ours matches it, and it generates on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from moe_core import ModelSpec, load_model, load_tokenizer, render_chat, tiny_model_path
from moe_core.cli import app
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load_model(tiny_model_path(), dtype="float32")


def test_shape_meets_the_recipe() -> None:
    spec = ModelSpec.from_pretrained(tiny_model_path())
    assert spec.architecture == "Qwen3MoeForCausalLM"
    assert spec.num_layers >= 6 and spec.moe.num_experts >= 16 and spec.moe.router.top_k >= 2
    size = sum(p.stat().st_size for p in tiny_model_path().iterdir())
    assert size <= 32 * 2**20


def test_transformers_loads_it_and_our_logits_match(model) -> None:  # type: ignore[no-untyped-def]
    tokenizer = load_tokenizer(tiny_model_path())
    ids = torch.tensor([tokenizer("Once upon a time, there was a little fox.")["input_ids"]])
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32).eval()
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4


def test_it_has_learnt_text(model) -> None:  # type: ignore[no-untyped-def]
    """Trained, not random: next-token loss on plain English is far below uniform (ln 4096)."""
    tokenizer = load_tokenizer(tiny_model_path())
    ids = torch.tensor([tokenizer("One day, a little girl named Lily went to the park with her "
                                  "mom. She saw a big red ball and wanted to play with it.")
                        ["input_ids"]])
    with torch.no_grad():
        logits = model(ids)[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    assert loss < 4.0 < torch.log(torch.tensor(4096.0)).item()


def test_generates_and_stops_at_the_end_of_a_chat_turn(model) -> None:  # type: ignore[no-untyped-def]
    tokenizer = load_tokenizer(tiny_model_path())
    prompt = render_chat(tokenizer, [{"role": "user", "content": "Tom has 3 apples."}])
    result = model.generate_full([prompt], max_new_tokens=48)
    assert result.tokens.shape[0] == 1 and 0 < result.lengths[0] <= 48
    assert tokenizer.decode(result.tokens[0, : result.lengths[0]], skip_special_tokens=True)


def test_cli_uses_it_by_default() -> None:
    result = CliRunner().invoke(app, ["generate", "-p", "Once upon a time", "--max-new-tokens",
                                      "8", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["new_tokens"] == 8 and row["text"]
    inspect = CliRunner().invoke(app, ["inspect", "--json"])
    assert json.loads(inspect.stdout)["architecture"] == "Qwen3MoeForCausalLM"
