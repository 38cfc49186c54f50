"""`moe-infinity chat`: a terminal conversation through the serving engine, in this process.

Each answer streams as the engine produces it; after it come its token count, decode speed
(tokens per second after the first), time to the first token and the expert cache's hit rate
over the answer (the offload runtime's hits and misses while it ran). `/exit`, Ctrl-D and Ctrl-C
end the chat; Ctrl-C during an answer cancels it first. Turns that no longer fit the context are
dropped from the start of the conversation.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from moe_core import MoEError, SamplingParams, SettingError, render_chat
from rich.console import Console
from rich.text import Text

from moe_infinity.serving.engine import Engine
from moe_infinity.serving.request import GenerationRequest, SequenceEvent

__all__ = ["ChatSession", "run_chat"]

_EXIT_WORDS = ("/exit", "/quit")
_SNAPSHOT_WAIT_S = 1.0


@dataclass(frozen=True, kw_only=True)
class ChatSession:
    """How answers are generated.

    Attributes:
        max_tokens: Most tokens per answer.
        temperature: 0 is greedy.
        top_p: Nucleus sampling threshold.
        seed: Sampling seed (each answer is seeded with it plus the turn number).
        system: A system message opening the conversation.
    """

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float | None = None
    seed: int | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise SettingError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        SamplingParams(temperature=self.temperature, top_p=self.top_p)  # range checks


@dataclass(frozen=True)
class _Answer:
    text: str
    num_tokens: int
    first_token_s: float
    decode_tokens_per_s: float
    hit_rate: float | None
    cancelled: bool


def run_chat(engine: Engine, session: ChatSession, console: Console | None = None,
             read: Callable[[str], str] | None = None) -> int:
    """Talk until the user leaves; returns the number of answers given.

    Args:
        engine: A started engine.
        session: Generation settings.
        console: Where to write (default: stdout).
        read: Reads a line after showing a prompt (default: the console's input); raises
            `EOFError` on Ctrl-D and `KeyboardInterrupt` on Ctrl-C.

    Raises:
        SettingError: `max_tokens` leaves no room for a prompt.
    """
    if session.max_tokens >= engine.max_request_tokens:
        raise SettingError(f"--max-tokens {session.max_tokens} leaves no room for a message in "
                           f"the {engine.max_request_tokens} tokens a request may hold")
    console = console or Console(highlight=False)
    read = read or (lambda prompt: console.input(prompt))
    history: list[dict[str, str]] = []
    if session.system:
        history.append({"role": "system", "content": session.system})
    console.print(f"chatting with {engine.served.name} (/exit, Ctrl-D or Ctrl-C to leave)",
                  style="dim")
    answers = 0
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return answers
        if line.strip() in _EXIT_WORDS:
            return answers
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = _fitting_prompt(engine, history, session.max_tokens)
        if ids is None:
            history.pop()
            console.print("that message is too long for the model's context", style="red")
            continue
        answer = _answer(engine, session, ids, answers, console)
        answers += 1
        history.append({"role": "assistant", "content": answer.text})
        console.print(_summary(answer), style="dim")
        if answer.cancelled:
            return answers


def _fitting_prompt(engine: Engine, history: list[dict[str, str]], max_tokens: int
                    ) -> list[int] | None:
    """The conversation's tokens, dropping the oldest turns (not the system message) until
    the prompt and an answer fit; None when even the last message alone does not."""
    tokenizer = engine.served.tokenizer
    limit = engine.max_request_tokens - max_tokens
    first = 1 if history and history[0]["role"] == "system" else 0
    while True:
        try:
            ids = render_chat(tokenizer, history)
        except MoEError:
            return None
        if len(ids) <= limit:
            return ids
        if len(history) - first <= 1:
            return None
        del history[first]


def _answer(engine: Engine, session: ChatSession, ids: list[int], turn: int,
            console: Console) -> _Answer:
    seed = None if session.seed is None else session.seed + turn
    request = GenerationRequest(
        request_id=f"chat-{uuid.uuid4().hex}", prompt_ids=tuple(ids),
        max_tokens=session.max_tokens,
        sampling=SamplingParams(temperature=session.temperature, top_p=session.top_p, seed=seed))
    events: queue.Queue[SequenceEvent] = queue.Queue()
    before = engine.snapshot().offload
    started = time.perf_counter()
    first: float | None = None
    texts: list[str] = []
    cancelled = False
    engine.submit(request, events.put)
    console.print("model> ", style="bold", end="")
    while True:
        try:
            event = events.get(timeout=0.1)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            engine.cancel(request.request_id)
            cancelled = True
            continue
        if event.token_ids and first is None:
            first = time.perf_counter()
        texts.append(event.text)
        console.print(Text(event.text), end="")
        if event.finish_reason is not None:
            break
    ended = time.perf_counter()
    console.print()
    steps = engine.snapshot().steps
    deadline = time.monotonic() + _SNAPSHOT_WAIT_S  # the step that finished it is published
    while engine.snapshot().steps == steps and time.monotonic() < deadline:
        time.sleep(0.01)
    after = engine.snapshot().offload
    hit_rate = None
    if before is not None and after is not None:
        hits, misses = after.hits - before.hits, after.misses - before.misses
        hit_rate = hits / (hits + misses) if hits + misses else None
    first_s = (first or ended) - started
    decode_s = ended - (first or ended)
    n = event.num_output_tokens
    speed = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
    return _Answer("".join(texts), n, first_s, speed, hit_rate,
                   cancelled or event.finish_reason == "cancelled")


def _summary(answer: _Answer) -> str:
    hit = "n/a" if answer.hit_rate is None else f"{answer.hit_rate:.1%}"
    note = " (cancelled)" if answer.cancelled else ""
    return (f"[{answer.num_tokens} tokens, {answer.decode_tokens_per_s:.1f} tok/s, first token "
            f"{answer.first_token_s:.2f} s, expert hit rate {hit}]{note}")
