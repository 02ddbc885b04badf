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
