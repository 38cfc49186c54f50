"""Log-likelihoods from moe-core's model in process: what perplexity, multiple choice and the
lm-eval adapter need. One forward pass per window (or per context + continuation), each
recorded as a prefill step so a scoring run has a complete run record.

Dimension key: B windows, T tokens per window, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from moe_core import MoEForCausalLM

from moe_cap.run_record import StepRecord
from moe_cap.step_cost import Chunk

__all__ = ["ModelScorer"]


class ModelScorer:
    """Scores text with `model` and its `tokenizer`."""

    def __init__(self, model: MoEForCausalLM, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.steps: list[StepRecord] = []

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        logits = self.model(batch.to(self.model.device)).float()  # [B, T, V]
        b, t = batch.shape
        self.steps.append(StepRecord("prefill", max(time.perf_counter() - started, 1e-9),
                                     tuple(Chunk(0, t) for _ in range(b))))
        return logits

    @torch.no_grad()
    def windows_nll(self, windows: torch.Tensor, batch_size: int = 16) -> float:
        """Summed next-token loss (nats) of windows `[N, T + 1]`: each predicts its last T
        tokens from those before them in the window."""
        total = 0.0
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]  # [B, T + 1]
            logits = self._logits(batch[:, :-1])  # [B, T, V]
            total += float(F.cross_entropy(logits.flatten(0, 1),  # [B*T, V]
                                           batch[:, 1:].flatten().to(logits.device),
                                           reduction="sum"))
        return total

    @torch.no_grad()
    def loglikelihood(self, context: Sequence[int], continuation: Sequence[int]
                      ) -> tuple[float, bool]:
        """`(log p(continuation | context), whether every continuation token is the argmax)`.

        Raises:
            ValueError: empty context or continuation.
        """
        if not context or not continuation:
            raise ValueError("loglikelihood needs a context and a continuation")
        ids = torch.tensor([list(context) + list(continuation)])  # [1, C + K]
        logits = self._logits(ids[:, :-1])[0, len(context) - 1 :]  # [K, V]
        target = ids[0, len(context) :].to(logits.device)  # [K]
        logp = logits.log_softmax(dim=-1)
        chosen = logp.gather(1, target[:, None])[:, 0]  # [K]
        return float(chosen.sum()), bool((logits.argmax(dim=-1) == target).all())
