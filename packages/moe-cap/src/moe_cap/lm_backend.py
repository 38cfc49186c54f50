"""What an lm-evaluation-harness `LM` needs, on our engines, without lm-eval itself: the three
request kinds (`loglikelihood`, `loglikelihood_rolling`, `generate_until`) as plain functions
over strings, so they are tested where lm-eval is not installed. `lm_eval_adapter` wraps this
in the registered `LM` subclass."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from moe_cap.core_engine import CoreStreamingEngine
from moe_cap.engine_options import EngineOptions
from moe_cap.model_scorer import ModelScorer
from moe_cap.scoring_run import in_process_scorer
from moe_cap.streaming_engine import EngineInfo
from moe_cap.target import GenerationSettings
from moe_cap.workload import WorkItem

__all__ = ["EngineLMBackend"]


class EngineLMBackend:
    """Log-likelihoods and generations from an in-process engine's model.

    Args:
        scorer: The model and tokenizer, scoring.
        label: The engine, for messages.
        max_gen_toks: Default generation limit.
    """

    def __init__(self, scorer: ModelScorer, label: str, max_gen_toks: int = 256) -> None:
        self.scorer, self.label, self.max_gen_toks = scorer, label, max_gen_toks
        info = EngineInfo(label, label, str(scorer.model.dtype), None, "none")
        self._generator = CoreStreamingEngine(scorer.model, scorer.tokenizer, info)
        bos = getattr(scorer.tokenizer, "bos_token_id", None)
        eos = sorted(self._generator.eos_token_ids)
        # The token a rolling window's first token is predicted from (lm-eval's prefix token).
        self.prefix_token = bos if isinstance(bos, int) else (eos[0] if eos else 0)

    @classmethod
    def load(cls, options: EngineOptions, max_gen_toks: int = 256) -> EngineLMBackend:
        """Load the model of `options` (`moe-gen` or `moe-infinity`)."""
        scorer, label = in_process_scorer(options)
        return cls(scorer, label, max_gen_toks)

    @property
    def max_length(self) -> int:
        """The model's context length."""
        return int(self.scorer.model.spec.max_position_embeddings)

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """`(log p(continuation | context), whether greedy decoding would produce it)`; the
        split is where the context's own tokens end, as lm-eval does."""
        whole = self.scorer.encode(context + continuation)
        ctx = self.scorer.encode(context) if context else []
        cont = whole[len(ctx):] if whole[: len(ctx)] == ctx else self.scorer.encode(continuation)
        ctx = ctx or [self.prefix_token]
        budget = self.max_length - len(cont)
        return self.scorer.loglikelihood(ctx[-budget:], cont)

    def loglikelihood_rolling(self, text: str) -> float:
        """Log-likelihood of the whole of `text`: disjoint windows of the context length, each
        window's first token predicted from the token before it (the prefix token first), as
        lm-eval's rolling windows with context length 1."""
        tokens = self.scorer.encode(text)
        window = self.max_length - 1
        total = 0.0
        for start in range(0, len(tokens), window):
            before = [self.prefix_token] if start == 0 else tokens[start - 1 : start]
            total += self.scorer.loglikelihood(before, tokens[start : start + window])[0]
        return total

    def generate_until(self, context: str, until: Sequence[str] = (),
                       max_gen_toks: int | None = None) -> str:
        """Greedy continuation of `context`, cut before the first of `until` it contains."""
        item = WorkItem("lm-eval", prompt=context, max_tokens=max_gen_toks or self.max_gen_toks)
        text = self._generator.generate(item, GenerationSettings(), lambda: None,
                                        threading.Event()).text
        cuts = [i for stop in until if stop and (i := text.find(stop)) >= 0]
        return text[: min(cuts)] if cuts else text
