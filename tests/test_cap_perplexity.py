"""moe-cap's perplexity task equals moe-core's own held-out evaluation of the tiny model
(`moe_core.tiny_training.evaluation.heldout_perplexity`) within 1% (issue 17): same tokens,
same non-overlapping windows, scored through moe-cap's in-process engine path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from moe_cap import EngineOptions, ScoringConfig, run_scoring
from moe_cap.run_record import RunRecord
from moe_core import load_model, load_tokenizer, tiny_model_path
from moe_core.tiny_training.evaluation import heldout_perplexity

HELDOUT = Path(__file__).parents[1] / "packages" / "moe-cap" / "tests" / "data" / "heldout.txt"


@pytest.mark.parametrize("engine", ["moe-gen", "moe-infinity"])
def test_perplexity_equals_moe_core_evaluation(tmp_path: Path, engine: str) -> None:
    record = run_scoring(EngineOptions(engine=engine, model="tiny-moe"),
                         ScoringConfig(task="perplexity", data=HELDOUT,
                                       record_path=tmp_path / "p.json", seq_len=64))
    tokens = load_tokenizer(tiny_model_path()).encode(HELDOUT.read_text(),
                                                      add_special_tokens=False)
    _, reference, scored = heldout_perplexity(load_model("tiny-moe"), np.array(tokens), 64,
                                              max_tokens=None)
    assert record.accuracy is not None and record.accuracy.num_examples == scored
    assert record.accuracy.score == pytest.approx(reference, rel=0.01)
    assert record.accuracy.higher_is_better is False
    again = RunRecord.from_json(tmp_path / "p.json")
    # One prefill step per batch of windows, every scored window in one of them.
    assert again == record and again.steps
    assert sum(len(s.chunks) for s in again.steps) == scored // 64
