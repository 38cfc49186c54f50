"""Checking our implementation against transformers on any checkpoint: logits and greedy tokens.

Both models run in float32 on the CPU, so this is for checkpoints that fit twice in host memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moe_core.generation import left_pad, pad_token_for
from moe_core.loader import load_model

__all__ = ["VerificationReport", "verify_against_transformers"]


@dataclass(frozen=True)
class VerificationReport:
    """What `verify_against_transformers` measured.

    Attributes:
        relative_error: ‖ours − ref‖ / ‖ref‖ of the logits at real (non-padding) positions.
        tokens_match: Greedy continuations are identical.
        new_tokens: Tokens generated per row.
        batch: Rows (of different lengths).
        tolerance: The relative-error bound the check used.
    """

    relative_error: float
    tokens_match: bool
    new_tokens: int
    batch: int
    tolerance: float

    @property
    def passed(self) -> bool:
        """Logits within tolerance and tokens equal."""
        return self.relative_error <= self.tolerance and self.tokens_match

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields, `passed` included."""
        return {**asdict(self), "passed": self.passed}


@torch.no_grad()
def verify_against_transformers(folder: str | Path, *, batch: int = 3, prompt_tokens: int = 16,
                                new_tokens: int = 16, seed: int = 0,
                                tolerance: float = 1e-4) -> VerificationReport:
    """Run random ragged prompts through our model and transformers' and compare.

    Args:
        folder: A local checkpoint folder.
        batch: Prompts; row i has `prompt_tokens - i` tokens (ragged, left-padded).
        prompt_tokens: Longest prompt.
        new_tokens: Greedy tokens to compare.
        seed: Seed of the random prompts.
        tolerance: Largest accepted relative error of the logits.
    """
    from transformers import AutoModelForCausalLM

    ours = load_model(folder, dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    vocab = ours.spec.vocab_size
    lengths = [max(1, prompt_tokens - i) for i in range(batch)]
    rows = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
    ids, mask = left_pad(rows, 0)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = ours(ids, attention_mask=mask)
    ref_logits = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    error = float((logits[real] - ref_logits[real]).norm() / ref_logits[real].norm())
    tokens = ours.generate(ids, attention_mask=mask, max_new_tokens=new_tokens)
    ref_tokens = ref.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=pad_token_for(ours))[:, ids.shape[1] :]
    match = tokens.shape == ref_tokens.shape and bool(torch.equal(tokens, ref_tokens))
    return VerificationReport(error, match, new_tokens, batch, tolerance)

