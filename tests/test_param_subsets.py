"""The subset experiment (`python -m llm.param_subsets`) on the tiny random model: param-space contributions
predict what one step on a random subset of a real GRPO batch does to entropy (r >= 0.95), logit-space is
reported beside them."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from llm.param_subsets import PREDICTIONS, main, table  # noqa: E402


def test_smoke_subset_experiment(tmp_path, capsys):
    assert main(["--model", "smoke", "--out", str(tmp_path), "--subsets", "30"]) == 0
    payload = json.loads((tmp_path / "param_subsets.json").read_text())
    assert [r["optimizer"] for r in payload["results"]] == ["sgd", "adamw"]
    for res in payload["results"]:
        assert len(res["subsets"]) == 30
        fit = res["fit"]
        assert fit["param"]["r"] >= 0.95, (res["optimizer"], fit)
        assert 0.8 < fit["param"]["slope"] < 1.25, (res["optimizer"], fit)
        # the exact first-order change after the step is the ceiling of any first-order prediction
        assert fit["exact_first_order"]["r"] >= 0.95
        assert set(fit) == set(PREDICTIONS) and fit["logit"]["n"] == 30  # logit-space reported beside it
    assert payload["results"][1]["warmup_steps"] == 10
    assert (tmp_path / "param_subsets.md").read_text() == table(payload)
    assert "logit-space" in capsys.readouterr().out


def test_validation_doc_quotes_the_saved_smollm2_run():
    """docs/validation.md quotes the table that `table` makes from the saved SmolLM2 run (cannot drift)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    payload = json.loads((root / "docs" / "data" / "param_subsets_embedded.json").read_text())
    assert payload["model"] == "embedded" and all(len(r["subsets"]) >= 30 for r in payload["results"])
    assert table(payload) in (root / "docs" / "validation.md").read_text()
