"""The tracer: its EAM equals a plain recount of the routing decisions, steps are split into
prefill and decode, the lookahead is layer l+1's router on layer l's block input, and the model
is left as it was found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from moe_core import MoEForCausalLM
from moe_infinity import ActivationTracer, TraceSet
from moe_infinity.tracer import LookaheadInput


def _prompt(tokenizer: object) -> list[int]:
    return list(tokenizer("Once upon a time, a little fox")["input_ids"])  # type: ignore[operator]


def test_eam_equals_recount_of_routing(tiny: MoEForCausalLM, tokenizer: object) -> None:
    decisions: list[tuple[int, list[list[int]]]] = []  # every step, every layer, in call order

    def record(layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        decisions.append((layer, ids.tolist()))

    blocks = tiny.moe_blocks()
    for block in blocks:
        block.observer = record
    try:
        with ActivationTracer(tiny) as tracer:
            tracer.begin_request()
            out = tiny.generate([_prompt(tokenizer)], max_new_tokens=6)
            trace = tracer.end_request("r", "stories")
    finally:
        for block in blocks:
            block.observer = None
    num_layers, num_experts = len(blocks), blocks[0].spec.num_experts
    assert len(decisions) == trace.num_steps * num_layers  # the earlier observer still ran
    recount = np.zeros((trace.num_steps, num_layers, num_experts), dtype=np.int64)
    for i, (layer, ids) in enumerate(decisions):
        for token in ids:
            for expert in token:
                recount[i // num_layers, layer, expert] += 1
    np.testing.assert_array_equal(trace.step_counts, recount)
    np.testing.assert_array_equal(trace.prefill_eam, recount[0])
    np.testing.assert_array_equal(trace.decode_eam, recount[1:].sum(axis=0))
    np.testing.assert_array_equal(trace.eam, recount.sum(axis=0))
    top_k = blocks[0].spec.router.top_k
    assert trace.step_tokens[0] == len(_prompt(tokenizer))
    assert (trace.step_tokens[1:] == 1).all()
    assert 1 <= trace.num_steps - 1 <= out.shape[1]  # a decode step per new token at most
    assert (trace.step_counts.sum(axis=2) == trace.step_tokens[:, None] * top_k).all()


@pytest.mark.parametrize("form", ["block_input", "next_norm"])
def test_lookahead_is_next_router_on_this_layers_hidden_state(tiny: MoEForCausalLM,
                                                               tokenizer: object,
                                                               form: LookaheadInput) -> None:
    blocks = tiny.moe_blocks()
    layers = [tiny.layers[b.layer] for b in blocks]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # each MoE layer's (residual, input)

    def record(layer: int, h: torch.Tensor, x: torch.Tensor) -> None:
        seen.append((h.clone(), x.clone()))

    for layer in layers:
        layer.mix_observer = record
    try:
        with torch.no_grad(), ActivationTracer(tiny, lookahead_input=form) as tracer:
            tracer.begin_request()
            tiny(torch.tensor([_prompt(tokenizer)]))
            trace = tracer.end_request("r")
    finally:
        for layer in layers:
            layer.mix_observer = None
    assert len(seen) == len(blocks)  # the tracer chains to the observers already set
    assert not trace.lookahead[:, 0].any()
    with torch.no_grad():
        for row in range(1, len(blocks)):
            h, x = seen[row - 1]
            logits = (layers[row].router_logits(x, normalised=True) if form == "block_input"
                      else layers[row].router_logits(h))  # [T, E]
            want = torch.softmax(logits.float(), -1).sum(0)  # [E]
            top = want.topk(tracer.lookahead_top).indices
            want = torch.zeros_like(want).index_copy(0, top, want[top])  # only the top kept
            np.testing.assert_allclose(trace.lookahead[0, row], want.numpy(), rtol=1e-5,
                                       atol=1e-6)


def test_lookahead_keeps_only_the_top_experts(sample_traces: TraceSet) -> None:
    top = 4 * sample_traces.shape.top_k
    assert sample_traces.settings["lookahead_top"] == top
    for trace in sample_traces:
        assert ((trace.lookahead > 0).sum(axis=2) <= top).all()
        assert (trace.lookahead >= 0).all()


def test_tracer_restores_observers_and_hooks(tiny: MoEForCausalLM) -> None:
    def keep(layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        pass

    blocks = tiny.moe_blocks()
    blocks[0].observer = keep
    try:
        with ActivationTracer(tiny):
            assert blocks[0].observer is not keep
        assert blocks[0].observer is keep
        assert all(b.observer is None for b in blocks[1:])
        assert not tiny._forward_pre_hooks
        assert all(layer.mix_observer is None for layer in tiny.layers)
    finally:
        blocks[0].observer = None


def test_tracer_refuses_batches_and_empty_requests(tiny: MoEForCausalLM) -> None:
    with ActivationTracer(tiny) as tracer:
        with pytest.raises(RuntimeError, match="end_request"):
            tracer.end_request("nothing ran")
        tracer.begin_request()
        with pytest.raises(ValueError, match="batch 1"), torch.no_grad():
            tiny(torch.ones(2, 3, dtype=torch.long))


def test_sample_traces_cover_every_domain(sample_traces: TraceSet) -> None:
    assert {t.domain for t in sample_traces} == {"stories", "math", "plays", "de", "fr", "es",
                                                 "code"}
    assert sample_traces.shape.num_moe_layers == 6 and sample_traces.shape.num_experts == 16
    assert sample_traces.shape.expert_bytes == 245_760
