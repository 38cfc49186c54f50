"""The tools' command lines as processes, for the cross-package reliability tests.

`cli` is a session-wide fork server (tests/cli_server.py): each command runs in its own forked
process, with its own exit status, stdout, stderr and signals, but without a fresh
interpreter's seconds of imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER = Path(__file__).with_name("cli_server.py")


@dataclass(frozen=True)
class Finished:
    """A command that has ended.

    Attributes:
        status: Its exit status (-N: killed by signal N).
        stdout: What it printed to stdout.
        stderr: What it printed to stderr.
    """

    status: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        """stderr's non-blank lines."""
        return [line for line in self.stderr.splitlines() if line.strip()]


@dataclass(frozen=True)
class Running:
    """A command started and not yet waited for."""

    pid: int
    stdout: Path
    stderr: Path

    def is_running(self) -> bool:
        """Still running (not ended, even if not yet reaped)."""
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"


class CliServer:
    """Starts commands of the four tools as forked processes (see tests/cli_server.py)."""

    def __init__(self, logs: Path) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "COLUMNS": "200"}
        self._process = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env=env, text=True)
        self._logs = logs
        self._count = 0
        assert self._reply() == {"ready": True}

    def _reply(self) -> dict[str, object]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the CLI fork server died")
        return json.loads(line)

    def _ask(self, request: dict[str, object]) -> dict[str, object]:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        return self._reply()

    def start(self, tool: str, *args: str | Path, cwd: Path) -> Running:
        """Start `tool args...` in `cwd`."""
        self._count += 1
        out, err = (self._logs / f"{self._count}.{name}" for name in ("out", "err"))
        out.touch()  # there even when the child is killed before it opens them
        err.touch()
        reply = self._ask({"op": "start", "tool": tool, "args": [str(a) for a in args],
                           "cwd": str(cwd), "stdout": str(out), "stderr": str(err)})
        return Running(int(reply["pid"]), out, err)  # type: ignore[arg-type]

    def wait(self, running: Running) -> Finished:
        """Wait for a started command to end."""
        status = int(self._ask({"op": "wait", "pid": running.pid})["status"])  # type: ignore[arg-type]
        return Finished(status, running.stdout.read_text(), running.stderr.read_text())

    def run(self, tool: str, *args: str | Path, cwd: Path) -> Finished:
        """Run `tool args...` in `cwd` to its end."""
        return self.wait(self.start(tool, *args, cwd=cwd))

    def close(self) -> None:
        """Stop the server."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(timeout=30)

    @staticmethod
    def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> bool:
        """Poll `condition()` every 5 ms until it holds (True) or `timeout_s` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.005)
        return False


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    """The fork server, shared by the session's tests."""
    server = CliServer(tmp_path_factory.mktemp("cli-logs"))
    yield server
    server.close()
