"""Tasks, verifiers, the dataset loader and pass@k."""

from __future__ import annotations

import json
import math
import random

import pytest

from llm.errors import UserError
from llm.tasks import ArithmeticTask, CountdownTask, DatasetTask, leading_integer, load_records, pass_at_k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n, c, k", [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 6, 4), (16, 1, 16), (10, 10, 3)])
def test_pass_at_k_unbiased(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k))
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_arithmetic_prompt_split_and_scoring():
    task = ArithmeticTask(0, 14)
    train = task.train_batch(200, random.Random(0))
    held = task.eval_set(32)
    assert train[0].prompt.startswith("2 + 3 = 5\n4 + 1 = 5\n6 + 2 = 8\n") and train[0].prompt.endswith(" = ")
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    p = held[0]
    assert task.score(p, f"{p.answer}\n3 + 4 = 7") and task.score(p, f" {p.answer} \n")
    assert not task.score(p, f"{p.answer}1\n") and not task.score(p, "x\n") and not task.score(p, "")
    assert leading_integer("-12 apples") == -12


def test_arithmetic_other_ops():
    task = ArithmeticTask(1, 9, operands=3, ops="+-*")
    for p in task.train_batch(20, random.Random(1)):
        expr = p.prompt.rsplit("\n", 1)[-1].rstrip("= ").strip()
        assert str(eval(expr)) == p.answer  # noqa: S307 - our own generated digits and operators


def test_countdown_is_solvable_and_verified():
    task = CountdownTask(3, 9)
    probs = task.train_batch(10, random.Random(0))
    for p in probs:
        assert len(p.numbers) == 3 and p.prompt.endswith(": ")
    p = probs[0]
    a, b, c = p.numbers
    assert task.score(type(p)(p.prompt, str(a + b + c), p.numbers), f"{a} + {b} + {c}\n")
    assert not task.score(type(p)(p.prompt, str(a + b), p.numbers), f"{a} + {b}")  # must use every number
    assert not task.score(p, "__import__('os')")
    assert len(task.eval_set(5)) == 5


def test_dataset_loader_reports_line_numbers(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "1+1?", "answer": "#### 2"}\n\n{bad\n{"question": "2+2?"}\n[1, 2]\n'
                 '{"problem": "x", "solution": "so \\\\boxed{3}"}\n')
    probs, warnings = load_records(f, "skip")
    assert [p.answer for p in probs] == ["2", "so \\boxed{3}"]
    assert [w.split(":")[1] for w in warnings] == ["3", "4", "5"]
    with pytest.raises(UserError, match="d.jsonl:3"):
        load_records(f, "error")
    with pytest.raises(UserError, match="unsupported format"):
        (tmp_path / "d.csv").write_text("a,b\n")
        load_records(tmp_path / "d.csv")


def test_dataset_task_uses_math_verify(tmp_path):
    pytest.importorskip("math_verify")
    f = tmp_path / "gsm.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(10)]
    rows.append({"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."})
    f.write_text("\n".join(json.dumps(r) for r in rows))
    task = DatasetTask(str(f), eval_size=3)
    assert len(task.eval_records) == 3 and len(task.train_records) == 8
    gsm = next(p for p in task.train_records + task.eval_records if p.answer == "8")
    assert task.score(gsm, "4 + 4 = 8, so the answer is 8.") and not task.score(gsm, "The answer is 9.")
    half = next(p for p in task.train_records + task.eval_records if "frac" in p.answer)
    assert task.score(half, "The answer is $\\boxed{0.5}$") and not task.score(half, "$\\boxed{2}$")


def test_parquet_dataset_rows_are_loaded_and_bad_rows_reported(tmp_path):
    import pandas as pd

    from llm.tasks import load_records

    path = tmp_path / "data.parquet"
    pd.DataFrame({"prompt": ["What is 2+2?", "", "Half of 10?"], "answer": ["4", "1", "5"]}).to_parquet(path)
    problems, warnings = load_records(path)
    assert [p.prompt for p in problems] == ["What is 2+2?", "Half of 10?"]
    assert len(warnings) == 1 and "row 1" in warnings[0] and "no prompt" in warnings[0]


def test_distinct_train_set_draws_without_repeats_and_refuses_more_than_the_pool():
    """A control set's prompts are distinct training prompts in train_batch's order; asking for more than the
    training split holds is a clear error that names how many it has."""
    task = ArithmeticTask(0, 4, fewshot=0)  # 25 problems, about a fifth held out
    train = {p.prompt for p in task.train_batch(2000, random.Random(0))}
    held = {p.prompt for p in task.eval_set(100)}
    assert len(train) + len(held) == 25
    got = task.distinct_train_set(len(train), random.Random(1))
    assert len({p.prompt for p in got}) == len(got) == len(train) and {p.prompt for p in got} == train
    rng, first = random.Random(3), task.distinct_train_set(5, random.Random(3))
    order: list[str] = []
    while len(order) < 5:  # the first five distinct prompts train_batch draws with the same seed
        p = task.train_batch(1, rng)[0].prompt
        order += [] if p in order else [p]
    assert [p.prompt for p in first] == order
    with pytest.raises(UserError, match=f"only {len(train)} distinct prompts"):
        task.distinct_train_set(len(train) + 1, random.Random(1))
