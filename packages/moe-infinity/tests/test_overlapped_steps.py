"""Overlapped engine steps (docs/decisions/0017): the next decode pass enqueued on tokens chosen on
the device, before the step's host work. Whatever ends a request at whatever step (an EOS token,
a stop string, its token limit, a cancellation sent while a pass runs ahead), the stream, the
traces and the freed blocks are the serial engine's; tokens are chosen on the device as they
were on the host; a pass's results are read as they were when the read started."""

from __future__ import annotations

import queue
import time

import moe_core
import numpy as np
import pytest
import torch
from moe_core import MoEForCausalLM, SamplingParams
from moe_infinity.serving.engine import Engine
from moe_infinity.serving.engine_config import EngineConfig
from moe_infinity.serving.pass_readback import PassReadback
from moe_infinity.serving.request import GenerationRequest, SequenceEvent
from moe_infinity.serving.sequence import Sequence
from moe_infinity.serving.serving_model import ServingModel
from moe_infinity.serving.token_choice import choose_tokens
from moe_infinity.serving.trace_keeper import TraceKeeper

CHAT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # greedy: EOS at token 54
EOS_FIRST = "Tom has 3 apples and buys 5 more. How many apples does he have now?"  # EOS at once



class _Run:
    """One engine, every request submitted before it starts (so the first step admits and
    prefills them all together, and every later step is decode only until rows end)."""

    def __init__(self, served: ServingModel, overlap: bool) -> None:
        self.traces: list[np.ndarray] = []
        keeper = TraceKeeper(served.shape, None, 100, 0)
        original = keeper.add
        keeper.add = lambda eam: (self.traces.append(eam), original(eam))[1]  # type: ignore[method-assign]
        self.engine = Engine(served, EngineConfig(kv_bytes=8 << 20, max_batch=8,
                                                  overlap=overlap), keeper)
        self.events: queue.Queue[SequenceEvent] = queue.Queue()
        self.cancel_at: dict[str, int] = {}  # request -> cancel once it has this many tokens

    def _sink(self, event: SequenceEvent) -> None:
        """Called on the engine thread during a step's host work."""
        self.events.put(event)
        if (event.finish_reason is None
                and self.cancel_at.get(event.request_id) == event.num_output_tokens):
            self.engine.cancel(event.request_id)

    def run(self, requests: list[GenerationRequest]) -> dict[str, list[SequenceEvent]]:
        """Every request's events, in order; the engine stopped once its blocks are free."""
        for request in requests:
            self.engine.submit(request, self._sink)
        self.engine.start()
        out: dict[str, list[SequenceEvent]] = {r.request_id: [] for r in requests}
        done, deadline = 0, time.monotonic() + 300
        try:
            while done < len(requests):
                event = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
                out[event.request_id].append(event)
                done += event.finish_reason is not None
            while (self.engine.snapshot().kv_blocks_used or self.engine.snapshot().running
                   ) and time.monotonic() < deadline:
                time.sleep(0.01)  # the last step is published after its events
        finally:
            self.engine.stop()
        return out


def _request(served: ServingModel, name: str, text: str, max_tokens: int, **options: object
             ) -> GenerationRequest:
    return GenerationRequest(request_id=name, prompt_ids=tuple(served.tokenizer(text)["input_ids"]),
                             max_tokens=max_tokens, **options)  # type: ignore[arg-type]


def _both(served: ServingModel, requests: list[GenerationRequest],
          cancel_at: dict[str, int] | None = None
          ) -> tuple[dict[str, list[SequenceEvent]], _Run, dict[str, list[SequenceEvent]], _Run]:
    """The requests through the overlapped engine, then the serial one."""
    runs = []
    for overlap in (True, False):
        run = _Run(served, overlap)
        run.cancel_at = dict(cancel_at or {})
        runs.append((run.run(requests), run))
    (ahead, ahead_run), (serial, serial_run) = runs
    return ahead, ahead_run, serial, serial_run


def _assert_same(ahead: dict[str, list[SequenceEvent]], ahead_run: _Run,
                 serial: dict[str, list[SequenceEvent]], serial_run: _Run) -> None:
    """The same events (text, tokens, ends, counts), the same traces, every block freed; and the
    overlapped engine did run passes ahead, the serial one none."""
    assert ahead == serial
    assert (sorted(t.tolist() for t in ahead_run.traces)
            == sorted(t.tolist() for t in serial_run.traces))
    assert ahead_run.engine.snapshot().kv_blocks_used == 0
    assert ahead_run.engine.snapshot().steps_ahead > 0
    assert serial_run.engine.snapshot().steps_ahead == 0


def _tokens(events: list[SequenceEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def test_rows_ending_at_different_steps_stream_what_the_serial_engine_streams(
        served: ServingModel, tiny: MoEForCausalLM) -> None:
    """Six rows together: one ends on its first token (EOS), two on stop strings a dozen or so
    tokens in, one at its token limit, one on EOS at token 54 while another runs on. Each row
    that ends makes the pass already enqueued for it compute a token that is never streamed."""
    requests = [
        _request(served, "story", "Once upon a time, there was a little fox who", 40,
                 stop=("Lily",)),
        _request(served, "chat", CHAT, 70),
        _request(served, "french", "Il était une fois", 40, stop=("visage",)),
        _request(served, "count", "1, 2, 3,", 9),
        _request(served, "eos-first", EOS_FIRST, 10),
        _request(served, "long", "The end.", 64, ignore_eos=True),
    ]
    ahead, ahead_run, serial, serial_run = _both(served, requests)
    _assert_same(ahead, ahead_run, serial, serial_run)
    ends = {name: (events[-1].finish_reason, events[-1].num_output_tokens)
            for name, events in ahead.items()}
    assert ends["chat"] == ("stop", 54) and ends["eos-first"] == ("stop", 1)
    assert ends["count"] == ("length", 9) and ends["long"] == ("length", 64)
    for name, stop in (("story", "Lily"), ("french", "visage")):  # well before the limit
        reason, count = ends[name]
        assert reason == "stop" and 1 < count < 40
        assert stop not in "".join(e.text for e in ahead[name])
    assert len({count for _, count in ends.values()}) == 6  # six different last steps
    chat = next(r for r in requests if r.request_id == "chat")
    result = moe_core.generate(tiny, [list(chat.prompt_ids)], max_new_tokens=70)
    assert _tokens(ahead["chat"]) == result.tokens[0, : result.lengths[0]].tolist()


def test_a_lone_request_runs_every_decode_pass_ahead_but_none_past_its_limit(
        served: ServingModel) -> None:
    """12 tokens: the prefill step gives the first, eleven decode steps the rest; the pass of
    tokens 3 to 12 is each enqueued ahead, none is enqueued after the last token."""
    run = _Run(served, overlap=True)
    events = run.run([_request(served, "a", "Once upon a time", 12, ignore_eos=True)])
    assert len(_tokens(events["a"])) == 12
    assert run.engine.snapshot().steps == 12
    assert run.engine.snapshot().steps_ahead == 10


def test_a_cancel_sent_while_a_pass_runs_ahead_ends_the_request_where_the_serial_engine_does(
        served: ServingModel) -> None:
    """The sink cancels `a` as its 5th token streams: the pass of its 6th token is already
    enqueued then, and is dropped at the next step; `b` and `c` run on, unchanged."""
    requests = [_request(served, "a", "Once upon a time", 40, ignore_eos=True),
                _request(served, "b", "def fibonacci(n):", 24, ignore_eos=True),
                _request(served, "c", "Il était une fois", 30, ignore_eos=True)]
    ahead, ahead_run, serial, serial_run = _both(served, requests, cancel_at={"a": 5})
    _assert_same(ahead, ahead_run, serial, serial_run)
    assert len(_tokens(ahead["a"])) == 5 and ahead["a"][-1].finish_reason == "cancelled"
    assert ahead["a"][-1].token_ids == () and ahead["a"][-1].num_output_tokens == 5
    assert [len(_tokens(ahead[n])) for n in "bc"] == [24, 30]


def test_seeded_sampling_on_the_device_gives_the_serial_engines_tokens(
        served: ServingModel) -> None:
    """Sampled rows run ahead too: their tokens are drawn on the device with each request's
    generator, once per step, as the serial engine draws them."""
    requests = [
        _request(served, "hot", "Once upon a time", 20, ignore_eos=True,
                 sampling=SamplingParams(temperature=1.0, top_k=50, seed=7)),
        _request(served, "nucleus", "def fibonacci(n):", 16, ignore_eos=True,
                 sampling=SamplingParams(temperature=0.8, top_p=0.9, seed=11)),
        _request(served, "greedy", "Il était une fois", 18, ignore_eos=True)]
    ahead, ahead_run, serial, serial_run = _both(served, requests)
    _assert_same(ahead, ahead_run, serial, serial_run)


def test_log_probability_rows_stay_serial(served: ServingModel) -> None:
    """A row asking for log-probabilities reads its pass's logits during the host work, which
    a captured pass run ahead would overwrite: no pass runs ahead while it runs, and its
    log-probabilities are the serial engine's."""
    lone = _Run(served, overlap=True)
    events = lone.run([_request(served, "lp", "Once upon a time", 8, logprobs=3,
                                ignore_eos=True)])
    assert lone.engine.snapshot().steps_ahead == 0
    assert all(e.logprobs is not None for e in events["lp"] if e.token_ids)
    requests = [_request(served, "lp", "Once upon a time", 6, logprobs=2, ignore_eos=True),
                _request(served, "plain", "def fibonacci(n):", 14, ignore_eos=True)]
    ahead, ahead_run, serial, serial_run = _both(served, requests)
    _assert_same(ahead, ahead_run, serial, serial_run)  # ahead once `lp` has ended


# Tokens chosen on the device, results read later ------------------------------------------------

def _seq(sampling: SamplingParams) -> Sequence:
    request = GenerationRequest(request_id="s", prompt_ids=(1,), max_tokens=4, sampling=sampling)
    return Sequence(request, lambda e: None, lambda ids: "", torch.device("cpu"))


def test_choose_tokens_is_the_argmax_or_one_draw_of_the_rows_generator() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)  # [b, V]
    sampling = SamplingParams(temperature=1.0, top_k=10, seed=3)
    sampled = _seq(sampling)
    choice = choose_tokens(logits, [_seq(SamplingParams()), sampled, None, None])
    reference = sampling.generator(torch.device("cpu"))
    want = moe_core.sample_next(logits[1:2], sampling, reference)
    assert choice.tokens[0] == logits[0].argmax() and choice.tokens[1] == want[0]
    assert choice.tokens[2:].tolist() == logits[2:].argmax(dim=-1).tolist()
    assert not choice.errors
    assert sampled.generator is not None and reference is not None
    assert torch.equal(sampled.generator.get_state(), reference.get_state())  # one draw


def test_choose_tokens_fails_a_row_whose_sampling_fails_alone() -> None:
    logits = torch.randn(2, 20)
    logits[1] = float("nan")
    choice = choose_tokens(logits, [_seq(SamplingParams()),
                                    _seq(SamplingParams(temperature=1.0, seed=1))])
    assert list(choice.errors) == [1] and choice.tokens[0] == logits[0].argmax()


def test_a_readback_returns_the_values_at_its_start() -> None:
    """A captured pass run ahead overwrites its output buffers; what was read is what they held
    when the read started."""
    readback = PassReadback(torch.device("cpu"))
    counts, tokens = torch.arange(6, dtype=torch.int32).view(2, 3), torch.tensor([4, 5])
    readback.start((counts, tokens))
    counts.zero_()
    tokens.fill_(9)
    got_counts, got_tokens = readback.wait()
    assert got_counts.tolist() == [[0, 1, 2], [3, 4, 5]] and got_tokens.tolist() == [4, 5]
    with pytest.raises(RuntimeError, match="without start"):
        readback.wait()


@pytest.mark.gpu
def test_cuda_readback_waits_for_its_pass_only() -> None:
    """On CUDA the copies go to pinned memory on the stream; values are those at `start` even
    when later work on the stream overwrites the tensors before `wait`."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    readback = PassReadback(device)
    for n in (3, 5, 2):  # the buffers grow and are reused
        values = torch.arange(n, device=device) * 10
        readback.start((values, values.float()))
        values.fill_(-1)  # enqueued after the copies
        got, got_float = readback.wait()
        assert got.tolist() == [10 * i for i in range(n)]
        assert got_float.tolist() == [10.0 * i for i in range(n)]
