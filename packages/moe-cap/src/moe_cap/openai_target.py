"""Any OpenAI-compatible server (moe-infinity serve, llama.cpp's llama-server, vLLM, SGLang) as
a target: streamed `/completions` for prompts and `/chat/completions` for chats over httpx, the
SSE parsed here (no `openai` package), token times on the client's clock."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from moe_cap.errors import TargetError
from moe_cap.prometheus import counter_deltas, parse_metrics
from moe_cap.sse import DONE, aiter_events
from moe_cap.target import Completion, GenerationSettings
from moe_cap.workload import WorkItem

__all__ = ["OpenAITarget", "check_reachable"]


def _describe(exc: httpx.HTTPError) -> str:
    return str(exc) or type(exc).__name__


async def check_reachable(client: httpx.AsyncClient, base_url: str) -> None:
    """Fail fast, before the run, when nothing answers at `base_url` (any HTTP answer to
    `GET /models` counts: some servers do not list models).

    Raises:
        TargetError: no connection (refused, no such host, timeout), or not HTTP.
    """
    try:
        await client.get(f"{base_url}/models", timeout=10.0)
    except httpx.HTTPError as exc:
        raise TargetError(f"cannot reach {base_url}: {_describe(exc)}") from None


class OpenAITarget:
    """A server at `base_url` (ending in `/v1`) serving `model`.

    Args:
        base_url: e.g. `http://127.0.0.1:8000/v1`.
        model: The model name to put in each request.
        api_key: Sent as a bearer token when given.
        timeout_s: Per-request read timeout.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout_s: float = 600.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise TargetError(f"--url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._client = httpx.AsyncClient(headers=headers, limits=limits,
                                         timeout=httpx.Timeout(timeout_s, connect=10.0))

    @property
    def label(self) -> str:
        """`<base_url> <model>`."""
        return f"{self.base_url} {self.model}"

    async def check(self) -> None:
        """See `check_reachable`."""
        await check_reachable(self._client, self.base_url)

    def _body(self, item: WorkItem, settings: GenerationSettings) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, "stream": True,
                                "stream_options": {"include_usage": True},
                                "max_tokens": item.max_tokens or settings.max_tokens,
                                "temperature": settings.temperature}
        if settings.seed is not None:
            body["seed"] = settings.seed
        if item.ignore_eos:  # vLLM, SGLang and llama.cpp honour it; others ignore the field
            body["ignore_eos"] = True
        if item.messages is not None:
            return "/chat/completions", {**body, "messages": list(item.messages)}
        return "/completions", {**body, "prompt": item.prompt}

    async def complete(self, item: WorkItem, settings: GenerationSettings) -> Completion:
        """Stream one request.

        Raises:
            TargetError: connection failure, an HTTP error status, or a malformed stream.
        """
        path, body = self._body(item, settings)
        out = Completion()
        parts: list[str] = []
        try:
            async with self._client.stream("POST", self.base_url + path, json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode("utf-8", "replace")[:200]
                    raise TargetError(f"HTTP {response.status_code} from {path}: {detail}")
                async for data in aiter_events(response.aiter_lines()):
                    if data.strip() == DONE:
                        break
                    self._take(data, out, parts)
        except httpx.HTTPError as exc:
            raise TargetError(f"{path}: {_describe(exc)}") from None
        out.text = "".join(parts)
        return out

    @staticmethod
    def _take(data: str, out: Completion, parts: list[str]) -> None:
        """One streamed chunk: its text (a token time when it has any), usage, finish reason."""
        now = time.perf_counter()
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise TargetError(f"the stream sent a chunk that is not JSON: {data[:80]!r}") from None
        if "error" in chunk:
            raise TargetError(f"the server reported an error: {chunk['error']}")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            out.prompt_tokens = usage.get("prompt_tokens", out.prompt_tokens)
            out.output_tokens = usage.get("completion_tokens", out.output_tokens)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if text:
                parts.append(text)
                out.token_times.append(now)
            if choice.get("finish_reason"):
                out.finish_reason = choice["finish_reason"]

    async def prompt_logprobs(self, text: str) -> list[float | None]:
        """Log-probabilities of every prompt token of `text` (the first is None), from
        `/completions` with `echo` and `max_tokens: 0` (vLLM, SGLang; servers without prompt
        log-probs are an error).

        Raises:
            TargetError: the server does not return prompt log-probs.
        """
        body = {"model": self.model, "prompt": text, "max_tokens": 0, "echo": True,
                "logprobs": 0, "temperature": 0.0}
        try:
            response = await self._client.post(self.base_url + "/completions", json=body)
        except httpx.HTTPError as exc:
            raise TargetError(f"/completions: {_describe(exc)}") from None
        try:
            logprobs = response.json()["choices"][0]["logprobs"]["token_logprobs"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise TargetError(f"{self.base_url} returns no prompt log-probs (HTTP "
                              f"{response.status_code}): perplexity and log-likelihood tasks "
                              f"need a server with echo + logprobs, or an in-process "
                              f"engine") from None
        return [None if v is None else float(v) for v in logprobs]

    async def metrics(self) -> dict[str, float] | None:
        """The server's Prometheus counters (None where it has no `/metrics`)."""
        root = self.base_url.removesuffix("/v1")
        try:
            response = await self._client.get(f"{root}/metrics", timeout=10.0)
        except httpx.HTTPError:
            return None
        return parse_metrics(response.text) if response.status_code == 200 else None

    @staticmethod
    def metric_deltas(before: dict[str, float] | None,
                      after: dict[str, float] | None) -> dict[str, float]:
        """The recorded counters' change over the run (empty without `/metrics`)."""
        return {} if before is None or after is None else counter_deltas(before, after)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._client.aclose()
