"""Every ```python block in the guide and the README runs; the docs site builds strictly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "docs" / "guide.md", ROOT / "README.md"]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


BLOCKS = [(p, i, code) for p in FILES for i, code in enumerate(python_blocks(p))]


def test_guide_has_snippets():
    assert len(python_blocks(ROOT / "docs" / "guide.md")) >= 3


@pytest.mark.parametrize("path,index,code", BLOCKS, ids=[f"{p.name}-{i}" for p, i, _ in BLOCKS])
def test_snippet_runs(path, index, code):
    exec(compile(code, f"{path.name}[{index}]", "exec"), {"__name__": "__snippet__"})


def test_docs_site_builds_strictly(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_llm_results_table_is_regenerated_from_the_saved_metrics():
    """docs/llm.md quotes the table that docs/gen_llm_table.py makes from docs/data (cannot drift)."""
    import runpy

    gen = runpy.run_path(str(ROOT / "docs" / "gen_llm_table.py"))
    data = ROOT / "docs" / "data"
    text = gen["table"]([f"Entrocraft (predictive)={data / 'llm_entrocraft_metrics.jsonl'}",
                         f"vanilla GRPO={data / 'llm_vanilla_metrics.jsonl'}",
                         f"Entrocraft (band rule)={data / 'llm_band_metrics.jsonl'}"])
    assert text in (ROOT / "docs" / "llm.md").read_text()
