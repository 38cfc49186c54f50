"""The activation tracer: records each request's routing while the model runs, without a host
sync per layer.

Dimension key: T tokens of a step, K experts per token, D hidden, L MoE layers, E routed experts.

Everything is accumulated on the model's device and copied to the host once per request
(`end_request`): each step gets an `[L, E]` count tensor that the MoE blocks' routing observers
fill with `index_add_` (not `bincount`, whose CUDA kernel reads the input's maximum back to the
host to size its output), and an `[L, E]` lookahead tensor.

The lookahead (MoE-Infinity's released code predicts layer l+1 from layer l's expert ids; running
layer l+1's router on layer l's hidden state works far better, see docs/moe-infinity.md): when
layer l's MoE block receives its input (moe-core's `DecoderLayer.mix_observer`), the tracer
applies layer l+1's router to layer l's residual stream normalised by layer l+1's own
post-attention norm (`"next_norm"`, the default: the router was trained on inputs normalised that
way, and it foresaw the tiny model's next layer best) or to layer l's block input as it is
(`"block_input"`); `DecoderLayer.router_logits` does either. Either costs one
`[T, D] x [D, E]` product per layer (plus an RMSNorm for `next_norm`), and is known one layer
before layer l+1 routes: the time a prefetch for layer l+1 has to land.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Literal

import numpy as np
import torch
from moe_core import DecoderLayer, MixObserver, MoEBlock, MoEForCausalLM
from torch import nn

from moe_infinity.lookahead_observers import attach_lookahead, detach_lookahead
from moe_infinity.trace import RequestTrace

__all__ = ["ActivationTracer", "LookaheadInput"]

LookaheadInput = Literal["next_norm", "block_input"]
_Observer = Callable[[int, torch.Tensor, torch.Tensor], None]


class ActivationTracer:
    """Records a `RequestTrace` per request while attached to a model (a context manager).

        with ActivationTracer(model) as tracer:
            tracer.begin_request()
            model.generate([prompt_ids], max_new_tokens=64)
            trace = tracer.end_request("req-0")

    Every forward pass between `begin_request` and `end_request` is one step (the first is the
    prefill). Requests must run one at a time (batch 1): rows of a batch would be merged.
    Observers already set on the MoE blocks are still called, and are put back on exit.

    Attributes:
        lookahead_top: Experts kept per step and layer in the lookahead (the rest are zeroed).
        lookahead_input: What layer l+1's router is applied to (see the module docstring).
    """

    def __init__(self, model: MoEForCausalLM, lookahead_top: int | None = None,
                 lookahead_input: LookaheadInput = "next_norm") -> None:
        self._model = model
        self._blocks: list[MoEBlock] = model.moe_blocks()
        if not self._blocks:
            raise ValueError("the model has no MoE blocks to trace")
        self.num_experts = self._blocks[0].spec.num_experts
        top_k = self._blocks[0].spec.router.top_k
        self.lookahead_top = min(self.num_experts, lookahead_top or 4 * top_k)
        if lookahead_input not in ("next_norm", "block_input"):
            raise ValueError(f"lookahead_input must be 'next_norm' or 'block_input', "
                             f"got {lookahead_input!r}")
        self.lookahead_input = lookahead_input
        self._row = {block.layer: row for row, block in enumerate(self._blocks)}
        self._counts: list[torch.Tensor] = []  # per step [L, E] int32, on the device
        self._looks: list[torch.Tensor] = []  # per step [L, E] float32, on the device
        self._tokens: list[int] = []
        self._recording = False
        self._previous: list[_Observer | None] = []
        self._previous_mix: list[MixObserver | None] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # Attaching ------------------------------------------------------------------------------

    def __enter__(self) -> ActivationTracer:
        self._previous = [block.observer for block in self._blocks]
        for block, previous in zip(self._blocks, self._previous, strict=True):
            block.observer = self._chained(previous)
        self._handles.append(self._model.register_forward_pre_hook(self._on_step))
        self._previous_mix = attach_lookahead(self._model, self._blocks, self._lookahead)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block, previous in zip(self._blocks, self._previous, strict=True):
            block.observer = previous
        detach_lookahead(self._model, self._previous_mix)

    # Requests -------------------------------------------------------------------------------

    def begin_request(self) -> None:
        """Start recording a new request (steps of an unfinished one are dropped)."""
        self._counts, self._looks, self._tokens = [], [], []
        self._recording = True

    def end_request(self, request_id: str, domain: str | None = None) -> RequestTrace:
        """Stop recording and return the request's trace (one device-to-host copy).

        Raises:
            RuntimeError: no request was begun, or no forward pass ran since.
        """
        if not self._recording or not self._counts:
            raise RuntimeError("end_request without a begun request that ran a forward pass")
        self._recording = False
        counts = torch.stack(self._counts).cpu().numpy()  # [S, L, E]
        looks = torch.stack(self._looks).cpu().numpy()  # [S, L, E]
        return RequestTrace(request_id, domain, counts.astype(np.int32),
                            looks.astype(np.float32), np.array(self._tokens, dtype=np.int64))

    # Hooks ----------------------------------------------------------------------------------

    def _on_step(self, module: nn.Module, args: tuple[object, ...]) -> None:
        if not self._recording:
            return
        input_ids = args[0]
        assert isinstance(input_ids, torch.Tensor)
        if input_ids.shape[0] != 1:
            raise ValueError(f"the tracer records one request at a time (batch 1), got a batch "
                             f"of {input_ids.shape[0]}")
        shape = (len(self._blocks), self.num_experts)
        device = self._model.device
        self._counts.append(torch.zeros(shape, dtype=torch.int32, device=device))
        self._looks.append(torch.zeros(shape, dtype=torch.float32, device=device))
        self._tokens.append(int(input_ids.shape[1]))

    def _chained(self, previous: _Observer | None) -> _Observer:
        def observer(layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
            if self._recording and self._counts:
                flat = expert_ids.reshape(-1)  # [T*K]
                ones = torch.ones(flat.shape, dtype=torch.int32, device=flat.device)
                self._counts[-1][self._row[layer]].index_add_(0, flat, ones)
            if previous is not None:
                previous(layer, expert_ids, weights)

        return observer

    def _lookahead(self, row: int, nxt: DecoderLayer, previous: MixObserver | None
                   ) -> MixObserver:
        def observer(layer: int, h: torch.Tensor, x: torch.Tensor) -> None:
            if self._recording and self._looks:
                logits = (nxt.router_logits(h) if self.lookahead_input == "next_norm"
                          else nxt.router_logits(x, normalised=True))  # [T, E]
                probs = torch.softmax(logits.float(), dim=-1).sum(dim=0)  # [E]
                values, ids = probs.topk(self.lookahead_top)
                self._looks[-1][row].scatter_(0, ids, values)
            if previous is not None:
                previous(layer, h, x)

        return observer
