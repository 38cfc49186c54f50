"""The lm-evaluation-harness adapter: its backend on the tiny model (always), and a task over a
local file through lm-eval itself (skipped where the optional lm-eval extra is not installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moe_cap.engine_options import EngineOptions
from moe_cap.lm_backend import EngineLMBackend

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def backend() -> EngineLMBackend:
    return EngineLMBackend.load(EngineOptions(engine="moe-infinity", model="tiny-moe"), 8)


def test_rolling_loglikelihood_is_the_whole_sequence(backend: EngineLMBackend) -> None:
    text = (DATA / "heldout.txt").read_text()[:600]
    tokens = backend.scorer.encode(text)
    assert len(tokens) < backend.max_length - 1  # one window: compare with one forward pass
    ids = torch.tensor([[backend.prefix_token, *tokens]])
    with torch.no_grad():
        logp = backend.scorer.model(ids[:, :-1]).float().log_softmax(-1)[0]  # [T, V]
    want = float(logp.gather(1, ids[0, 1:, None]).sum())
    assert backend.loglikelihood_rolling(text) == pytest.approx(want, rel=1e-4)


def test_loglikelihood_prefers_the_story(backend: EngineLMBackend) -> None:
    context = "Once upon a time, there was a little"
    likely, _ = backend.loglikelihood(context, " girl")
    unlikely, _ = backend.loglikelihood(context, " carburettor")
    assert likely > unlikely


def test_generate_until_cuts_at_the_stop(backend: EngineLMBackend) -> None:
    full = backend.generate_until("Once upon a time,", (), 8)
    assert full
    stop = full[len(full) // 2 :][:2]
    cut = backend.generate_until("Once upon a time,", (stop,), 8)
    assert cut == full[: full.find(stop)]


def test_local_task_through_lm_eval(tmp_path: Path) -> None:
    lm_eval = pytest.importorskip("lm_eval", reason="the optional lm-eval extra is not "
                                  "installed (pip install 'moe-cap[lm-eval]')")
    from lm_eval.tasks import TaskManager
    from moe_cap.lm_eval_adapter import register

    register()
    data = tmp_path / "choice.jsonl"
    data.write_text((DATA / "choice.jsonl").read_text())
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "answer": r["answer"] if isinstance(r["answer"], int)
                                        else r["choices"].index(r["answer"])}) + "\n"
                            for r in rows))
    (tmp_path / "local_choice.yaml").write_text(
        "task: moe_cap_local_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    results = lm_eval.simple_evaluate(
        model="moe-cap", model_args="engine=moe-infinity,model=tiny-moe",
        tasks=["moe_cap_local_choice"], task_manager=TaskManager(include_path=str(tmp_path)))
    accuracy = results["results"]["moe_cap_local_choice"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0
