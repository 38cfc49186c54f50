"""`SamplingParams` and `sample_next`: greedy is argmax, filters keep exactly the tokens they
should, and seeded sampling is reproducible and follows the softmax.

Dimension key: B batch, V vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_core import SamplingParams, SettingError
from moe_core.sampling import sample_next

PROPERTY_SETTINGS = settings(max_examples=50, deadline=None)
DRAWS = 64  # samples per property example (the logits row repeated)


@st.composite
def distinct_logits(draw: st.DrawFn, max_vocab: int = 40) -> torch.Tensor:
    """One row `[V]` of logits, all values at least 0.05 apart (so ranks are unambiguous)."""
    vocab = draw(st.integers(2, max_vocab))
    ranks = torch.tensor(draw(st.permutations(range(vocab))), dtype=torch.float32)
    spacing = draw(st.floats(0.05, 2.0))
    return (ranks - vocab / 2) * spacing


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches `top_p` (Holtzman et al.
    2020), by a plain walk down the sorted probabilities."""
    probs = (logits.double() / temperature).softmax(-1).tolist()
    kept, total = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda i: probs[i], reverse=True):
        kept.add(token)
        total += probs[token]
        if total >= top_p:
            break
    return kept


# --- Validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "message"), [
    ({"temperature": -0.1}, "temperature must be >= 0, got -0.1"),
    ({"top_k": 0}, "top_k must be positive, got 0"),
    ({"top_k": -3}, "top_k must be positive, got -3"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_p": -0.2}, r"top_p must be in \(0, 1\], got -0.2"),
])
def test_invalid_params(fields: dict[str, float], message: str) -> None:
    """A setting error (a `ValueError`) in the user's words: the field, not the class."""
    with pytest.raises(SettingError, match=rf"^{message}$"):
        SamplingParams(**fields)  # type: ignore[arg-type]


def test_valid_edges() -> None:
    assert SamplingParams().is_greedy
    assert not SamplingParams(temperature=1e-3, top_k=1, top_p=1.0).is_greedy
    assert SamplingParams(seed=None).generator(torch.device("cpu")) is None


# --- Greedy and filters -----------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(logits=st.lists(distinct_logits(max_vocab=30), min_size=1, max_size=4))
def test_greedy_is_argmax(logits: list[torch.Tensor]) -> None:
    width = max(len(row) for row in logits)
    batch = torch.stack([torch.cat([row, torch.full((width - len(row),), -1e4)])
                         for row in logits])  # [B, V]
    tokens = sample_next(batch, SamplingParams())
    assert tokens.tolist() == [int(row.argmax()) for row in logits]


@PROPERTY_SETTINGS
@given(logits=distinct_logits(), temperature=st.floats(0.5, 100.0), seed=st.integers(0, 2**16))
def test_top_k_1_is_greedy_at_any_temperature(logits: torch.Tensor, temperature: float,
                                              seed: int) -> None:
    params = SamplingParams(temperature=temperature, top_k=1, seed=seed)
    tokens = sample_next(logits.expand(DRAWS, -1), params, params.generator(logits.device))
    assert set(tokens.tolist()) == {int(logits.argmax())}


@PROPERTY_SETTINGS
@given(logits=distinct_logits(), temperature=st.floats(0.5, 100.0), seed=st.integers(0, 2**16))
def test_tiny_top_p_keeps_only_the_best_token(logits: torch.Tensor, temperature: float,
                                              seed: int) -> None:
    params = SamplingParams(temperature=temperature, top_p=1e-6, seed=seed)
    tokens = sample_next(logits.expand(DRAWS, -1), params, params.generator(logits.device))
    assert set(tokens.tolist()) == {int(logits.argmax())}


@PROPERTY_SETTINGS
@given(data=st.data(), logits=distinct_logits(), temperature=st.floats(0.3, 20.0),
       seed=st.integers(0, 2**16))
def test_sampled_tokens_lie_in_the_top_k(data: st.DataObject, logits: torch.Tensor,
                                         temperature: float, seed: int) -> None:
    top_k = data.draw(st.integers(1, len(logits)))
    params = SamplingParams(temperature=temperature, top_k=top_k, seed=seed)
    tokens = sample_next(logits.expand(DRAWS, -1), params, params.generator(logits.device))
    best = set(sorted(range(len(logits)), key=lambda i: float(logits[i]))[-top_k:])
    assert set(tokens.tolist()) <= best


@PROPERTY_SETTINGS
@given(logits=distinct_logits(), temperature=st.floats(0.3, 5.0), top_p=st.floats(0.05, 0.999),
       seed=st.integers(0, 2**16))
def test_sampled_tokens_lie_in_the_nucleus(logits: torch.Tensor, temperature: float,
                                           top_p: float, seed: int) -> None:
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    tokens = sample_next(logits.expand(DRAWS, -1), params, params.generator(logits.device))
    # Allow for float32 rounding when the cumulative sum lands right on top_p.
    allowed = nucleus(logits, temperature, top_p - 1e-5) | nucleus(logits, temperature,
                                                                   top_p + 1e-5)
    assert set(tokens.tolist()) <= allowed


# --- Randomness -------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.zeros(256, 50)  # uniform: every draw is a fresh guess
    params = SamplingParams(temperature=1.0, seed=7)
    first = sample_next(logits, params, params.generator(logits.device))
    again = sample_next(logits, params, params.generator(logits.device))
    other_seed = SamplingParams(temperature=1.0, seed=8)
    other = sample_next(logits, other_seed, other_seed.generator(logits.device))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_frequencies_follow_the_tempered_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 20_000
    for temperature in (0.5, 2.0):
        params = SamplingParams(temperature=temperature, seed=0)
        tokens = sample_next(logits.expand(n, -1), params, params.generator(logits.device))
        freq = torch.bincount(tokens, minlength=4).double() / n
        expected = (logits.double() / temperature).softmax(-1)
        # Binomial standard error is at most sqrt(0.25 / 20000) = 0.0035; allow 5 of them.
        assert torch.allclose(freq, expected, atol=5 * math.sqrt(0.25 / n))


def test_top_k_then_top_p_renormalises_the_survivors() -> None:
    # After top_k=2 the survivors have probabilities 0.73 and 0.27 (logits 1 and 0): top_p=0.7
    # keeps only the first, although over all four tokens it would keep two.
    logits = torch.tensor([[1.0, 0.0, -0.5, -0.6]])
    params = SamplingParams(temperature=1.0, top_k=2, top_p=0.7, seed=0)
    tokens = sample_next(logits.expand(DRAWS, -1), params, params.generator(logits.device))
    assert set(tokens.tolist()) == {0}
    unfiltered_k = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    tokens = sample_next(logits.expand(1000, -1), unfiltered_k,
                         unfiltered_k.generator(logits.device))
    assert set(tokens.tolist()) == {0, 1}
