"""docs/cli.md is exactly what docs/gen_cli_reference.py generates from llm.config (it cannot drift)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_reference", ROOT / "docs" / "gen_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no docs/__pycache__
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


def test_cli_reference_is_up_to_date():
    text = _generator().generate()
    assert (ROOT / "docs" / "cli.md").read_text() == text, (
        "docs/cli.md is stale: run `python docs/gen_cli_reference.py`")


def test_cli_reference_covers_every_field_and_preset():
    from llm.config import PRESETS, TrainConfig

    text = (ROOT / "docs" / "cli.md").read_text()
    for f in dataclasses.fields(TrainConfig):
        assert f"`--{f.name.replace('_', '-')}" in text, f.name
    for name in PRESETS:
        assert f"`{name}`" in text


def test_help_texts_and_choices_come_from_the_dataclass():
    """Every field has a help text in its metadata and ``--help`` shows it; the choice fields offer exactly
    what the code behind them accepts."""
    import typing

    from entrotheory.core import RULES
    from llm.config import TrainConfig, build_parser, field_choices
    from llm.tasks import TASKS

    actions = {a.dest: a for a in build_parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no metadata help text"
        assert actions[f.name].help.replace("%%", "%").startswith(f.metadata["help"]), f.name
    assert field_choices("task") == TASKS
    assert field_choices("rule") == RULES
    assert field_choices("method") is None  # a registry name, checked against entrotheory.methods.METHODS
    literal = [f.name for f in dataclasses.fields(TrainConfig)
               if typing.get_origin(typing.get_type_hints(TrainConfig)[f.name]) is typing.Literal]
    assert set(literal) == {"task", "dataset_errors", "rule", "predictor", "param_derivative", "optimizer"}
    sections = [f.metadata["section"] for f in dataclasses.fields(TrainConfig) if "section" in f.metadata]
    assert dataclasses.fields(TrainConfig)[0].metadata.get("section") and len(sections) == len(set(sections))
