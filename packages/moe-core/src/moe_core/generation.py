"""Whole generations with the model's own KV cache: prefill a ragged batch, then decode steps.

Dimension key: B batch, T prompt slots, N new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from moe_core.decode_runner import DecodeRunner, graph_blockers
from moe_core.errors import SettingError
from moe_core.request_limits import check_fits_context
from moe_core.sampling import SamplingParams, sample_next

if TYPE_CHECKING:
    from moe_core.model import MoEForCausalLM

__all__ = ["FinishReason", "GenerationResult", "generate", "left_pad", "pad_token_for"]

FinishReason = Literal["eos", "stop", "length"]


class _Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class GenerationResult:
    """New tokens of a batch and why each row stopped.

    Attributes:
        tokens: `[B, N]` new token ids; a row that stopped early is padded with `pad_token_id`.
        lengths: New tokens of each row (its EOS or stop-string tokens included).
        finish_reasons: `"eos"`, `"stop"` (a stop string appeared) or `"length"` per row.
    """

    tokens: torch.Tensor
    lengths: list[int]
    finish_reasons: list[FinishReason]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids [B, T], attention_mask [B, T])` with every row's tokens flush right."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _rows_of(input_ids: torch.Tensor | Sequence[Sequence[int]],
             attention_mask: torch.Tensor | None) -> list[list[int]]:
    """The real tokens of each prompt, whatever side it was padded on."""
    if not isinstance(input_ids, torch.Tensor):
        return [list(map(int, r)) for r in input_ids]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return input_ids.tolist()
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]


def _eos_ids(model: MoEForCausalLM, eos_token_id: int | Sequence[int] | None) -> set[int]:
    value = eos_token_id
    if value is None:
        value = model.generation_defaults.get("eos_token_id")  # type: ignore[assignment]
    if value is None:
        value = model.spec.eos_token_ids
    return {value} if isinstance(value, int) else set(value)


def pad_token_for(model: MoEForCausalLM, pad_token_id: int | None = None) -> int:
    """The filler of finished rows: as given, else the checkpoint's pad token, else an EOS id
    (transformers' order)."""
    for value in (pad_token_id, model.generation_defaults.get("pad_token_id"),
                  model.spec.pad_token_id):
        if isinstance(value, int):
            return value
    return min(_eos_ids(model, None), default=0)


@torch.no_grad()
def generate(model: MoEForCausalLM, input_ids: torch.Tensor | Sequence[Sequence[int]], *,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
             stop_strings: Sequence[str] = (), tokenizer: _Decoder | None = None,
             pad_token_id: int | None = None, graphs: bool | None = None) -> GenerationResult:
    """Generate up to `max_new_tokens` for each prompt.

    Args:
        model: The model.
        input_ids: `[B, T]` token ids (with `attention_mask` if padded), or a list of token lists.
        attention_mask: `[B, T]`, 1 for real tokens; padding may be on either side.
        max_new_tokens: Limit per row.
        temperature: 0 is greedy (deterministic); otherwise sampling.
        top_k: Sample among the k most likely tokens.
        top_p: Nucleus sampling threshold.
        seed: Seed for sampling.
        eos_token_id: End tokens (default: the checkpoint's generation config, else config.json).
        stop_strings: A row stops once its decoded text contains one (needs `tokenizer`).
        tokenizer: Decodes tokens for `stop_strings`.
        pad_token_id: Fills rows that stopped early (default: the checkpoint's pad token, else
            the smallest EOS id, else 0).
        graphs: Decode through CUDA graphs (`DecodeRunner`): None (default) uses them on CUDA
            whenever the model can be captured (`graph_blockers`), False never, True requires
            them (SettingError where impossible).

    Raises:
        RequestError: an empty prompt, or one that with `max_new_tokens` exceeds the model's
            context (`max_position_embeddings`): past it the model only generates junk.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    eos = _eos_ids(model, eos_token_id)
    pad = pad_token_for(model, pad_token_id)
    rows = _rows_of(input_ids, attention_mask)
    check_fits_context([len(r) for r in rows], max_new_tokens, model.spec.max_position_embeddings)
    ids, mask = left_pad(rows, pad, model.device)
    b = ids.shape[0]
    generator = params.generator(model.device)
    slots = ids.shape[1] + max(max_new_tokens, 1)
    runner = _runner(model, b, slots, graphs)
    if runner is None:
        cache = model.new_cache(b, slots)
        logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # [B, V]

        def step(token: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
            return model(token[:, None], attention_mask=active[:, None].long(), cache=cache,
                         last_only=True)[:, -1]
    else:
        logits = runner.prefill(ids, mask)

        def step(token: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
            return runner.step(token, active)[0]

    out: list[torch.Tensor] = []
    reasons: list[FinishReason | None] = [None] * b
    lengths = [0] * b
    generated: list[list[int]] = [[] for _ in range(b)]  # each row's tokens, on the host
    done = [False] * b
    done_on_device = torch.zeros(b, dtype=torch.bool, device=model.device)
    for i in range(max_new_tokens):
        token = sample_next(logits, params, generator).masked_fill(done_on_device, pad)  # [B]
        out.append(token)
        seen = _HostCopy(token)
        if i + 1 < max_new_tokens:
            # The next step is launched before this token is looked at on the host, so the
            # device never waits for the host's checks. A row that stops at this token takes
            # part in one more step; its output is replaced by padding below.
            logits = step(token, ~done_on_device)
        newly_done = False
        for row, value in enumerate(seen.values()):
            if done[row]:
                continue
            lengths[row] += 1
            generated[row].append(value)
            if value in eos:
                reasons[row] = "eos"
            elif stop_strings and _has_stop(tokenizer, generated[row], stop_strings):
                reasons[row] = "stop"
            else:
                continue
            done[row] = newly_done = True
        if all(done):
            break
        if newly_done:
            done_on_device = torch.tensor(done, device=model.device)
    tokens = torch.stack(out, dim=1) if out else torch.empty(b, 0, dtype=torch.long,
                                                             device=model.device)
    return GenerationResult(tokens, lengths, [r or "length" for r in reasons])


class _HostCopy:
    """A device tensor's values on their way to the host (pinned, no wait until asked)."""

    def __init__(self, values: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if values.is_cuda:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values

    def values(self) -> list[int]:
        """The values, waiting for the copy if needed."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


def _runner(model: MoEForCausalLM, batch_size: int, slots: int,
            graphs: bool | None) -> DecodeRunner | None:
    """The model's decode runner for this generation, or None to decode eagerly."""
    if graphs is False:
        return None
    blockers = graph_blockers(model)
    if blockers:
        if graphs:
            raise SettingError(f"graph-captured decoding is impossible here: {blockers[0]}")
        return None
    return model.decode_runner(batch_size, slots)


def _has_stop(tokenizer: _Decoder | None, generated: list[int],
              stop_strings: Sequence[str]) -> bool:
    assert tokenizer is not None
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return any(s in text for s in stop_strings)
