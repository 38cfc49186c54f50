"""Perplexity of a text file: the file tokenised whole, cut into non-overlapping windows of
`T + 1` tokens (each predicts its last T tokens from what precedes them in the window, so every
scored token is scored once), exactly as moe-core evaluates its tiny model
(`moe_core.tiny_training.evaluation.heldout_perplexity`), so the two agree.

Through a server, each window of about T words is sent as text to `/completions` with `echo`
and the prompt's log-probabilities summed (the server's own tokenizer decides the tokens).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from moe_cap.accuracy_result import AccuracyResult
from moe_cap.errors import WorkloadError
from moe_cap.interruptible import run_interruptible
from moe_cap.model_scorer import ModelScorer
from moe_cap.openai_target import OpenAITarget

__all__ = ["perplexity_in_process", "perplexity_via_server", "read_text", "token_windows"]


def read_text(path: str | Path) -> str:
    """The text to score.

    Raises:
        WorkloadError: missing, not UTF-8, or empty.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkloadError(f"{path}: no such text file") from None
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"{path}: not UTF-8 text ({exc})") from None
    if not text.strip():
        raise WorkloadError(f"{path}: the file is empty")
    return text


def token_windows(tokens: list[int], seq_len: int) -> torch.Tensor:
    """Consecutive windows `[N, T + 1]`, window n = `tokens[n T : n T + T + 1]`.

    Raises:
        WorkloadError: fewer than `seq_len + 1` tokens.
    """
    if seq_len < 1:
        raise WorkloadError(f"--seq-len must be >= 1, got {seq_len}")
    count = (len(tokens) - 1) // seq_len
    if count < 1:
        raise WorkloadError(f"the text has {len(tokens)} tokens: too few for one window of "
                            f"{seq_len + 1} (lower --seq-len)")
    ids = torch.tensor(tokens[: count * seq_len + 1])
    index = torch.arange(count)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return ids[index]  # [N, T + 1]


def _result(nats: float, n_tokens: int, data: str, seq_len: int, where: str) -> AccuracyResult:
    loss = nats / n_tokens
    return AccuracyResult(task="perplexity", metric="perplexity", score=math.exp(loss),
                          num_examples=n_tokens, higher_is_better=False,
                          details={"loss_nats": loss, "seq_len": seq_len, "data": data,
                                   "tokenizer": where})


def perplexity_in_process(scorer: ModelScorer, text: str, seq_len: int, data: str
                          ) -> AccuracyResult:
    """Perplexity of `text` with the in-process model."""
    windows = token_windows(scorer.encode(text), seq_len)
    nats = scorer.windows_nll(windows)
    return _result(nats, windows.shape[0] * seq_len, data, seq_len, "the model's")


def perplexity_via_server(target: OpenAITarget, text: str, seq_len: int, data: str
                          ) -> AccuracyResult:
    """Perplexity of `text` through a server's prompt log-probs (windows of `seq_len` words).

    Raises:
        TargetError: the server returns no prompt log-probs.
    """
    words = text.split()
    chunks = [" ".join(words[i : i + seq_len]) for i in range(0, len(words), seq_len)]

    async def score() -> tuple[float, int]:
        nats, count = 0.0, 0
        try:
            for chunk in chunks:
                values = [v for v in await target.prompt_logprobs(chunk) if v is not None]
                nats -= sum(values)
                count += len(values)
        finally:
            await target.aclose()
        return nats, count

    nats, count = run_interruptible(score())
    if count == 0:
        raise WorkloadError(f"{data}: the server scored no tokens")
    return _result(nats, count, data, seq_len, "the server's")
