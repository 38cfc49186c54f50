"""Running the app under uvicorn, with the shutdown the issue asks for.

On SIGTERM or SIGINT: the engine stops accepting requests at once (new ones get 503), uvicorn
closes the listening socket and waits for open responses (streams included) to finish while the
engine keeps generating. When the grace period ends, the engine cancels what still runs, so
every open response ends properly (its last chunk, `[DONE]`) rather than being cut; uvicorn's
own cancellation of tasks is only a backstop a few seconds later. The trace collection is then
saved. The process exits 0: a signal asked for this shutdown, so it is not an interruption
(uvicorn would re-raise the signal after its own shutdown; this server does not). A second
SIGINT cancels at once.

The socket is bound before the model loads (`bind_socket`), so a port in use is one `error:`
line before any expensive work, and port 0 picks a free port that the ready line names.
"""

from __future__ import annotations

import contextlib
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI
from moe_core import SettingError

__all__ = ["bind_socket", "run_server"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_BACKSTOP_S = 5  # after the grace period, uvicorn cancels responses still open


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port`.

    Raises:
        SettingError: the address cannot be listened on (in use, not local, no permission).
    """
    if not 0 <= port <= 65535:
        raise SettingError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise SettingError(f"--host {host}: cannot resolve it ({exc.strerror or exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise SettingError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


class _GracefulServer(uvicorn.Server):
    """uvicorn's server, telling the engine first when a signal arrives, and not re-raising
    the signal once it has shut down."""

    def __init__(self, config: uvicorn.Config, grace_s: float, on_signal: Callable[[], None],
                 on_grace_expired: Callable[[], None]) -> None:
        super().__init__(config)
        self._grace_s = grace_s
        self._on_signal = on_signal
        self._on_grace_expired = on_grace_expired
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_signal()
        if self._timer is None:
            self._timer = threading.Timer(self._grace_s, self._on_grace_expired)
            self._timer.daemon = True
            self._timer.start()
        elif sig == signal.SIGINT:  # asked twice: no more grace
            self._on_grace_expired()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_server(app: FastAPI, sock: socket.socket, grace_s: float,
               on_signal: Callable[[], None], on_grace_expired: Callable[[], None],
               log_level: str = "warning") -> None:
    """Serve `app` on the bound `sock` until SIGTERM or SIGINT; returns after the graceful
    shutdown: `on_signal` is called at the signal, `on_grace_expired` `grace_s` seconds later
    (it must end every open response)."""
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=math.ceil(grace_s) + _BACKSTOP_S)
    _GracefulServer(config, grace_s, on_signal, on_grace_expired).run(sockets=[sock])
