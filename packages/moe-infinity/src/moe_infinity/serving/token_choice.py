"""Each row's next token chosen on the device, so that the next pass can be enqueued on tokens
the host has not read yet (docs/decisions/0017).

Dimension key: b rows of a pass, V vocabulary.

Greedy rows take the argmax, one kernel for the whole pass. A sampled row calls `sample_next`
with its request's generator, which lives on the model's device: the same call on the same
logits, once per step and in row order, as when every token was read before the next pass was
enqueued, so a seeded request gives the same tokens either way. (On CUDA `torch.multinomial`
checks its probabilities on the host, so a sampled row waits there for the pass it samples;
the next pass is still enqueued before the step's host work.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from moe_core import sample_next

from moe_infinity.serving.sequence import Sequence

__all__ = ["TokenChoice", "choose_tokens"]


@dataclass(frozen=True)
class TokenChoice:
    """The tokens of one pass's rows.

    Attributes:
        tokens: `[b]` int64 on the logits' device; a row that takes no token, or whose sampling
            failed, holds its argmax (never used).
        errors: Row index -> why its sampling failed (that request alone fails).
    """

    tokens: torch.Tensor
    errors: dict[int, str] = field(default_factory=dict)


def choose_tokens(logits: torch.Tensor, rows: list[Sequence | None]) -> TokenChoice:
    """The next token of each row of `logits` `[b, V]`: the argmax for a greedy request, a sample
    with its generator otherwise; rows given as None take no token (a prompt not yet fully
    prefilled, or a request that ended after the pass was enqueued) and draw no sample."""
    tokens = logits.argmax(dim=-1)  # [b]
    errors: dict[int, str] = {}
    for i, seq in enumerate(rows):
        if seq is None or seq.request.sampling.is_greedy:
            continue
        try:
            tokens[i : i + 1] = sample_next(logits[i : i + 1], seq.request.sampling,
                                            seq.generator)
        except RuntimeError as exc:  # its sampling alone failed (bad logits): fail it alone
            errors[i] = str(exc)
    return TokenChoice(tokens, errors)
