"""Runs the tools' command lines as real processes, fast: a fork server for the CLI tests.

Started once per test session (`python tests/cli_server.py`); it imports the four CLIs, torch
and transformers' tokenizer code once, then forks one child process per command. A child runs
the tool's command line exactly as its console script does (arguments, exit status, stdout and
stderr to files, signals delivered by the OS), without paying the seconds of imports a fresh
interpreter costs on every start: the kill/resume test starts dozens of runs.

The server sets torch to one thread before it touches a tensor (it loads the embedded model once
to warm the lazy imports up), so no thread pool exists to be inherited, broken, by a child; the
tiny model runs no faster with more. Protocol, one JSON object per line:

    {"op": "start", "tool": "moe-gen", "args": [...], "cwd": DIR, "stdout": F, "stderr": F}
        -> {"pid": N}
    {"op": "wait", "pid": N}  -> {"status": S}   (exit code; -N when killed by signal N)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable

_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _commands() -> dict[str, Callable[..., object]]:
    """Each tool's command line, built once (a Typer app rebuilds it on every call)."""
    import moe_cap.cli
    import moe_core.cli
    import moe_gen.cli
    import moe_infinity.cli
    import typer.main

    apps = {"moe-core": moe_core.cli.app, "moe-gen": moe_gen.cli.app,
            "moe-infinity": moe_infinity.cli.app, "moe-cap": moe_cap.cli.app}
    return {name: typer.main.get_command(app) for name, app in apps.items()}


def _warm_up() -> None:
    """Import what the commands import lazily, by loading the embedded model and tokenizer."""
    import torch

    torch.set_num_threads(1)  # first, before any tensor: see the module docstring
    import moe_gen.job  # noqa: F401 (import only)
    import moe_infinity.trace_run  # noqa: F401
    from moe_core import load_model, load_tokenizer, tiny_model_path

    load_model(tiny_model_path(), "cpu")
    load_tokenizer(tiny_model_path())


def _child(command: Callable[..., object], request: dict[str, object]) -> int:
    """Run one command in this (forked) process; return its exit status."""
    os.chdir(str(request["cwd"]))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, key in ((1, "stdout"), (2, "stderr")):
        target = os.open(str(request[key]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # one sent meanwhile lands now
        command(args=list(request["args"]), prog_name=str(request["tool"]))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        # Before the command's own handler: end as Python does, killed by the signal itself.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def main() -> None:
    """Serve requests from stdin until it closes."""
    commands = _commands()
    _warm_up()
    reply = sys.stdout
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            sys.stdout.flush()
            sys.stderr.flush()
            # Signals wait until the child is set up (none may land in fork's own hooks).
            signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    status = _child(commands[str(request["tool"])], request)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(status)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            print(json.dumps({"pid": pid}), file=reply, flush=True)
        elif request["op"] == "wait":
            _, raw = os.waitpid(int(request["pid"]), 0)
            print(json.dumps({"status": os.waitstatus_to_exitcode(raw)}), file=reply,
                  flush=True)


if __name__ == "__main__":
    main()
