"""The four command lines as a user meets them (issue 14): nothing the user owns is lost, two
runs never write one file, a mistake is one line (never a traceback, never an internal class
name), inputs are checked before the expensive work, and nothing past the model's context is
generated silently. Each command runs as its own process (the fork server of conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from moe_cap import MoECapError, RunRecord
from moe_core import MoECoreError, MoEError, open_locked
from moe_gen import MoEGenError
from moe_infinity.errors import MoEInfinityError

if TYPE_CHECKING:
    from conftest import CliServer, Finished

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
NO_SUCH_GPU = "cuda" if GPUS == 0 else f"cuda:{GPUS}"
INTERNAL_NAME = re.compile(r"\b[A-Z][A-Za-z]+(Config|Params|Plan|Spec|Record|Rates|Layout)\b[.:]")
LONG = "word " * 1100  # ~1100 tokens: past the embedded model's 1024-token context
TOOLS = ("moe-core", "moe-gen", "moe-infinity", "moe-cap")


def one_error_line(result: Finished, *words: str, status: int = 1) -> str:
    """The single `error:` line of a failed command (exit `status`: 1, or 2 for an option the
    command line cannot parse), which must contain `words`."""
    assert result.status == status, (result.status, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.error_lines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not INTERNAL_NAME.search(lines[0]), lines[0]
    for word in words:
        assert word in lines[0]
    return lines[0]


def write_jsonl(path: Path, *items: dict[str, object]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A working folder with a subfolder `adir` and three short requests."""
    (tmp_path / "adir").mkdir()
    write_jsonl(tmp_path / "requests.jsonl",
                *({"id": f"r{i}", "prompt": p, "max_new_tokens": 3}
                  for i, p in enumerate(("Once upon a time", "The cat", "def f(x):"))))
    write_jsonl(tmp_path / "prompts.jsonl", {"prompt": "Once upon a time"}, {"prompt": "The"})
    write_jsonl(tmp_path / "long.jsonl", {"id": "long", "prompt": LONG})
    return tmp_path


@pytest.fixture(scope="module")
def traces(cli: CliServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("traces")
    write_jsonl(folder / "prompts.jsonl", *({"prompt": p} for p in ("Once", "The", "A", "It")))
    result = cli.run("moe-infinity", "trace", "--input", "prompts.jsonl", "--output",
                     "traces.bin", "--max-new-tokens", "2", cwd=folder)
    assert result.status == 0, result.stderr
    return folder / "traces.bin"


# --- 1. Never modify a file the tool did not write ------------------------------------------


@pytest.mark.parametrize("content", [
    b"my notes\nlast line",  # no final newline: once cut off as a "torn last line"
    b'{"id": 5, "note": "mine"}',
    b"my notes\n",
    b'{"id": "a", "text": "x", "prompt_tokens": 1, "completion_tokens": 1, '
    b'"finish_reason": "eos"}\nmy notes\n',
])
def test_an_output_moe_gen_did_not_write_is_left_as_it_is(cli: CliServer, folder: Path,
                                                          content: bytes) -> None:
    (folder / "notes.txt").write_bytes(content)
    result = cli.run("moe-gen", "run", "--input", "requests.jsonl", "--output", "notes.txt",
                     cwd=folder)
    one_error_line(result, "notes.txt", "not a moe-gen output")
    assert (folder / "notes.txt").read_bytes() == content


# --- 2. One writer per output file ----------------------------------------------------------


def test_a_second_run_on_the_same_output_names_the_first(cli: CliServer, folder: Path) -> None:
    write_jsonl(folder / "slow.jsonl", *({"id": f"s{i}", "prompt": "Once upon a time",
                                          "max_new_tokens": 40} for i in range(6)))
    args = ("run", "--input", "slow.jsonl", "--output", "out.jsonl", "--ignore-eos")
    first = cli.start("moe-gen", *args, cwd=folder)
    assert cli.wait_until(lambda: (folder / "out.jsonl").exists() or not first.is_running())
    second = cli.run("moe-gen", *args, cwd=folder)
    one_error_line(second, "--output out.jsonl", f"pid {first.pid}")
    assert cli.wait(first).status == 0
    ids = [json.loads(line)["id"] for line in (folder / "out.jsonl").read_text().splitlines()]
    assert sorted(ids) == [f"s{i}" for i in range(6)]  # each once: the second wrote nothing


@pytest.mark.parametrize(("tool", "args", "output"), [
    ("moe-core", ("pack", "tiny-moe", "experts.moepack"), "experts.moepack"),
    ("moe-infinity", ("trace", "--input", "prompts.jsonl", "--output", "traces.bin"),
     "traces.bin"),
])
def test_a_file_being_written_is_refused_naming_its_writer(cli: CliServer, folder: Path,
                                                           tool: str, args: tuple[str, ...],
                                                           output: str) -> None:
    fd = open_locked(folder / f"{output}.partial", "test")  # as a run writing it holds it
    try:
        one_error_line(cli.run(tool, *args, cwd=folder), output, f"pid {os.getpid()}")
    finally:
        os.close(fd)
    assert not (folder / output).exists()


# --- 3. One line instead of a traceback; outputs checked before the work --------------------


@pytest.mark.parametrize(("tool", "args", "words"), [
    ("moe-core", ("generate", "-p", "x", "--device", NO_SUCH_GPU), ("device",)),
    ("moe-core", ("generate", "-p", "x", "--device", NO_SUCH_GPU, "--expert-memory", "1MiB"),
     ("device",)),
    ("moe-infinity", ("trace", "--input", "prompts.jsonl", "--device", NO_SUCH_GPU),
     ("device",)),
    ("moe-gen", ("run", "--input", "requests.jsonl", "--output", "adir"),
     ("--output adir", "folder")),
    ("moe-gen", ("run", "--input", "requests.jsonl", "--json", "missing/r.json"),
     ("--json missing/r.json", "does not exist")),
    ("moe-infinity", ("trace", "--input", "prompts.jsonl", "--output", "adir"),
     ("--output adir", "folder")),
    ("moe-core", ("pack", "tiny-moe", "adir"), ("adir", "folder")),
    ("moe-core", ("make-tiny", "mixtral", "requests.jsonl"), ("requests.jsonl", "not a folder")),
    ("moe-core", ("make-tiny", "mixtral", "."), ("not empty",)),
    ("moe-core", ("inspect", "--gpu-memory", "-1GiB"), ("not a size",)),
])
def test_mistakes_are_one_line_and_change_nothing(cli: CliServer, folder: Path, tool: str,
                                                  args: tuple[str, ...],
                                                  words: tuple[str, ...]) -> None:
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    one_error_line(cli.run(tool, *args, cwd=folder), *words)
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing left behind (no results, no .partial)


def test_a_plot_that_cannot_be_written_stops_the_simulation_before_it_starts(
        cli: CliServer, traces: Path, folder: Path) -> None:
    result = cli.run("moe-infinity", "simulate", str(traces), "--plot", "missing/x.png",
                     cwd=folder)
    one_error_line(result, "--plot missing/x.png")
    assert result.stdout == ""  # nothing simulated, no table half-printed


@pytest.mark.parametrize(("tool", "args", "word"), [
    ("moe-core", ("inspect", "--context", "-1"), "--context"),
    ("moe-core", ("verify", "--batch", "-1"), "--batch"),
    ("moe-core", ("pack", "tiny-moe", "x.moepack", "--num-layers", "-1"), "--num-layers"),
    ("moe-gen", ("run", "--max-new-tokens", "-1"), "--max-new-tokens"),
    ("moe-gen", ("plan", "--prompt-tokens", "-5"), "--prompt-tokens"),
    ("moe-gen", ("run", "--num-layers", "0"), "--num-layers"),
    ("moe-infinity", ("trace", "--input", "prompts.jsonl", "--max-new-tokens", "-1"),
     "max_new_tokens"),
    ("moe-infinity", ("simulate", "{traces}", "--capacity", "-1"), "capacity"),
    ("moe-infinity", ("simulate", "{traces}", "--prefetch-budget", "-2"), "prefetch budget"),
    ("moe-cap", ("metrics", "--context", "-1", "--gpu", "H200"), "context"),
    ("moe-cap", ("metrics", "--batch", "-4", "--gpu", "H200"), "batch"),
    ("moe-cap", ("cost", "missing.json", "--years", "-1"), "years"),
])
def test_negative_sizes_are_refused(cli: CliServer, folder: Path, traces: Path, tool: str,
                                    args: tuple[str, ...], word: str) -> None:
    result = cli.run(tool, *(a.format(traces=traces) for a in args), cwd=folder)
    one_error_line(result, word, status=2 if result.status == 2 else 1)  # 2: while parsing
    assert result.stdout == ""


# --- 4. Nothing past the model's context, silently ------------------------------------------


def test_over_long_prompts_are_refused_or_truncated_as_asked(cli: CliServer,
                                                             folder: Path) -> None:
    generate = ("generate", "-p", LONG, "--max-new-tokens", "2", "--json")
    one_error_line(cli.run("moe-core", *generate, cwd=folder), "--prompt 1", "context of 1024")
    kept = cli.run("moe-core", *generate, "--truncate", "left", cwd=folder)
    assert kept.status == 0 and json.loads(kept.stdout)["new_tokens"] == 2

    run = ("run", "--input", "long.jsonl", "--output", "out.jsonl", "--max-new-tokens", "2")
    one_error_line(cli.run("moe-gen", *run, cwd=folder), "line 1", "context of 1024")
    assert cli.run("moe-gen", *run, "--truncate", "right", cwd=folder).status == 0
    (done,) = (json.loads(line) for line in (folder / "out.jsonl").read_text().splitlines())
    assert done["prompt_tokens"] == 1024 - 2

    write_jsonl(folder / "long-prompts.jsonl", {"prompt": LONG})
    trace = ("trace", "--input", "long-prompts.jsonl", "--max-new-tokens", "2")
    one_error_line(cli.run("moe-infinity", *trace, cwd=folder), "line 1", "context of 1024")
    assert not (folder / "traces.bin").exists()
    assert cli.run("moe-infinity", *trace, "--truncate", "left", cwd=folder).status == 0


# --- 5. Requests checked before the run; a finished job still gives its record ---------------


def test_every_bad_request_is_listed_before_the_job_starts(cli: CliServer, folder: Path) -> None:
    write_jsonl(folder / "bad.jsonl", {"id": "ok", "prompt": "Once"},
                {"id": "cold", "prompt": "x", "temperature": -1},
                {"id": "empty", "prompt": ""}, {"id": "nucleus", "prompt": "x", "top_p": 2})
    result = cli.run("moe-gen", "run", "--input", "bad.jsonl", "--output", "out.jsonl",
                     cwd=folder)
    one_error_line(result, "3 bad line(s)", "line 2", "temperature", "line 3", "empty",
                   "line 4", "top_p")
    assert not (folder / "out.jsonl").exists()


def test_a_rerun_of_a_finished_job_writes_its_run_record(cli: CliServer, folder: Path) -> None:
    args = ("run", "--input", "requests.jsonl", "--output", "out.jsonl")
    assert cli.run("moe-gen", *args, cwd=folder).status == 0
    assert cli.run("moe-gen", *args, "--json", "record.json", cwd=folder).status == 0
    record = RunRecord.from_json(folder / "record.json")
    results = [json.loads(line) for line in (folder / "out.jsonl").read_text().splitlines()]
    assert record.output_tokens == sum(r["completion_tokens"] for r in results) > 0


# --- 8. Errors as one design ----------------------------------------------------------------


def test_every_tool_error_derives_from_the_one_root() -> None:
    for root in (MoECoreError, MoEGenError, MoEInfinityError, MoECapError):
        assert issubclass(root, MoEError)


def test_ctrl_c_says_how_to_resume_and_the_rerun_finishes(cli: CliServer, folder: Path) -> None:
    write_jsonl(folder / "slow.jsonl", *({"id": f"s{i}", "prompt": "The cat",
                                          "max_new_tokens": 4 + 12 * i} for i in range(4)))
    args = ("run", "--input", "slow.jsonl", "--output", "out.jsonl", "--ignore-eos")
    running = cli.start("moe-gen", *args, cwd=folder)
    assert cli.wait_until(lambda: (folder / "out.jsonl").exists()
                          and (folder / "out.jsonl").read_text().count("\n") >= 1)
    os.kill(running.pid, signal.SIGINT)
    interrupted = cli.wait(running)
    assert interrupted.status == 130
    assert interrupted.error_lines()[-1] == "interrupted: rerun the same command to resume"
    assert cli.run("moe-gen", *args, cwd=folder).status == 0
    ids = [json.loads(line)["id"] for line in (folder / "out.jsonl").read_text().splitlines()]
    assert sorted(ids) == [f"s{i}" for i in range(4)]


def test_ctrl_c_while_tracing_leaves_no_partial_file(cli: CliServer, folder: Path) -> None:
    write_jsonl(folder / "many.jsonl", *({"prompt": "Once upon a time"} for _ in range(40)))
    running = cli.start("moe-infinity", "trace", "--input", "many.jsonl", "--max-new-tokens",
                        "8", cwd=folder)
    assert cli.wait_until(lambda: (folder / "traces.bin.partial").exists())
    time.sleep(0.5)  # into the model's loading or the tracing itself
    os.kill(running.pid, signal.SIGINT)
    interrupted = cli.wait(running)
    assert interrupted.status == 130 and interrupted.error_lines()[-1] == "interrupted"
    assert not (folder / "traces.bin").exists() and not (folder / "traces.bin.partial").exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_has_a_version_and_examples(cli: CliServer, tmp_path: Path,
                                               tool: str) -> None:
    version = cli.run(tool, "--version", cwd=tmp_path)
    assert version.status == 0 and version.stdout.startswith(f"{tool} 0.")
    usage = cli.run(tool, "--help", cwd=tmp_path)
    assert usage.status == 0 and "Examples:" in usage.stdout and f"{tool} " in usage.stdout
