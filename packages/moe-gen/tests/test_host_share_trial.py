"""The host share trial: a plan's host share checked against none on the first decode steps,
in pairs of same-batch steps, the faster kept; the loop runs it on an engine whose share it
switches, the steps say which share they ran, and the summary counts them."""

from __future__ import annotations

import pytest
import torch
from moe_core import load_model, tiny_model_path
from moe_gen.api import Defaults, _sequence
from moe_gen.batch_loop import StepStats, run_loop
from moe_gen.engine import BatchEngine
from moe_gen.host_share_trial import HostShareTrial
from moe_gen.job import JobOutcome
from moe_gen.paged_kv import PagedKV
from moe_gen.plan import Plan
from moe_gen.render import summary_lines
from moe_gen.requests import GenRequest
from moe_gen.scheduler import Scheduler
from moe_gen.sequence import Sequence
from moe_gen.summary import summarise


def drive(trial: HostShareTrial, seconds: dict[float, float], steps: list[tuple[int, bool]]
          ) -> list[float]:
    """Run `(batch, decode)` steps through `trial`, each taking `seconds[share]`; the shares
    the steps ran at."""
    ran = []
    for batch, decode in steps:
        share = trial.share(batch, decode)
        trial.record(share, batch, decode, seconds[share])
        ran.append(share)
    return ran


@pytest.mark.parametrize(("planned_s", "none_s", "kept"), [(1.0, 0.9, 0.0), (0.9, 1.0, 0.25)])
def test_the_faster_share_is_kept_after_the_pairs(planned_s: float, none_s: float,
                                                  kept: float) -> None:
    trial = HostShareTrial(0.25, pairs=2, warmup=1)
    ran = drive(trial, {0.25: planned_s, 0.0: none_s}, [(8, True)] * 8)
    assert ran == [0.25, 0.25, 0.0, 0.25, 0.0] + [kept] * 3  # warm-up, two pairs, then kept
    assert trial.kept == kept
    assert trial.ratios == pytest.approx([none_s / planned_s] * 2)


def test_prompts_and_batch_changes_break_a_pair() -> None:
    trial = HostShareTrial(0.5, pairs=1, warmup=0)
    seconds = {0.5: 2.0, 0.0: 1.0}
    # A prefill step between the pair's steps, then a batch that shrinks: no pair completes.
    assert drive(trial, seconds, [(8, True), (8, False), (8, True), (7, True)]) == [
        0.5, 0.5, 0.5, 0.5]
    assert trial.kept is None and trial.ratios == []
    assert drive(trial, seconds, [(7, True), (7, True)]) == [0.0, 0.0]  # the pair, then kept
    assert trial.kept == 0.0 and trial.ratios == [0.5]


def test_a_trial_needs_a_share_and_pairs() -> None:
    for planned in (0.0, 1.5):
        with pytest.raises(ValueError, match="planned share"):
            HostShareTrial(planned)
    with pytest.raises(ValueError, match="pairs must be positive"):
        HostShareTrial(0.25, pairs=0)


def test_the_engine_share_switches_only_where_it_has_host_attention() -> None:
    model = load_model(tiny_model_path(), dtype="float32")
    pages = PagedKV(model.spec, 16, 4, torch.float32)
    plain = BatchEngine(model, pages, 4)
    plain.set_host_share(0.0)
    with pytest.raises(ValueError, match="built with no host share"):
        plain.set_host_share(0.5)
    hybrid = BatchEngine(model, pages, 4, cpu_attention_share=0.5)
    hybrid.set_host_share(0.0)
    assert hybrid.host_share == 0.0
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        hybrid.set_host_share(1.5)


def test_the_loop_runs_the_trial_and_the_summary_shows_it() -> None:
    """On the CPU, with the modules' own attention path on the host: the steps follow the
    trial, and the tokens are the fixed share's."""
    model = load_model(tiny_model_path(), dtype="float32")
    plan = Plan(max_batch_size=4, micro_batch_size=2, max_prefill_tokens=64, page_tokens=4,
                num_kv_pages=64, cpu_attention_share=0.5)

    def run(trial: HostShareTrial | None) -> tuple[list[list[int]], list[StepStats]]:
        generator = torch.Generator().manual_seed(0)
        seqs: list[Sequence] = [
            _sequence(i, GenRequest(str(i), token_ids=tuple(torch.randint(
                3, model.spec.vocab_size, (5 + i,), generator=generator).tolist())),
                Defaults(max_new_tokens=8), None, model.device, 512) for i in range(4)]
        pages = PagedKV(model.spec, plan.num_kv_pages, plan.page_tokens, model.dtype)
        engine = BatchEngine(model, pages, plan.micro_batch_size, cpu_attention_share=0.5)
        scheduler = Scheduler(seqs, pages, plan.max_batch_size, plan.max_prefill_tokens)
        results: dict[str, list[int]] = {}
        steps: list[StepStats] = []
        run_loop(engine, scheduler, set(), None,
                 lambda r: results.__setitem__(r.id, list(r.token_ids)), steps.append,
                 lambda: 0, None, trial)
        return [results[str(i)] for i in range(4)], steps

    fixed, fixed_steps = run(None)
    trial = HostShareTrial(0.5, pairs=2, warmup=1)
    tried, steps = run(trial)
    assert tried == fixed  # the host runs the modules' own path: the same numbers
    assert {s.host_share for s in fixed_steps} == {0.5}
    decode = [s.host_share for s in steps if s.phase == "decode"]
    assert decode[:5] == [0.5, 0.5, 0.0, 0.5, 0.0] and trial.kept is not None
    assert set(decode[5:]) == {trial.kept}
    assert StepStats.from_dict(steps[-1].to_dict()) == steps[-1]  # Ray sends it this way

    summary = summarise(4, steps, 1.0, {}, plan)
    counts = {share: row["steps"] for share, row in summary.host_shares.items()}
    assert counts == {"0": decode.count(0.0), "0.5": decode.count(0.5)}
    assert summarise(4, fixed_steps, 1.0, {}, plan).host_shares["0.5"]["steps"] == len(
        [s for s in fixed_steps if s.phase == "decode"])
    outcome = JobOutcome(summary, plan, None, torch.float32, None, 0)
    line = next(x for x in summary_lines(outcome) if x.startswith("decode steps by host"))
    assert "planned 50.0%" in line and "0.0%: " in line and "50.0%: " in line
    fixed_summary = summarise(4, fixed_steps, 1.0, {}, plan)  # no trial: none claimed
    fixed_line = next(x for x in summary_lines(JobOutcome(fixed_summary, plan, None,
                                                          torch.float32, None, 0))
                      if x.startswith("decode steps by host"))
    assert "tried" not in fixed_line and "50.0%: " in fixed_line
