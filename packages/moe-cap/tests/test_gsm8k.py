"""GSM8K scoring: the final number of an answer, checked by hand, and the prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
from moe_cap.errors import WorkloadError
from moe_cap.gsm8k import (
    answers_match,
    extract_final_number,
    gsm8k_items,
    read_math_problems,
    score_gsm8k,
)
from moe_cap.request_result import RequestResult

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(("text", "number"), [
    ("#### 42", "42"),
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("The answer is 1,234.", "1234"),
    ("So the answer is: $1,000,000", "1000000"),
    ("He loses 5 dollars, so the change is -5", "-5"),
    ("#### -3.0", "-3"),
    ("It costs $3.50 in total", "3.5"),
    ("The total is 18.00", "18"),
    ("Half a cup is .5 cups", "0.5"),
    ("First 12, then 7, so 19", "19"),                       # the last number wins
    ("#### 7\nlater text with 99", "7"),                     # #### wins over later numbers
    ("The answer is 12.\n\nQuestion: Ann has 5 #### 5", "12"),  # cut at the next question
    ("no number at all", None),
    ("tokens t0 t1 t2", None),                               # digits inside words are not numbers
])
def test_final_number(text: str, number: str | None) -> None:
    assert extract_final_number(text) == number


def test_answers_match_compares_values() -> None:
    assert answers_match("so 18.0 dollars", "#### 18")
    assert answers_match("The answer is 1,234", "#### 1234")
    assert not answers_match("#### 17", "#### 18")
    assert not answers_match("nothing", "#### 18")


def test_reads_the_fixture_and_builds_prompts() -> None:
    problems = read_math_problems(DATA / "gsm8k_test_20.jsonl")
    shots = read_math_problems(DATA / "gsm8k_train_5.jsonl")
    assert len(problems) == 20 and problems[0].final == "18"
    chat = gsm8k_items(problems[:2], shots[:2], "chat", 64)
    assert chat[0].messages is not None and len(chat[0].messages) == 5
    assert "<<" not in chat[0].messages[1]["content"]  # calculator annotations removed
    assert chat[0].reference == "18" and chat[0].max_tokens == 64
    text = gsm8k_items(problems[:1], shots[:1], "completion")[0].prompt
    assert text is not None and text.endswith("Answer:") and text.count("Question:") == 2


def test_score_counts_exact_matches_and_failures() -> None:
    items = gsm8k_items(read_math_problems(DATA / "gsm8k_test_20.jsonl")[:3])
    rows = [RequestResult("gsm8k-0", 0, 0.0, 1.0, None, (), 10, 5, "stop", None, "#### 18"),
            RequestResult("gsm8k-1", 1, 0.0, 1.0, None, (), 10, 5, "stop", None, "#### 4"),
            RequestResult("gsm8k-2", 2, 0.0, None, None, (), None, 0, None, "HTTP 500", None)]
    result = score_gsm8k(items, rows, shots=0, style="chat", data="x")
    assert items[1].reference == "3"
    assert result.score == pytest.approx(1 / 3) and result.details["correct"] == 1


def test_bad_data_lines_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 3"}\nnot json\n'
                    '{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(WorkloadError, match=r"2 bad line\(s\): line 2: not valid JSON.*line 3"):
        read_math_problems(path)
