"""A tiny OpenAI-compatible server for tests, on the standard library only: streamed
`/v1/completions` and `/v1/chat/completions` with scripted token timings, `/v1/models` and a
Prometheus `/metrics`. It runs its own event loop on a thread, on 127.0.0.1 and a free port."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass


@dataclass
class Script:
    """Token timings: the first token `ttft_s` after the request, then one every `tpot_s`.

    Attributes:
        ttft_s: Delay before the first token.
        tpot_s: Delay between tokens.
        status: HTTP status to answer generation requests with (200: stream).
        tokens_per_chunk: Tokens sent per SSE chunk.
    """

    ttft_s: float = 0.05
    tpot_s: float = 0.01
    status: int = 200
    tokens_per_chunk: int = 1


class StubServer:
    """`with StubServer(Script(...)) as server: server.url` -> `http://127.0.0.1:PORT/v1`."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.requests: list[dict[str, object]] = []
        self.tokens_served = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> StubServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            pairs = (h.partition(":") for h in lines[1:] if h)
            headers = {k.lower(): v.strip() for k, _, v in pairs}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            if path == "/v1/models":
                await self._send(writer, 200, "application/json",
                                 json.dumps({"data": [{"id": "stub"}]}).encode())
            elif path == "/metrics":
                text = (f"# TYPE moe_expert_hits_total counter\n"
                        f'moe_expert_hits_total{{layer="0"}} {self.tokens_served * 3}\n'
                        f'moe_expert_hits_total{{layer="1"}} {self.tokens_served}\n'
                        f"moe_h2d_bytes_total {self.tokens_served * 1000}\n"
                        f"process_cpu_seconds_total 1.5\n")
                await self._send(writer, 200, "text/plain", text.encode())
            elif method == "POST" and path == "/v1/completions" and json.loads(body).get("echo"):
                await self._echo(writer, json.loads(body))
            elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
                await self._generate(writer, json.loads(body), path.endswith("chat/completions"))
            else:
                await self._send(writer, 404, "text/plain", b"not found")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _echo(self, writer: asyncio.StreamWriter, request: dict[str, object]) -> None:
        """Prompt log-probs (vLLM's `echo` + `max_tokens: 0`): one token per word, each but the
        first at log-probability -1 (so perplexity is e)."""
        if self.script.status != 200:
            await self._send(writer, self.script.status, "application/json",
                             b'{"error": "scripted failure"}')
            return
        words = str(request["prompt"]).split()
        logprobs = [None] + [-1.0] * (len(words) - 1)
        answer = {"choices": [{"text": request["prompt"],
                               "logprobs": {"tokens": words, "token_logprobs": logprobs}}]}
        await self._send(writer, 200, "application/json", json.dumps(answer).encode())

    async def _send(self, writer: asyncio.StreamWriter, status: int, kind: str,
                    body: bytes) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\nContent-Length: "
                     f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()

    async def _generate(self, writer: asyncio.StreamWriter, request: dict[str, object],
                        chat: bool) -> None:
        self.requests.append(request)
        script = self.script
        if script.status != 200:
            await self._send(writer, script.status, "application/json",
                             b'{"error": "scripted failure"}')
            return
        n = int(request.get("max_tokens", 16))  # type: ignore[arg-type]
        prompt = request.get("prompt") or " ".join(
            m["content"] for m in request.get("messages", []))  # type: ignore[index, union-attr]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n")
        await writer.drain()
        # Token i is due at ttft + i * tpot after the request: an absolute schedule, so the
        # event loop's wake-up lateness does not add up over the tokens.
        loop = asyncio.get_running_loop()
        start, sent = loop.time(), 0
        while sent < n:
            k = min(script.tokens_per_chunk, n - sent)
            due = start + script.ttft_s + (sent + k - 1) * script.tpot_s
            await asyncio.sleep(max(0.0, due - loop.time()))
            text = "".join(f" t{sent + i}" for i in range(k))
            sent += k
            choice = ({"index": 0, "delta": {"content": text}} if chat
                      else {"index": 0, "text": text})
            choice["finish_reason"] = "length" if sent == n else None
            writer.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            await writer.drain()
        self.tokens_served += n
        usage = {"prompt_tokens": len(str(prompt).split()), "completion_tokens": n}
        writer.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()
