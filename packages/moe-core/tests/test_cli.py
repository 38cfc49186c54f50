"""The moe-core command line: inspect, verify, make-tiny and generate, and their error lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moe_core.cli import app
from moe_core.spec import ModelSpec
from moe_core.tiny_checkpoints import build_tiny_checkpoint
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"))


def test_inspect_json_has_the_memory_figures(tiny: Path) -> None:
    spec = ModelSpec.from_pretrained(tiny)
    # Room for the dense part and exactly three experts once 10% headroom is set aside.
    budget = int((spec.dense_bytes() + 3.5 * spec.expert_bytes()) / 0.9)
    result = CliRunner().invoke(app, ["inspect", str(tiny), "--json", "--gpu-memory", str(budget)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["architecture"] == "Qwen3MoeForCausalLM"
    assert report["moe_layers"] == [1, 2] and report["dense_layers"] == [0]  # mlp_only_layers=[0]
    # One Qwen3 tiny expert: 3 projections of 32 x 16, two bytes each in bf16.
    assert report["expert_bytes"] == 3 * 32 * 16 * 2
    assert report["gpu_fit"] == "offload"
    assert report["gpu_resident_experts"] == 3
    assert report["host_expert_bytes"] == (2 * 6 - 3) * report["expert_bytes"]


def test_inspect_table_mentions_the_fit(tiny: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(tiny), "--gpu-memory", "1GiB"])
    assert result.exit_code == 0
    assert "fits on the GPU whole" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "/no/such/folder"], "no such model folder"),
        (["inspect", "{tiny}", "--dtype", "int3"], "unknown dtype 'int3'"),
        (["inspect", "{tiny}", "--gpu-memory", "lots"], "not a size"),
        (["make-tiny", "gpt2", "{tmp}/x"], "unknown tiny kind"),
    ],
)
def test_bad_input_is_one_error_line(tiny: Path, tmp_path: Path, args: list[str],
                                     message: str) -> None:
    args = [a.format(tiny=tiny, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_make_tiny_then_verify_passes(tmp_path: Path) -> None:
    runner = CliRunner()
    made = runner.invoke(app, ["make-tiny", "olmoe", str(tmp_path / "olmoe")])
    assert made.exit_code == 0, made.output
    result = runner.invoke(app, ["verify", str(tmp_path / "olmoe"), "--json", "--new-tokens", "8"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["passed"] and report["relative_error"] < 1e-4 and report["tokens_match"]


def test_verify_exits_non_zero_when_the_check_fails(tmp_path: Path) -> None:
    """A zero tolerance cannot be met by float32 arithmetic, so the command must report FAIL."""
    folder = build_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    result = CliRunner().invoke(app, ["verify", str(folder), "--tolerance", "0",
                                      "--new-tokens", "4"])
    assert result.exit_code == 1
    assert "FAIL" in result.stdout


def test_pack_then_generate_offloaded_equals_generate_whole(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "tiny.moepack"
    packed = CliRunner().invoke(app, ["pack", "tiny-moe", str(store)])
    assert packed.exit_code == 0, packed.output
    assert store.is_file()
    args = ["generate", "-p", "Once upon a time", "--max-new-tokens", "8", "--json"]
    whole = CliRunner().invoke(app, args)
    offloaded = CliRunner().invoke(app, [*args, "--expert-memory", "1MiB", "--store", str(store),
                                    "--stats"])
    assert whole.exit_code == 0 and offloaded.exit_code == 0, offloaded.output
    assert json.loads(whole.stdout.splitlines()[0])["text"] == \
        json.loads(offloaded.stdout.splitlines()[0])["text"]
    assert "hit_rate" in offloaded.stderr and "bytes_copied" in offloaded.stderr
    mapped = CliRunner().invoke(app, [*args, "--expert-memory", "1MiB", "--fetch", "mapped",
                                      "--stats"])
    assert mapped.exit_code == 0, mapped.output
    assert json.loads(mapped.stdout.splitlines()[0])["text"] == \
        json.loads(whole.stdout.splitlines()[0])["text"]
    assert "mapped_bytes" in mapped.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "-p", "x", "--stats"], "need --expert-memory"),
    (["generate", "-p", "x", "--expert-memory", "10KiB"], "cannot hold one expert"),
    (["generate", "-p", "x", "--expert-memory", "1MiB", "--policy", "mru"],
     "--policy must be lru, lfu"),
    (["generate", "-p", "x", "--expert-memory", "1MiB", "--prefetch", "oracle"],
     "--prefetch must be none or lookahead"),
    (["generate", "-p", "x", "--prefetch", "lookahead"], "need --expert-memory"),
    (["generate", "-p", "x", "--expert-memory", "1MiB", "--prefetch", "lookahead:top=99"],
     "lookahead:top must be in [1, 16]"),
    (["pack", "qwen3-30b-a3b", "x.moepack"], "--dummy"),
    (["generate", "-p", "x", "--fetch", "mapped"], "need --expert-memory"),
    (["generate", "-p", "x", "--expert-memory", "1MiB", "--fetch", "zero"], "copy or mapped"),
    (["generate", "-p", "x", "--prefill", "stream"], "need --expert-memory"),
    (["generate", "-p", "x", "--expert-memory", "1MiB", "--prefill", "evict"],
     "--prefill must be admit or stream"),
])
def test_offload_options_fail_with_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.output
